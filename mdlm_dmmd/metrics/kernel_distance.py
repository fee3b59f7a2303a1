"""Kernel distance (KID, Bińkowski et al. 2018): unbiased MMD² with the cubic polynomial kernel.

    k(x, y) = (xᵀy / d + 1)³                      (d: the feature width)
    MMD²_u = Σ_{i≠j} k(x_i, x_j) / (m(m−1)) + Σ_{i≠j} k(y_i, y_j) / (n(n−1)) − 2 Σ_{i,j} k(x_i, y_j) / (mn)

Unlike the Fréchet distance it has an unbiased estimator, so two samples of one distribution
score ≈ 0 at any sample count, and it may come out slightly negative. The estimate is averaged
over *disjoint* subsets of both feature sets, so the subsets' spread gives an honest standard
error (overlapping subsets, as some implementations draw, would understate it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mdlm_dmmd.errors import UserError


def polynomial_kernel(x: Tensor, y: Tensor, degree: int = 3) -> Tensor:
    """(xᵀy / d + 1)^degree for all pairs. [m, n] float64"""
    return (x.double() @ y.double().T / x.shape[1] + 1) ** degree


def mmd2_unbiased(x: Tensor, y: Tensor, degree: int = 3) -> float:
    """The unbiased MMD² between feature sets x [m, d] and y [n, d] (m, n >= 2)."""
    m, n = x.shape[0], y.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x, degree), polynomial_kernel(y, y, degree), polynomial_kernel(x, y, degree)
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(within_x + within_y - 2 * k_xy.mean())


def kernel_distance(x: Tensor, y: Tensor, *, subset_size: int = 1000, generator: torch.Generator | None = None,
                    degree: int = 3) -> dict:
    """KID of samples x [m, d] against reference y [n, d]: {"value", "stderr", "subsets", "subset_size"}.

    Both sets are shuffled and cut into the same number of disjoint subsets of `subset_size`
    (smaller if there are not enough rows for two); the value is the mean MMD²_u over subsets and
    the stderr the subsets' standard deviation / √subsets (None for a single subset).
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise UserError(f"kernel distance: features must be [N, d] with one d, got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[0], y.shape[0]) < 2:
        raise UserError(f"kernel distance needs at least 2 samples on each side, got {x.shape[0]} and {y.shape[0]}")
    # at most half of the smaller set, so that there are two subsets for a stderr where possible
    size = min(max(2, min(subset_size, x.shape[0] // 2, y.shape[0] // 2)), x.shape[0], y.shape[0])
    count = min(x.shape[0] // size, y.shape[0] // size)
    x = x[torch.randperm(x.shape[0], generator=generator)]
    y = y[torch.randperm(y.shape[0], generator=generator)]
    values = torch.tensor([mmd2_unbiased(x[i * size:(i + 1) * size], y[i * size:(i + 1) * size], degree)
                           for i in range(count)], dtype=torch.float64)
    stderr = float(values.std(unbiased=True)) / math.sqrt(count) if count > 1 else None
    return {"value": float(values.mean()), "stderr": stderr, "subsets": count, "subset_size": size}
