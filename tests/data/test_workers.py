"""Loader workers outlive a SIGTERM sent to every process of a job (torchrun, SLURM) while the
training process runs, and end at its exit: on SIGTERM, or by SIGKILL after a deadline."""

import multiprocessing
import os
import signal
import sys
import time

import pytest
import torch

import mdlm_dmmd.data.workers as workers
from mdlm_dmmd.data import DataBundle, ResumableLoader, TokenDataset, make_loaders

ROWS = 16


def rows(n: int = ROWS) -> TokenDataset:
    return TokenDataset(torch.arange(n)[:, None].repeat(1, 2))


def first_column(batch) -> list[int]:
    return batch["input_ids"][:, 0].tolist()


@pytest.fixture
def exiting_flag_restored():
    yield
    if workers._EXITING is not None:
        workers._EXITING.value = 0


def test_a_worker_outlives_a_sigterm_and_ends_at_exit(exiting_flag_restored):
    expected = [first_column(b) for b in ResumableLoader(rows(), batch_size=4)]
    it = iter(ResumableLoader(rows(), batch_size=4, num_workers=1))
    assert first_column(next(it)) == expected[0]
    (worker,) = multiprocessing.active_children()
    os.kill(worker.pid, signal.SIGTERM)
    time.sleep(0.5)
    assert worker.is_alive()
    assert first_column(next(it)) == expected[1]  # the pass goes on
    workers.end_workers()  # what the atexit hook does
    assert not worker.is_alive() and worker.exitcode == 0  # ended on SIGTERM, quietly
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


class Deaf(TokenDataset):
    """A worker that no longer runs the handler (as one stuck in C code)."""

    def __getitem__(self, index):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return super().__getitem__(index)


def test_a_worker_that_ignores_the_sigterm_at_exit_is_killed_after_the_deadline(monkeypatch, exiting_flag_restored):
    monkeypatch.setattr(workers, "EXIT_DEADLINE", 0.5)
    it = iter(ResumableLoader(Deaf(torch.zeros(8, 2, dtype=torch.long)), batch_size=4, num_workers=1))
    next(it)
    (worker,) = multiprocessing.active_children()
    started = time.monotonic()
    workers.end_workers()
    assert not worker.is_alive() and worker.exitcode == -signal.SIGKILL and time.monotonic() - started < 5


def test_the_fork_start_method_on_linux_where_workers_run():
    loader = ResumableLoader(rows(), batch_size=4, num_workers=1)
    if sys.platform.startswith("linux"):
        assert loader.multiprocessing_context.get_start_method() == "fork"
    assert ResumableLoader(rows(), batch_size=4).multiprocessing_context is None  # no workers: none


def test_in_a_multiprocessing_child_the_workers_obey_sigterm(monkeypatch, exiting_flag_restored):
    """No atexit hook runs at a multiprocessing child's exit (Lightning's ddp_spawn, ddp_fork):
    its workers must not ignore the terminate that multiprocessing's exit sends them."""
    monkeypatch.setattr(multiprocessing, "parent_process", lambda: object())
    loader = ResumableLoader(rows(), batch_size=4)
    next(iter(loader))
    assert workers._flag_of(loader.worker_init_fn).value == 1


def test_a_worker_whose_training_process_is_gone_obeys_sigterm(monkeypatch):
    """An orphan (its training process killed by SIGKILL, e.g. by the OOM killer) can be ended
    by an ordinary kill. Run here in this process, with os._exit and getppid stood in for."""
    class Exited(Exception):
        pass

    def exit_(code):
        raise Exited(code)

    before = signal.getsignal(signal.SIGTERM)
    flag = multiprocessing.RawValue("b", 0)
    try:
        monkeypatch.setattr(os, "_exit", exit_)
        workers._handle_sigterm_in_worker(flag, 0)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)  # ignored: the training process runs
        monkeypatch.setattr(os, "getppid", lambda: -1)  # re-parented
        with pytest.raises(Exited):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    finally:
        signal.signal(signal.SIGTERM, before)


def test_workers_start_with_sigterm_held_back(monkeypatch):
    """A worker signalled before its handler is in place died of torch's own handler (measured:
    2 of 25 runs under load): workers start with SIGTERM blocked, inherited from the thread that
    forks them, and unblock it once the handler is in place."""
    from torch.utils.data import DataLoader

    masks = []
    monkeypatch.setattr(DataLoader, "__iter__", lambda self: masks.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))
                        or iter([]))
    bundle = DataBundle(rows(), rows(8), vocab_size=ROWS, tokenizer=None, modality="image", bos_id=None, eos_id=None)
    iter(make_loaders(bundle, batch_size=4, eval_batch_size=4)[1])  # the validation loader
    assert len(masks) == 1 and signal.SIGTERM in masks[0]
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # restored after
