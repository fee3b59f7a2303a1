"""Which process this is, and sampling work shared between processes outside Lightning.

Lightning starts and joins the processes of a fit (`trainer.strategy=ddp`). The modes that only
sample and score (`sample`, `eval`, `sweep`) run outside Lightning: started by `torchrun`, they
join the process group here (`join`), each process draws its share of the sample batches
(`Ranks.mine`; batch b is drawn from its own seed, so the samples do not depend on the number of
processes), the batches are gathered on rank 0 (`Ranks.gather`), which alone scores and writes.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch


def current() -> tuple[int, int]:
    """(rank, number of processes) of the default torch.distributed group; (0, 1) without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass(frozen=True)
class Ranks:
    """Process `rank` of `world` sharing a sampling job; `Ranks()` is a single process."""

    rank: int = 0
    world: int = 1

    @property
    def writer(self) -> bool:
        """Whether this process scores and writes (rank 0)."""
        return self.rank == 0

    def mine(self, count: int) -> range:
        """The indices (of `count` batches) this process draws: rank, rank + world, ..."""
        return range(self.rank, count, self.world)

    def gather(self, pieces: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Every process's {index: tensor}, merged on rank 0 (tensors on the CPU); the other
        processes get {}: they only help sample, and 50K samples held by every process would be
        memory spent for nothing."""
        pieces = {index: piece.cpu() for index, piece in pieces.items()}
        if self.world == 1:
            return pieces
        everyone: list | None = [None] * self.world if self.writer else None
        torch.distributed.gather_object(pieces, everyone, dst=0)
        if everyone is None:
            return {}
        return {index: piece for share in everyone for index, piece in share.items()}

    def total(self, value: int) -> int:
        """`value` summed over the processes (e.g. a count of re-drawn samples)."""
        if self.world == 1:
            return int(value)
        everyone: list = [None] * self.world
        torch.distributed.all_gather_object(everyone, int(value))
        return sum(everyone)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def local_rank() -> int:
    """This process's rank on its machine: torchrun's LOCAL_RANK, SLURM's SLURM_LOCALID, else 0."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def launched() -> int:
    """How many processes the launcher started (torchrun's WORLD_SIZE; 1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


# Rank 0 scores a row alone (a 50K-sample FID or gen-PPL can take hours) while the others wait
# in the next row's gather: the collectives must not time out meanwhile.
WAIT = datetime.timedelta(hours=24)
_joined = False  # whether `join` started the process group (Lightning's own fits are not ours to end)


def join(device: str | torch.device) -> Ranks:
    """Under `torchrun` (WORLD_SIZE > 1) join the default process group once and say which
    process this is; a single process joins nothing. gloo on any device: only gathers of CPU
    tensors and barriers run here (no NCCL, whose watchdog would stop a long wait), each GPU
    process on its own device (`local_device`)."""
    global _joined
    dist = torch.distributed
    if launched() > 1 and not dist.is_initialized():
        if torch.device(device).type == "cuda":
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("gloo", timeout=WAIT)
        _joined = True
    return Ranks(*current())


def leave() -> None:
    """After a mode that joined: wait until every process is done (rank 0 may still be scoring
    and writing), then end the group together; a process that exits while another still uses
    the group aborts in gloo's threads."""
    global _joined
    if _joined and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    _joined = False


def hold() -> "torch.distributed.ProcessGroup | None":
    """Right after a multi-process fit, on every process: a gloo group with the long timeout
    `WAIT`, on which the others wait while rank 0 alone samples and writes (`release`); a
    process that exits while another still holds the group can abort in gloo's threads. None
    with one process."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return dist.new_group(backend="gloo", timeout=WAIT)


def release(group: "torch.distributed.ProcessGroup | None") -> None:
    """Every process: wait until all are here (rank 0 when it is done), then end every group."""
    if group is None:
        return
    torch.distributed.barrier(group=group)
    torch.distributed.destroy_process_group()


def local_device(device: str) -> str:
    """`cuda` → this process's GPU (`cuda:<local rank>`, `local_rank`) when a launcher started
    several processes; `cuda:0` where each process sees one GPU only (SLURM's --gpus-per-task,
    or CUDA_VISIBLE_DEVICES set per process)."""
    if device == "cuda" and launched() > 1:
        return f"cuda:{local_rank() if torch.cuda.device_count() > 1 else 0}"
    return device
