"""Loader worker processes that outlive a cluster's SIGTERM until training has stopped.

torchrun and SLURM signal every process of a job, DataLoader workers too. A worker killed by it
made training raise "DataLoader worker exited unexpectedly" wherever it was, where the run should
stop after an optimizer step agreed by every process (`preemption.py`). So a worker of a
`WorkerLoader` ignores SIGTERM while its training process runs, and obeys it once that process has
begun to exit (a shared flag set by an `atexit` hook, which runs before multiprocessing's own
terminate-then-join of its children) or is gone. At that exit the hook also ends, after a
deadline, any worker still alive, so that nothing can be joined for ever.

What it covers: the fork start method, which `WorkerLoader` picks on Linux (Python 3.14's default,
forkserver, has a server process that the signal kills, and a new interpreter starts with SIGTERM
unblocked). Workers start with SIGTERM blocked, inherited from the thread that forks them, until
their handler is in place (one signalled while starting up died of torch's own handler). A
training process that is itself a multiprocessing child (Lightning's `ddp_spawn`, `ddp_fork`)
leaves multiprocessing's exit before any `atexit` hook: its workers obey SIGTERM as before. A
`worker_init_fn` of one's own replaces this one (and with it the protection), and Lightning's
per-rank worker seeding, which any `worker_init_fn` turns off: the bundled datasets draw nothing
in their workers.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import os
import signal
import sys
import threading
import time
import weakref
from contextlib import contextmanager

from torch.utils.data import DataLoader

_EXITING = None  # shared with the workers: 1 once this process has begun to exit
_WORKERS: weakref.WeakSet = weakref.WeakSet()  # the worker processes this process started
EXIT_DEADLINE = 5.0  # seconds the workers get to end on SIGTERM at exit, before SIGKILL


class WorkerLoader(DataLoader):
    """A DataLoader whose worker processes ignore a SIGTERM while the training process runs."""

    def __init__(self, *args, **kwargs):
        global _EXITING
        if _EXITING is None:
            _EXITING = multiprocessing.RawValue("b", 0)
            atexit.register(end_workers)
        # Lightning builds the loader again (with a distributed sampler), passing this one's arguments
        kwargs.setdefault("worker_init_fn", functools.partial(_handle_sigterm_in_worker, _EXITING))
        if sys.platform.startswith("linux") and kwargs.get("num_workers", 0) > 0:
            kwargs.setdefault("multiprocessing_context", "fork")
        super().__init__(*args, **kwargs)

    def __iter__(self):
        flag = _flag_of(self.worker_init_fn)
        if flag is not None and multiprocessing.parent_process() is not None:
            flag.value = 1  # no atexit hook runs in a multiprocessing child: workers obey SIGTERM
        with _sigterm_blocked():  # the workers start here (persistent ones on the first pass)
            iterator = super().__iter__()
        _WORKERS.update(getattr(iterator, "_workers", ()))
        return iterator


def end_workers() -> None:
    """At exit: let the workers obey SIGTERM, send it, and SIGKILL those alive after the deadline
    (a worker stuck in C code never runs its Python handler)."""
    if _EXITING is not None:
        _EXITING.value = 1
    mine = [w for w in list(_WORKERS) if _is_alive(w)]
    if not mine:
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the ended workers
    for worker in mine:
        worker.terminate()
    deadline = time.monotonic() + EXIT_DEADLINE
    for worker in mine:
        worker.join(max(0.0, deadline - time.monotonic()))
    for worker in mine:
        if _is_alive(worker):
            worker.kill()
            worker.join(1.0)


def _is_alive(worker) -> bool:
    try:
        return worker.is_alive()
    except (AssertionError, ValueError):  # a process another process started (inherited by fork), or closed
        return False


def _flag_of(init_fn):
    if isinstance(init_fn, functools.partial) and init_fn.func is _handle_sigterm_in_worker:
        return init_fn.args[0]
    return None


def _handle_sigterm_in_worker(exiting, worker_id: int) -> None:
    parent = os.getppid()

    def handler(signum, frame):
        if exiting.value or os.getppid() != parent:  # the training process exits, or is gone
            os._exit(0)  # quietly, as torch's workers leave when their loader asks

    signal.signal(signal.SIGTERM, handler)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


@contextmanager
def _sigterm_blocked():
    """SIGTERM held back in this thread (and so in the processes it forks) inside the block."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
