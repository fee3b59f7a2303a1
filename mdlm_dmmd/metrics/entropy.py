"""Unigram sample entropy (Duo `record_entropy`): a low value flags repetitive, collapsed samples.

For each sequence, H = −Σ_v c_v/n · log(c_v/n) over the counts c_v of its own token ids, in
nats; reported as the mean over sequences with its standard error.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mdlm_dmmd.errors import UserError


def per_sequence_entropy(samples: Tensor) -> Tensor:
    """Unigram entropy of each row of `samples` [N, L] (int token ids), in nats. [N]"""
    if samples.dim() != 2 or samples.shape[1] == 0:
        raise UserError(f"samples must be a non-empty [N, L] tensor of token ids, got shape {tuple(samples.shape)}")
    entropies = []
    for row in samples:
        counts = torch.unique(row, return_counts=True)[1].double()
        p = counts / counts.sum()
        entropies.append(-(p * p.log()).sum())
    return torch.stack(entropies)


def sample_entropy(samples: Tensor, **_) -> dict:
    """Registered metric `entropy`: mean unigram entropy ± standard error over sequences."""
    h = per_sequence_entropy(samples)
    stderr = h.std(unbiased=True).item() / math.sqrt(len(h)) if len(h) > 1 else float("nan")
    return {"value": h.mean().item(), "stderr": stderr, "per_sample": h.tolist()}
