"""Fully sharded data parallelism (`trainer.strategy=fsdp`): FSDP2 (`torch.distributed.fsdp.fully_shard`)
through Lightning's `ModelParallelStrategy`, on any device (gloo on CPU, NCCL on GPUs).

Each process holds a shard of every network's weights, gradients and optimiser state; a DiT
gathers one block's weights at a time for its forward (`shard_networks`). Lightning's own
`fsdp` strategy (FSDP1) refuses CPU and its `ModelParallelStrategy` writes checkpoints that
Lightning loads before an algo's `on_load_checkpoint` could add the frozen teacher; this
strategy writes the same single-file checkpoints as DDP (gathered on rank 0) and loads them
the way Lightning loads DDP's: hook first, then the weights into the shards.

The EMA follows the shards itself (`models/ema.py`), and the distillation `Alternation` leaves
the gradient average to FSDP's reduce-scatter.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from mdlm_dmmd.errors import UserError
from mdlm_dmmd.models.dit import DiT


def shard_networks(module: nn.Module, mesh) -> None:
    """`fully_shard` every DiT in `module` over the data-parallel `mesh`: each block, then the rest
    of the network. Every parameter must belong to a DiT: one outside would be neither gathered
    nor averaged. Called again (Lightning's `configure_model` runs per stage), it does nothing."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    networks = [m for m in module.modules() if isinstance(m, DiT)]
    inside = {id(p) for network in networks for p in network.parameters()}
    outside = [name for name, p in module.named_parameters() if id(p) not in inside]
    if outside:
        raise UserError(f"trainer.strategy=fsdp shards DiT networks only; {type(module).__name__} has other "
                        f"parameters ({outside[0]}): use trainer.strategy=ddp")
    for network in networks:
        if isinstance(network, FSDPModule):
            continue
        for block in network.blocks:
            fully_shard(block, mesh=mesh)
        # True, where FSDP's default keeps a root's weights gathered after its forward for the
        # backward: after a forward without one (validation, a frozen teacher) the weights would
        # stay whole, and the EMA and the optimiser expect shards
        fully_shard(network, mesh=mesh, reshard_after_forward=True)


# A DiT's gathered head returns a view ([1, N, V].squeeze(0)). FSDP warns that an in-place op on
# it would lose its pre-backward hook; the only in-place write to network logits here (masked
# SUBS, `overwrite=True`) happens without gradient, where there is no backward to hook.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPDiT\) returned a view tensor")


class FullyShardedStrategy(ModelParallelStrategy):
    """FSDP2 over all processes (data parallel only), single-file checkpoints gathered on rank 0."""

    strategy_name = "mdlm_dmmd_fsdp"

    def __init__(self, **kwargs):
        super().__init__(tensor_parallel_size=1, save_distributed_checkpoint=False, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every process is a data-parallel rank
        super().setup_environment()

    @property
    def lightning_restore_optimizer(self) -> bool:
        return True  # `load_optimizer_state_dict` below, after the model's weights

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict[str, Any]:
        return torch.load(Path(checkpoint_path), map_location="cpu", weights_only=False)  # as DDP: the whole file

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        options = StateDictOptions(full_state_dict=True, strict=strict)  # every process read the whole file
        set_model_state_dict(self.lightning_module, checkpoint["state_dict"], options=options)

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        """The optimiser's state as `Optimizer.state_dict()` lays it out (parameters by index), whole
        tensors, on rank 0 (empty elsewhere): a DDP run can resume from it, and this from DDP's."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        inner = getattr(optimizer, "_optimizer", optimizer)
        if not inner.state:  # not stepped yet: torch's helper would take a zero step (AdamW's count then 1)
            return inner.state_dict()  # hyperparameters only, no tensors to gather
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(self.lightning_module, inner, options=options)  # keyed by name
        if not state:
            return state
        index = {name: i for i, name in enumerate(self._names(inner))}
        return {"state": {index[name]: value for name, value in state["state"].items()},
                "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                                 for group in state["param_groups"]]}

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True)  # every process read the whole file
        for optimizer, state in zip(self.optimizers, checkpoint.get("optimizer_states", [])):
            inner = getattr(optimizer, "_optimizer", optimizer)
            if not state["state"]:  # saved before its first step: torch's helper would take a zero step
                inner.load_state_dict(state)
                continue
            names = self._names(inner)
            by_name = {"state": {names[i]: value for i, value in state["state"].items()},
                       "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                        for group in state["param_groups"]]}
            set_optimizer_state_dict(self.lightning_module, inner, optim_state_dict=by_name, options=options)

    def _names(self, optimizer) -> list[str]:
        """The names of `optimizer`'s parameters in its own order (that of `state_dict()`'s indices)."""
        name_of = {id(p): name for name, p in self.lightning_module.named_parameters()}
        return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
