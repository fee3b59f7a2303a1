"""The `random_conv` feature space: a small convolutional network with fixed random weights, a
stand-in for Inception where its weights or torch-fidelity are absent (CPU smoke runs, tests).

Its numbers are Fréchet distances in a random 32-dimensional feature space: they rank sample
sets (random features separate distributions, Inception's training only makes them
perceptual), but they are not FID and compare with no published number; every result says so.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mdlm_dmmd.metrics.image_features import ImageFeatures

SEED = 0


class RandomConvNet(nn.Module):
    """uint8 images [N, C, H, W] -> 32 features: two 3x3 conv + ReLU layers, averaged over space."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())

    def forward(self, images: Tensor) -> Tensor:
        x = images.float() / 127.5 - 1.0
        return self.body(x).mean(dim=(2, 3))


class RandomConvFeatures(ImageFeatures):
    """`features: random_conv` (stand-in; not FID)."""

    name = "random_conv"

    _nets: dict[int, nn.Module] = {}  # per channel count; the same weights for every instance

    def network(self, channels: int) -> nn.Module:
        if channels not in self._nets:
            with torch.random.fork_rng(devices=[]):  # the caller's RNG stays untouched
                torch.manual_seed(SEED)
                self._nets[channels] = RandomConvNet(channels).requires_grad_(False)
        return self._nets[channels]

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "seed": SEED, "architecture": repr(self.network(1))}

    def details(self) -> dict[str, Any]:
        return {"note": "random_conv: a random-weight stand-in for Inception; its FD is not FID"}
