"""What a training run saves when it is stopped: `checkpoints/crash.ckpt`.

A SIGTERM (a cluster's preemption or time limit) stops the run after an optimizer step that every
process has reached (`StopOnSigterm`), where all of them can write crash.ckpt together; with
several processes, that is the only way a checkpoint can be gathered safely when a run stops.

Why not Lightning's own SIGTERM handling: its handler broadcasts from inside the signal handler,
and a process that takes the signal while it waits in another collective (a checkpoint's barrier,
a gradient all-reduce) pairs the broadcast with that collective. Measured (2 DDP processes under
torchrun, lightning 2.6): the processes hung until torchrun killed them 30 s later, without a
crash.ckpt. Its other checks (in validation, at the end of a step or epoch) act on one process's
signal alone, where the others may be elsewhere.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException


class StopOnSigterm(L.Callback):
    """After a SIGTERM, raise `SIGTERMException` in every process at the same optimizer step.

    The handler only notes the signal (and passes it to processes Lightning started itself, as
    Lightning's does). At the end of each training batch that took an optimizer step, the processes
    learn whether any of them was signalled: each step starts a MAX all-reduce of its flag and reads
    the one the step before started, so the decision costs no wait and no host sync, comes one step
    after the signal, and is the same in every process. One process decides alone, at once. A
    signal during validation is acted on after it, at the next step."""

    def __init__(self):
        self.signalled = False
        self._step = None
        self._pending = None  # reads the all-reduce started at the previous step

    def on_train_start(self, trainer, pl_module):
        # after Lightning registered its handler (in `Trainer._run`), which this replaces until
        # Lightning restores the handlers it found, at its teardown
        self.signalled, self._step, self._pending = False, trainer.global_step, None
        launcher = trainer.strategy.launcher

        def note(signum, frame):
            if not self.signalled and launcher is not None:
                launcher.kill(signum)  # processes started by Lightning (trainer.devices=N without torchrun)
            self.signalled = True

        signal.signal(signal.SIGTERM, note)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self._step:
            return  # inside an accumulation window: its gradients are in no checkpoint
        self._step = trainer.global_step
        if trainer.world_size == 1:
            stop = self.signalled
        else:
            stop = self._collect()
            if not stop:
                self._pending = self._start(trainer.strategy.root_device)
        if stop:
            raise SIGTERMException()

    def on_train_end(self, trainer, pl_module):
        self._collect()  # every process started the same all-reduces: finish the last one

    def _start(self, device: torch.device):
        """Start the MAX all-reduce of this process's flag; returns what reads its result."""
        flag = torch.tensor([int(self.signalled)], device=device)
        work = torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, async_op=True)
        if device.type != "cuda":
            def read():
                work.wait()
                return bool(flag.item())
            return read
        work.wait()  # NCCL: the device's stream waits for it, not the host
        copy = flag.to("cpu", non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()

        def read_copy():  # untested: no GPU was lent
            copied.synchronize()
            return bool(copy.item())
        return read_copy

    def _collect(self) -> bool:
        """The decision started a step ago (False if none): by now long finished, so reading it
        waits neither for the other processes nor for this step's work on the device."""
        read, self._pending = self._pending, None
        return False if read is None else read()


class SaveOnCrash(L.Callback):
    """Write `checkpoints/crash.ckpt` when training raises (including Ctrl-C): nothing is lost.

    With several processes, only when the run was stopped by a SIGTERM: then every process
    stopped after the same step (`StopOnSigterm`) and can gather the checkpoint. An error in one
    process leaves the others inside their own collectives, where the checkpoint's would meet
    them mismatched (a hang on NCCL; under gloo measured once to pair a barrier with a gradient
    all-reduce); `last.ckpt` is then the latest state."""

    def __init__(self, directory: Path):
        self.directory = directory

    def on_exception(self, trainer, pl_module, exception):
        if trainer.world_size > 1 and not isinstance(exception, SIGTERMException):
            print(f"rank {trainer.global_rank}: no crash.ckpt: the run has several processes and this error may be "
                  f"in one of them only (a SIGTERM stops them all after one step, with a crash.ckpt); "
                  f"resume from {self.directory / 'last.ckpt'}", file=sys.stderr, flush=True)
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(str(self.directory / "crash.ckpt"))
