"""Block diffusion (BD3-LM, Arriola et al. 2025): the attention masks and per-block times that
turn a masked or uniform process into a block-autoregressive one.

A sequence of L tokens is cut into L / block_size blocks. Each block is a diffusion over its
own tokens, conditioned on the clean tokens of the blocks before it:

- training input [x_t, x_0] (2L tokens, rotary positions 0..L−1 for each half), one t per
  (sequence, block); `training_mask` lets a noisy block see itself and the clean blocks before
  it, and the clean half see itself block-causally (the clean half's keys are what a KV cache
  holds when sampling);
- sampling input [x_0 blocks < j, z_t block j] with `block_causal_mask`, which is the x_0 quadrant
  of the training mask, or block j alone on top of a KV cache of the earlier blocks.

block_size == L is plain (non-block) diffusion: one block, no clean context.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mdlm_dmmd.errors import UserError


def check_block_size(block_size, length: int) -> int:
    """`block_size` as an int dividing `length`, or a one-line UserError naming the key."""
    if not isinstance(block_size, int) or isinstance(block_size, bool) or not 0 < block_size <= length \
            or length % block_size:
        raise UserError(f"block_size must be a positive int that divides model.length ({length}), "
                        f"got {block_size!r}")
    return block_size


def block_ids(length: int, block_size: int, device=None) -> Tensor:
    """Block index of every position 0..L−1. int64 [L]"""
    return torch.arange(length, device=device) // block_size


def training_mask(length: int, block_size: int, device=None) -> Tensor:
    """BD3-LM's mask over [x_t, x_0] (2L queries × 2L keys; True = may attend):

    x_t → x_t within the same block; x_t → x_0 of strictly earlier blocks; x_0 → x_0 of the same or
    earlier blocks; never x_0 → x_t. bool [2L, 2L]
    """
    blocks = block_ids(length, block_size, device).repeat(2)  # [2L]
    clean = torch.arange(2 * length, device=device) >= length  # [2L]: the x_0 half
    q_block, k_block = blocks[:, None], blocks[None, :]
    q_clean, k_clean = clean[:, None], clean[None, :]
    noisy_to_noisy = ~q_clean & ~k_clean & (q_block == k_block)
    noisy_to_clean = ~q_clean & k_clean & (k_block < q_block)
    clean_to_clean = q_clean & k_clean & (k_block <= q_block)
    return noisy_to_noisy | noisy_to_clean | clean_to_clean


def block_causal_mask(size: int, block_size: int, device=None) -> Tensor:
    """Sampling mode over S ≤ L tokens: each token sees its own and earlier blocks. bool [S, S]"""
    blocks = block_ids(size, block_size, device)
    return blocks[None, :] <= blocks[:, None]


def training_positions(length: int, device=None) -> Tensor:
    """Rotary positions of [x_t, x_0]: 0..L−1 for each half. int64 [2L]"""
    return torch.arange(length, device=device).repeat(2)


def per_token(t_blocks: Tensor, block_size: int) -> Tensor:
    """Times per block [B, n_blocks] → per token [B, n_blocks · block_size] (constant in a block)."""
    return t_blocks.repeat_interleave(block_size, dim=1)
