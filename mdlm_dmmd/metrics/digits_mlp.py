"""The `digits_mlp` feature space (the default and primary one): the 64 penultimate ReLU units of
an MLP classifier of sklearn's 8x8 digits (held-out accuracy ≈ 0.98, tests check ≥ 0.95).

Training and caching are shared with the other digits extractors (`digits_classifier.py`).
Longer training overfits (0.96 at 800 full-batch steps vs 0.98 at 200), hence 200 steps.
"""

from __future__ import annotations

from torch import Tensor, nn

from mdlm_dmmd.metrics.digits_classifier import NUM_PIXELS, DigitsClassifierFeatures, Recipe


class DigitsMLP(nn.Module):
    """MLP 64 → 128 → 64 → 10 on pixels scaled to [0, 1]; `features` is the 64-unit layer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(NUM_PIXELS, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, pixels: Tensor) -> Tensor:
        """Penultimate activations [N, 64] of pixels [N, 64] in [0, 1]."""
        return self.body(pixels)

    def forward(self, pixels: Tensor) -> Tensor:
        """Class logits [N, 10]."""
        return self.head(self.body(pixels))


RECIPE = Recipe(name="digits_mlp", build=DigitsMLP, seed=0, steps=200, lr=1e-2, weight_decay=1e-4,
                description="MLP 64-128-64-10, 64 features")


def DigitsMLPFeatures() -> DigitsClassifierFeatures:
    """`features: digits_mlp`."""
    return DigitsClassifierFeatures(RECIPE)
