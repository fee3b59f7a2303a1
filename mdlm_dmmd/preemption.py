"""What a training run saves when it is stopped: `checkpoints/crash.ckpt`.

A SIGTERM (a cluster's preemption or time limit) stops the run after an optimizer step that every
process has reached (`StopOnSigterm`), where all of them can write crash.ckpt together; with
several processes, that is the only way a checkpoint can be gathered safely when a run stops.

Why not Lightning's own SIGTERM handling: its handler broadcasts from inside the signal handler,
and a process that takes the signal while it waits in another collective (a checkpoint's barrier,
a gradient all-reduce) pairs the broadcast with that collective. Measured (2 DDP processes under
torchrun, lightning 2.6): the processes hung until torchrun killed them 30 s later, without a
crash.ckpt. Its other checks (in validation, at the end of a step or epoch) act on one process's
signal alone, where the others may be elsewhere. Lightning still registers its handler first: a
signal between that and the sanity check or the start of training (its first barrier, the data's
setup) meets it. Lightning (2.6 here, since its PR #20825) also broadcasts its own, now always
unset, SIGTERM flag at every training batch with several processes: a host sync per step on
GPUs, with no public way to turn it off (lightning issue 21487).
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException


class StoppedTogether(SIGTERMException):
    """Raised by `StopOnSigterm` in every process at the same point (Lightning's own
    `SIGTERMException` may come from one process alone)."""


class StopOnSigterm(L.Callback):
    """After a SIGTERM, raise `StoppedTogether` in every process after the same optimizer step.

    The handler only notes the signal, passes it to processes Lightning started itself (as
    Lightning's does) and calls a handler that was there before the run. At the end of each
    training batch that took an optimizer step, the processes learn whether any of them was
    signalled: each such step starts a MAX all-reduce of its flag and reads the one the step before
    started, so they all stop after the same step, within two steps of the signal, with no wait for
    each other (on a GPU, the flag is read through an event: no wait for the step's kernels either).
    One process stops after the step in progress. Validations and periodic checkpoints due before
    that still run. A signal in the last steps, or in the last validation, stops the run at its end
    (raised from this `on_train_end`, before later ones), so a SIGTERM during training always ends
    in crash.ckpt and exit status 143."""

    def __init__(self):
        self.signalled = False
        self._step = None
        self._pending = None  # reads the all-reduce started at the previous step
        self._before = None  # the SIGTERM handler before the run's

    def setup(self, trainer, pl_module, stage):
        # before Lightning registers its handler (in `Trainer._run`): what was there is chained
        self.signalled, self._step, self._pending = False, None, None
        before = signal.getsignal(signal.SIGTERM)
        self._before = before if callable(before) else None

    def on_sanity_check_start(self, trainer, pl_module):
        self._install(trainer)

    def on_train_start(self, trainer, pl_module):
        self._install(trainer)
        self._step = trainer.global_step

    def _install(self, trainer) -> None:
        """Replace Lightning's handler until its teardown restores the handlers it found."""
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers are the main thread's (Lightning registers none either)
        self.signalled = self.signalled or trainer.received_sigterm  # caught by Lightning's before this
        launcher, before = trainer.strategy.launcher, self._before

        def note(signum, frame):
            if not self.signalled and launcher is not None:
                launcher.kill(signum)  # processes started by Lightning (trainer.devices=N without torchrun)
            self.signalled = True
            if before is not None:
                before(signum, frame)

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
            raise StoppedTogether()

    def on_train_end(self, trainer, pl_module):
        self._collect()  # every process started the same all-reduces: finish the last one
        if trainer.world_size > 1:
            stop = self._start(trainer.strategy.root_device)()  # once per run: a signal since the last step
        else:
            stop = self.signalled
        if stop:
            raise StoppedTogether()

    def _start(self, device: torch.device):
        """Start the MAX all-reduce of this process's flag; returns what reads its result."""
        flag = torch.full((1,), int(self.signalled), device=device)  # a fill, no copy from the host
        work = torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, async_op=True)
        if device.type != "cuda":
            def read():
                work.wait()
                return bool(flag.item())
            return read
        work.wait()  # NCCL: the device's stream waits for it, not the host
        copy = flag.to("cpu", non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(device))

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

    With several processes, only when `StopOnSigterm` stopped the run: then every process stopped
    at the same point and can gather the checkpoint. An error (or a Ctrl-C, or Lightning's own
    SIGTERM exception) may be in one process alone, leaving the others inside their own
    collectives, where the checkpoint's would meet them mismatched (a hang on NCCL; under gloo
    measured once to pair a barrier with a gradient all-reduce); `last.ckpt` is then the latest
    state."""

    def __init__(self, directory: Path):
        self.directory = directory

    def on_exception(self, trainer, pl_module, exception):
        if trainer.world_size > 1 and not isinstance(exception, StoppedTogether):
            print(f"rank {trainer.global_rank}: no crash.ckpt: the run has several processes and this error may be "
                  f"in one of them only (a SIGTERM stops them all together, with a crash.ckpt); "
                  f"resume from {self.directory / 'last.ckpt'}", file=sys.stderr, flush=True)
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(str(self.directory / "crash.ckpt"))
