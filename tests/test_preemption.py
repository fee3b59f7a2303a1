"""SIGTERM (a cluster's preemption or time limit) during training: crash.ckpt holds the state,
the process exits with 128 + SIGTERM, not 0 (a job chain would take 0 for a finished run), and
the run resumes from crash.ckpt; with several processes (DDP, FSDP) all stop after the same step
and write it together. An error in one of several processes writes no crash.ckpt (no hang)."""

import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mdlm_dmmd.preemption import SaveOnCrash, StopOnSigterm, StoppedTogether

ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
           OMP_NUM_THREADS="1")
RUN = ["algo=mdlm", "data=digits", "debug=cpu", "sampling.num_samples=0", "trainer.val_check_interval=2"]


def test_sigterm_saves_crash_ckpt_exits_nonzero_and_resumes(tmp_path):
    """The signal goes to the whole process group, as torchrun and SLURM send it, loader workers
    included (a worker killed by it used to stop training wherever it was)."""
    run = tmp_path / "run"
    training = subprocess.Popen([sys.executable, "-m", "mdlm_dmmd", *RUN, "loader.num_workers=1",
                                 "trainer.max_steps=100000", f"run_dir={run}"], cwd=tmp_path, env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    started = time.time()
    while not (run / "checkpoints" / "step2.ckpt").exists() and training.poll() is None and time.time() - started < 120:
        time.sleep(0.1)
    os.killpg(training.pid, signal.SIGTERM)
    _, err = training.communicate(timeout=120)
    crash = run / "checkpoints" / "crash.ckpt"
    assert training.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert f"training stopped by SIGTERM; resume with checkpoint={crash}" in err
    assert "exited unexpectedly" not in err
    stopped_at = torch.load(crash, map_location="cpu", weights_only=False)["global_step"]
    assert stopped_at >= 2

    resumed = subprocess.run([sys.executable, "-m", "mdlm_dmmd", *RUN, f"trainer.max_steps={stopped_at + 2}",
                              f"run_dir={run}", f"checkpoint={crash}"], cwd=tmp_path, env=ENV, capture_output=True,
                             text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert torch.load(run / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=False)["global_step"] == stopped_at + 2


DDP = ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
FSDP = ["trainer.strategy=fsdp", "trainer.devices=2", "trainer.accelerator=cpu"]
QUIET = ["model.dropout=0.0", "loader.batch_size=4"]


def torchrun(*args, cwd, **popen):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mdlm_dmmd", *args]
    return subprocess.Popen(command, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def preempt(run, *args, cwd) -> tuple[int, str]:
    """Start a 2-process torchrun training, SIGTERM torchrun (which passes it to both processes, as a
    cluster does) once step2.ckpt exists; (the step crash.ckpt holds, stderr)."""
    training = torchrun(*RUN, *QUIET, *args, "trainer.max_steps=100000", f"run_dir={run}", cwd=cwd)
    started = time.time()
    while not (run / "checkpoints" / "step2.ckpt").exists() and training.poll() is None and time.time() - started < 120:
        time.sleep(0.1)
    training.send_signal(signal.SIGTERM)
    _, err = training.communicate(timeout=120)
    crash = run / "checkpoints" / "crash.ckpt"
    assert crash.is_file(), err[-3000:]
    return torch.load(crash, map_location="cpu", weights_only=False)["global_step"], err


def test_sigterm_stops_every_ddp_process_after_the_same_step_and_the_run_resumes_exactly(tmp_path):
    """Lightning's own handler broadcast from inside the signal handler and hung here for 30 s,
    until torchrun killed both processes without a crash.ckpt. Now each process stops after the
    same step (its loader worker, signalled too, goes on until then), crash.ckpt is written, and
    resuming from it ends where an uninterrupted run does."""
    stopped_at, err = preempt(tmp_path / "run", *DDP, "loader.num_workers=1", cwd=tmp_path)  # workers signalled too
    assert all(f"rank {rank}: training stopped by SIGTERM" in err for rank in (0, 1))
    assert stopped_at >= 2
    for name, extra in (("run", [f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'crash.ckpt'}"]), ("straight", [])):
        finished = torchrun(*RUN, *QUIET, *DDP, f"trainer.max_steps={stopped_at + 2}", f"run_dir={tmp_path / name}",
                            *extra, cwd=tmp_path)
        _, err = finished.communicate(timeout=240)
        assert finished.returncode == 0, err[-3000:]
    resumed, straight = (torch.load(tmp_path / name / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=False)
                         for name in ("run", "straight"))
    assert resumed["global_step"] == straight["global_step"] == stopped_at + 2
    for part in ("state_dict", "ema", "optimizer_states"):  # weights, EMA, AdamW's moments and step counts
        assert same(resumed[part], straight[part]), part


def same(a, b) -> bool:
    """Equal, tensors bit for bit, through dicts and lists."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def test_sigterm_writes_a_crash_ckpt_under_fsdp_too(tmp_path):
    """The sharded checkpoint is gathered from every process: possible because all stopped together."""
    stopped_at, err = preempt(tmp_path / "run", *FSDP, cwd=tmp_path)
    assert stopped_at >= 2 and "no crash.ckpt" not in err


CRASH = """import sys
from mdlm_dmmd.algos.base import AlgoBase
from mdlm_dmmd.cli import entry
step = AlgoBase.training_step
def failing(self, batch, batch_idx):
    if self.trainer.global_rank == 1 and self.trainer.global_step == 2:
        raise RuntimeError("injected failure on one process")
    return step(self, batch, batch_idx)
AlgoBase.training_step = failing
entry()
"""


@pytest.mark.parametrize("strategy", [DDP, FSDP], ids=["ddp", "fsdp"])
def test_a_process_failing_alone_ends_the_run_without_a_crash_checkpoint(tmp_path, strategy):
    """A checkpoint is gathered from every process; the healthy one is inside its own collectives.
    The run ends (no hang), says why there is no crash.ckpt, and last.ckpt stays. Before, under DDP,
    the failing process's save met the other's gradient all-reduce (gloo paired them) and a
    crash.ckpt appeared by chance; on NCCL that is a hang."""
    (tmp_path / "crash.py").write_text(CRASH)
    run = subprocess.run([sys.executable, str(tmp_path / "crash.py"), "algo=mdlm", "data=digits", "debug=cpu", *QUIET,
                          "sampling.num_samples=0", "trainer.max_steps=4", "trainer.val_check_interval=1", *strategy,
                          f"run_dir={tmp_path / 'run'}"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                         timeout=240)
    assert run.returncode != 0 and "injected failure" in run.stderr
    assert "rank 1: no crash.ckpt: the run has several processes" in run.stderr
    assert not (tmp_path / "run" / "checkpoints" / "crash.ckpt").exists()
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 2


class FakeTrainer:
    """What the callbacks read of a Lightning trainer."""

    def __init__(self, world_size=1, launcher=None, received_sigterm=False):
        self.world_size, self.global_rank, self.global_step = world_size, 0, 0
        self.received_sigterm = received_sigterm  # Lightning's handler's, before this callback's
        self.strategy = SimpleNamespace(launcher=launcher, root_device=torch.device("cpu"))
        self.saved = []

    def save_checkpoint(self, path):
        self.saved.append(path)


class Launcher:
    def __init__(self):
        self.killed = []

    def kill(self, signum):
        self.killed.append(signum)


def batch_end(callback, trainer, step):
    trainer.global_step = step
    callback.on_train_batch_end(trainer, None, None, None, 0)


def started(callback, trainer):
    """`setup` (before Lightning registers its handler), then `on_train_start`; the process's own
    handler comes back at the end of the test (as Lightning's teardown restores it)."""
    callback.setup(trainer, None, "fit")
    callback.on_train_start(trainer, None)


@pytest.fixture(autouse=True)
def sigterm_handler_kept():
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


def test_the_handler_only_notes_the_signal_passes_it_on_and_chains_the_one_before():
    launcher, earlier = Launcher(), []
    signal.signal(signal.SIGTERM, lambda signum, frame: earlier.append(signum))  # e.g. a cluster library's
    callback = StopOnSigterm()
    started(callback, FakeTrainer(launcher=launcher))
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)  # Python runs handlers between bytecodes
    assert callback.signalled and launcher.killed == [signal.SIGTERM]  # passed on to Lightning's processes once
    assert earlier == [signal.SIGTERM, signal.SIGTERM]


def test_a_signal_lightnings_handler_caught_before_training_is_kept():
    callback = StopOnSigterm()
    started(callback, FakeTrainer(received_sigterm=True))
    assert callback.signalled


def test_one_process_stops_at_the_first_optimizer_step_after_the_signal():
    trainer, callback = FakeTrainer(), StopOnSigterm()
    started(callback, trainer)
    batch_end(callback, trainer, 1)
    callback.signalled = True
    batch_end(callback, trainer, 1)  # a micro-batch inside an accumulation window: its gradients would be lost
    with pytest.raises(StoppedTogether):
        batch_end(callback, trainer, 2)


def test_a_signal_after_the_last_step_stops_the_run_at_its_end():
    """A SIGTERM in the last validation is not lost: the run ends in crash.ckpt and status 143."""
    trainer, callback = FakeTrainer(), StopOnSigterm()
    started(callback, trainer)
    callback.on_train_end(trainer, None)  # no signal: nothing
    callback.signalled = True
    with pytest.raises(StoppedTogether):
        callback.on_train_end(trainer, None)


def _decide_one_step_late(results):
    """Several processes decide one step after the signal, from the all-reduce started the step
    before (here a group of 1 process standing in for 2: the reduction's result is the flag)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{results['folder']}/group", rank=0, world_size=1)
    try:
        trainer, callback = FakeTrainer(world_size=2), StopOnSigterm()
        started(callback, trainer)
        batch_end(callback, trainer, 1)
        callback.signalled = True
        batch_end(callback, trainer, 2)  # the all-reduce read here started before the signal
        results["late"] = "went on"
        try:
            batch_end(callback, trainer, 3)
        except StoppedTogether:
            results["late"] = "stopped one step after"
        results["pending"] = callback._pending is None  # stopping starts no all-reduce
        ended = FakeTrainer(world_size=2)
        quiet, late = StopOnSigterm(), StopOnSigterm()
        for callback in (quiet, late):
            started(callback, ended)
            batch_end(callback, ended, 1)  # an all-reduce left running at the end
        quiet.on_train_end(ended, None)
        late.signalled = True  # after the last step's all-reduce started
        try:
            late.on_train_end(ended, None)
        except StoppedTogether:
            results["end"] = "stopped at the end"
    finally:
        torch.distributed.destroy_process_group()


def test_several_processes_decide_one_step_after_the_signal(tmp_path):
    results = mp.Manager().dict(folder=str(tmp_path))
    process = mp.get_context("spawn").Process(target=_decide_one_step_late, args=(results,))
    process.start()
    process.join(60)
    assert results.get("late") == "stopped one step after" and results.get("pending") is True
    assert results.get("end") == "stopped at the end"


def test_crash_ckpt_with_several_processes_only_after_a_stop_they_agreed_on(tmp_path, capsys):
    """An error in one of several processes: no collective save (the others are elsewhere); nor
    Lightning's own SIGTERM exception, which may come from one process. After `StopOnSigterm`
    stopped them all at the same point, they save together. One process: always."""
    several, one = FakeTrainer(world_size=2), FakeTrainer()
    save = SaveOnCrash(tmp_path)
    save.on_exception(several, None, RuntimeError("out of memory on one GPU"))
    save.on_exception(several, None, SIGTERMException())
    assert several.saved == [] and capsys.readouterr().err.count("no crash.ckpt") == 2
    save.on_exception(several, None, StoppedTogether())
    save.on_exception(one, None, RuntimeError("any error"))
    assert several.saved == one.saved == [str(tmp_path / "crash.ckpt")]
