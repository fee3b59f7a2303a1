"""Exponential moving average of a module's weights, keyed by parameter name.

Same update as the MDLM/Duo `ExponentialMovingAverage` (decay warm-up min(decay, (1+n)/(10+n))),
but the shadow is a name → tensor dict rather than an ordered list, so a checkpoint stays
readable and loadable after the module gains or loses an unrelated parameter.

Under FSDP the shadow follows the parameters' shards: a whole shadow (made before the module was
sharded, or loaded from a checkpoint) is cut to each parameter's layout when first used with it,
and `state_dict` gathers whole tensors again, on the CPU (collective then: every process calls it).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from mdlm_dmmd.errors import UserError
from mdlm_dmmd.models.shards import full, is_sharded, local, shard_like


class EMA:
    def __init__(self, module: nn.Module, decay: float):
        if not 0 <= decay < 1:
            raise UserError(f"training.ema must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module, keep: torch.Tensor | None = None) -> None:
        """One EMA step; with `keep` (a bool scalar tensor, decided on the device) a false value
        leaves the shadow as it is, without a host sync (the warm-up count still advances)."""
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for name, param in module.named_parameters():
            if name in self.shadow:
                shadow = self._shadow_like(name, param)
                weight = 1 - decay if keep is None else keep.to(shadow.dtype) * (1 - decay)
                local(shadow).lerp_(local(param.detach()), weight)  # elementwise: each process its piece

    @contextmanager
    def swapped_in(self, module: nn.Module) -> Iterator[None]:
        """Run a block with the EMA weights in `module`, restoring the live weights after."""
        live = {n: p.detach().clone() for n, p in module.named_parameters() if n in self.shadow}
        self.copy_to(module)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in module.named_parameters():
                    if name in live:
                        param.copy_(live[name])

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        for name, param in module.named_parameters():
            if name in self.shadow:
                param.copy_(self._shadow_like(name, param))

    def _shadow_like(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """The shadow of `name` on the parameter's device and, under FSDP, in its shard layout."""
        shadow = self.shadow[name]
        if shadow.device != param.device:
            shadow = shadow.to(param.device)
        shadow = self.shadow[name] = shard_like(shadow, param)
        return shadow

    def state_dict(self) -> dict:
        # a shard is gathered one tensor at a time and kept on the CPU: never a whole EMA on a device
        return {"decay": self.decay, "num_updates": self.num_updates,
                "shadow": {name: full(tensor).cpu() if is_sharded(tensor) else tensor
                           for name, tensor in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        self.shadow = {n: t.clone() for n, t in state["shadow"].items()}
