"""Keys and values of earlier tokens, per DiT layer, for block-by-block forward passes.

Block diffusion (BD3-LM) samples one block at a time: finished (clean) blocks never change, so
their keys and values are computed once and kept here; each call on the next block attends to
the cached tokens plus itself.

    cache = KVCache()
    for block in blocks:
        ...                                                # denoising steps on the noisy block:
        logits = model(z_block, sigma, kv_cache=cache)     # attends to cache + z_block; cache kept
        ...
        model(x_block, zeros, kv_cache=cache)              # the finished block, once more
        cache.commit()                                     # ... and its keys/values stay

Every forward call with a cache leaves its own keys/values *pending*; `commit()` appends the
pending ones of the latest call, any other call replaces them. Keys are stored after rotary,
at the positions the call used (by default the next ones: `length`, `length` + 1, ...), so
they are never rotated again. Tensors are kept as computed (not detached): sample under
`torch.no_grad()`.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Per-layer keys and values [B, T, H, hd] of T earlier tokens; empty at construction."""

    def __init__(self) -> None:
        self._keys: list[Tensor] = []
        self._values: list[Tensor] = []
        self._pending: list[tuple[Tensor, Tensor]] = []
        self.dropped = 0  # tokens dropped from the front (a sliding window): the first cached one's position

    @property
    def length(self) -> int:
        """T, the number of committed tokens."""
        return self._keys[0].shape[1] if self._keys else 0

    @property
    def end(self) -> int:
        """The position after the last cached token (dropped + T): where the next call starts."""
        return self.dropped + self.length

    def drop_first(self, count: int) -> None:
        """Forget the `count` oldest tokens (a sliding window over a long sequence). The kept keys
        stay rotated at their own positions; rotary attention depends only on position
        differences, so new tokens continue at `end`."""
        if not 0 <= count <= self.length:
            raise ValueError(f"KVCache.drop_first: {count} of {self.length} cached tokens")
        self._keys = [k[:, count:] for k in self._keys]
        self._values = [v[:, count:] for v in self._values]
        self.dropped += count

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Called by layer `layer` of a forward pass with its new k, v [B, S, H, hd]: records them
        as pending and returns the keys and values to attend to, [B, T + S, H, hd] (cache first)."""
        if layer == 0:
            self._pending = []
        if layer != len(self._pending) or (self._keys and layer >= len(self._keys)):
            raise ValueError(f"KVCache: layer {layer} out of order (cache holds {len(self._keys)} layers)")
        self._pending.append((k, v))
        if not self._keys:
            return k, v
        past_k, past_v = self._keys[layer], self._values[layer]
        if past_k.shape[0] != k.shape[0] or past_k.shape[2:] != k.shape[2:]:
            raise ValueError(f"KVCache: new keys {tuple(k.shape)} do not fit cached keys {tuple(past_k.shape)}")
        return torch.cat((past_k, k), dim=1), torch.cat((past_v, v), dim=1)

    def commit(self) -> None:
        """Append the pending keys/values of the latest forward call to the cache."""
        if not self._pending or (self._keys and len(self._pending) != len(self._keys)):
            raise ValueError("KVCache.commit: no complete forward call to commit")
        if not self._keys:
            self._keys = [k for k, _ in self._pending]
            self._values = [v for _, v in self._pending]
        else:
            self._keys = [torch.cat((past, k), dim=1) for past, (k, _) in zip(self._keys, self._pending)]
            self._values = [torch.cat((past, v), dim=1) for past, (_, v) in zip(self._values, self._pending)]
        self._pending = []
