"""Tensors that may be shards (DTensors under `trainer.strategy=fsdp`, see `mdlm_dmmd/sharding.py`):
the few operations code outside a network's forward needs on them (the EMA, checksums, clipping)."""

from __future__ import annotations

from typing import Any

import torch


def is_sharded(tensor: Any) -> bool:
    """Whether `tensor` is a DTensor (a shard of a parameter, gradient or EMA under FSDP)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor from a shard (collective: every process must call it), else `tensor`."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's piece of a shard (a plain tensor), else `tensor` itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def shard_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`tensor` (a whole one, the same on every process) laid out as `like` when that is a shard;
    no communication: each process keeps its own piece."""
    if not is_sharded(like) or is_sharded(tensor):
        return tensor
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(tensor.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
