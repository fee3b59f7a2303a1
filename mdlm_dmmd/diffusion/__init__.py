"""Forward processes, schedules and samplers: pure tensor code, no networks or training."""

from __future__ import annotations

from mdlm_dmmd.diffusion.masked import MaskedProcess
from mdlm_dmmd.diffusion.process import Process, missing_members
from mdlm_dmmd.diffusion.schedules import schedule_from_meta
from mdlm_dmmd.diffusion.uniform import UniformProcess
from mdlm_dmmd.errors import UserError

__all__ = ["MaskedProcess", "UniformProcess", "Process", "missing_members", "process_from_meta", "PROCESSES"]

PROCESSES = ("masked", "uniform")  # the names `meta()` writes; a process is used only through `Process`


def process_from_meta(meta: dict, network_vocab: int, source: str = "checkpoint") -> tuple[Process, bool]:
    """(process, time_conditioning) recorded in a checkpoint's metadata (`process.meta()`).

    Public checkpoints without our metadata: MDLM/BD3-LM are masked with the mask as the last
    id and no time conditioning; Duo is uniform over the whole vocabulary and conditioned on σ.
    """
    kind = meta.get("process", "masked")
    if kind not in PROCESSES:
        raise UserError(f"{source}: process '{kind}' is not a diffusion process; accepted: {', '.join(PROCESSES)}")
    if kind == "uniform":
        vocab_size = int(meta.get("vocab_size") or network_vocab)
        schedule = schedule_from_meta(meta, vocab_size, source)
        if getattr(schedule, "vocab_size", vocab_size) != vocab_size:
            raise UserError(f"{source}: schedule vocab_size {schedule.vocab_size} differs from the process's {vocab_size}")
        return UniformProcess(schedule, vocab_size=vocab_size), bool(meta.get("time_conditioning", True))
    schedule = schedule_from_meta(meta, network_vocab - 1, source)
    if schedule.name == "duo":
        raise UserError(f"{source}: schedule 'duo' is uniform-state only but the process is masked; accepted for masked: loglinear")
    process = MaskedProcess(schedule, mask_id=int(meta.get("mask_id", network_vocab - 1)))
    return process, bool(meta.get("time_conditioning", False))
