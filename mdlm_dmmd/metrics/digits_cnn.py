"""The `digits_cnn` feature space: the 32 penultimate ReLU units of a small convolutional
classifier of sklearn's 8x8 digits, a second instrument next to `digits_mlp`.

Independent of the MLP in what matters for a second opinion: another architecture (convolutions
and pooling see the image as a grid, the MLP as a vector), another feature width (32 vs 64) and
another seed (1 vs 0). Held-out accuracy ≈ 0.97 (tests check ≥ 0.95); ~3 s to train on one CPU
thread, once (cached like the MLP: `digits_classifier.py`).
"""

from __future__ import annotations

from torch import Tensor, nn

from mdlm_dmmd.metrics.digits_classifier import DigitsClassifierFeatures, Recipe


class DigitsCNN(nn.Module):
    """conv3x3(8) → pool → conv3x3(16) → pool → 64 → 32 → 10, on pixels [N, 64] in [0, 1]
    read as 8x8 images; `features` is the 32-unit layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # [N, 8, 4, 4]
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # [N, 16, 2, 2]
        )
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16 * 2 * 2, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def features(self, pixels: Tensor) -> Tensor:
        """Penultimate activations [N, 32] of pixels [N, 64] in [0, 1]."""
        return self.body(self.conv(pixels.view(-1, 1, 8, 8)))

    def forward(self, pixels: Tensor) -> Tensor:
        """Class logits [N, 10]."""
        return self.head(self.features(pixels))


RECIPE = Recipe(name="digits_cnn", build=DigitsCNN, seed=1, steps=150, lr=1e-2, weight_decay=1e-4,
                description="CNN conv8-conv16-32-10, 32 features")


def DigitsCNNFeatures() -> DigitsClassifierFeatures:
    """`features: digits_cnn`."""
    return DigitsClassifierFeatures(RECIPE)
