"""Data parallelism through Lightning on CPU (gloo, 2 processes): every algo on 2 processes
end with the weights of 1 process on the same global batch (every draw is the example's own,
`rng.BatchShare`), the ranks agree (checked by `check_ranks_agree` at the end of every
multi-process fit), and only rank 0 samples and writes.

A 2-process dmmd run stopped after 2 updates and resumed from its last.ckpt ends where an
uninterrupted one does, bit for bit; gradient accumulation works under DDP; mode=sample and
mode=sweep under torchrun share the sample batches and write what one process writes. FSDP:
`tests/test_fsdp.py`; two nodes on one machine: `tests/test_multinode.py`.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from mdlm_dmmd.algos.bd3lm import clip_intervals
from mdlm_dmmd.eval.scoring import generate
from mdlm_dmmd.ranks import Ranks
from mdlm_dmmd.training import check_ranks_agree

ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
           OMP_NUM_THREADS="1")
DDP = ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mdlm_dmmd", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=240)


def weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=False)


def max_difference(a, b) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point())


# Measured: 2.7e-8 (mdlm, 4 steps) and 1.9e-9 (dmmd, 4 updates). The two runs differ only in
# float32 summation order (one mean over 8 rows vs the average of two means over 4), which AdamW
# turns into weight differences of ~1e-8 at these rates; 1e-6 leaves room for other CPUs and BLAS
# while any difference in the draws or the data (those move weights by ~1e-4 per step here) fails.
TOLERANCE = 1e-6


def test_two_processes_train_what_one_process_trains_with_the_same_global_batch(tmp_path):
    one, two = ["loader.batch_size=8"], ["loader.batch_size=4", *DDP]  # 8 rows per step either way
    common = ["data=digits", "debug=cpu", "model.dropout=0.0", "trainer.max_steps=4"]  # dropout: the RNG of the network
    runs = {}
    for name, extra in (("one", one), ("two", two)):
        run = cli("algo=mdlm", *common, *extra, f"run_dir={tmp_path / ('teacher_' + name)}", cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.count("run written to") == 1  # rank 0 alone samples and writes
        runs[name] = weights(tmp_path / f"teacher_{name}")
    assert max_difference(runs["one"]["state_dict"], runs["two"]["state_dict"]) < TOLERANCE

    # dmmd alternates generator and auxiliary updates: plain DDP would fail on the network an
    # update leaves out ("parameters that were not used"); the Alternation averages gradients itself
    teacher = tmp_path / "teacher_one" / "checkpoints" / "final.ckpt"
    for name, extra in (("one", one), ("two", two)):
        run = cli("algo=dmmd", f"algo.teacher={teacher}", *common, *extra, f"run_dir={tmp_path / ('student_' + name)}",
                  cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        runs[name] = weights(tmp_path / f"student_{name}")
    assert runs["two"]["global_step"] == 4 and runs["two"]["distillation"]["micro_step"] == 4
    assert max_difference(runs["one"]["state_dict"], runs["two"]["state_dict"]) < TOLERANCE


def test_the_other_algos_on_two_processes_train_what_one_process_trains(tmp_path):
    """udlm (uniform draws), ar (no draws), sdtt (its teacher's two steps draw per example, and the
    round swap at step 2 happens on both processes alike) and idlm (alternating manual updates,
    re-noised x̂ drawn per example). Measured: see TOLERANCE."""
    common = ["data=digits", "debug=cpu", "model.dropout=0.0", "sampling.num_samples=0"]
    teacher = cli("algo=mdlm", *common, "trainer.max_steps=2", "loader.batch_size=8", f"run_dir={tmp_path / 'teacher'}",
                  cwd=tmp_path)
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    teacher = tmp_path / "teacher" / "checkpoints" / "final.ckpt"
    algos = {"udlm": ["algo=udlm"], "ar": ["algo=ar"],
             "sdtt": ["algo=sdtt", f"algo.teacher={teacher}", "algo.initial_steps=16", "algo.final_steps=4",
                      "algo.steps_per_round=2"],
             "idlm": ["algo=idlm", f"algo.teacher={teacher}", "algo.lr_generator=1e-3", "algo.lr_fake=1e-3"]}
    for algo, overrides in algos.items():
        runs = {}
        for name, extra in (("one", ["loader.batch_size=8"]), ("two", ["loader.batch_size=4", *DDP])):
            run = cli(*overrides, *common, "trainer.max_steps=4", *extra, f"run_dir={tmp_path / (algo + name)}",
                      cwd=tmp_path)
            assert run.returncode == 0, run.stderr[-3000:]
            runs[name] = weights(tmp_path / (algo + name))
        assert runs["two"]["global_step"] == runs["one"]["global_step"] > 0
        difference = max_difference(runs["one"]["state_dict"], runs["two"]["state_dict"])
        assert difference < TOLERANCE, algo


def test_gradient_accumulation_on_two_processes(tmp_path):
    """Accumulating 2 micro-batches of 2 rows on each of 2 processes = 2 micro-batches of 4 rows on
    one: Lightning's accumulation (mdlm) and the Alternation's own (dmmd: micro-steps counted per
    process, gradients averaged once per update)."""
    common = ["data=digits", "debug=cpu", "model.dropout=0.0", "sampling.num_samples=0", "trainer.max_steps=3",
              "trainer.accumulate_grad_batches=2"]
    setups = (("one", ["loader.batch_size=4"]), ("two", ["loader.batch_size=2", *DDP]))
    teacher = tmp_path / "mdlm_one" / "checkpoints" / "final.ckpt"
    for algo, overrides in (("mdlm", ["algo=mdlm"]), ("dmmd", ["algo=dmmd", f"algo.teacher={teacher}"])):
        runs = {}
        for name, extra in setups:
            run = cli(*overrides, *common, *extra, f"run_dir={tmp_path / f'{algo}_{name}'}", cwd=tmp_path)
            assert run.returncode == 0, run.stderr[-3000:]
            runs[name] = weights(tmp_path / f"{algo}_{name}")
        assert runs["two"]["global_step"] == runs["one"]["global_step"] == 3
        assert max_difference(runs["one"]["state_dict"], runs["two"]["state_dict"]) < TOLERANCE, algo
    assert runs["two"]["distillation"]["micro_step"] == 6  # 3 updates of 2 micro-batches


def test_padded_rows_are_weighted_as_on_one_process(tmp_path):
    """Rows of different lengths (padding): each process counts other numbers of tokens; dividing
    by the processes' mean count keeps the loss the global mean (measured 1.5e-8; dividing by each
    process's own count gave 3.4e-4)."""
    import random

    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while seven kings sing of old".split()
    (tmp_path / "corpus.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 40)))
                                                      for _ in range(300)))
    common = ["algo=mdlm", "data=text_files", f"data.paths=[{tmp_path / 'corpus.txt'}]", "data.wrap=false",
              "data.document=paragraph", f"data.cache_dir={tmp_path / 'cache'}", "model.length=32", "debug=cpu",
              "model.dropout=0.0", "trainer.max_steps=3", "sampling.num_samples=0"]
    for name, extra in (("one", ["loader.batch_size=8"]), ("two", ["loader.batch_size=4", *DDP])):
        run = cli(*common, *extra, f"run_dir={tmp_path / name}", cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
    assert max_difference(weights(tmp_path / "one")["state_dict"], weights(tmp_path / "two")["state_dict"]) < TOLERANCE


def test_block_diffusion_on_two_processes_trains_what_one_process_trains(tmp_path):
    common = ["algo=bd3lm", "block_size=16", "data=digits", "debug=cpu", "model.dropout=0.0", "trainer.max_steps=3",
              "sampling.num_samples=0"]
    for name, extra in (("one", ["loader.batch_size=8"]), ("two", ["loader.batch_size=4", *DDP])):
        run = cli(*common, *extra, f"run_dir={tmp_path / name}", cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
    # measured 6e-8: t per (sequence, block) stratified over the global batch, as on one process
    assert max_difference(weights(tmp_path / "one")["state_dict"], weights(tmp_path / "two")["state_dict"]) < TOLERANCE
    # BD3-LM's clip search: each process validates its own shard; the spreads are summed over the
    # processes, so both move to the same interval (else check_ranks_agree stops the run)
    run = cli(*common, "loader.batch_size=4", *DDP, "algo.clip_search_widths=[0.3,1.0]", "trainer.max_steps=4",
              f"run_dir={tmp_path / 'clip'}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    saved = weights(tmp_path / "clip")
    config = saved["hyper_parameters"]["config"]
    candidates = clip_intervals((0.3, 1.0), config["algo"]["clip_search_delta"], config["training"]["sampling_eps"])
    chosen = (saved["state_dict"]["sampling_eps_min"].item(), saved["state_dict"]["sampling_eps_max"].item())
    assert any(chosen == pytest.approx(interval) for interval in candidates)


def test_a_two_process_run_resumes_exactly(tmp_path):
    common = ["data=digits", "debug=cpu", "model.dropout=0.0", "sampling.num_samples=0", "loader.batch_size=4", *DDP]
    teacher = cli("algo=mdlm", *common, "trainer.max_steps=2", f"run_dir={tmp_path / 'teacher'}", cwd=tmp_path)
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    student = ["algo=dmmd", f"algo.teacher={tmp_path / 'teacher' / 'checkpoints' / 'final.ckpt'}", *common]
    assert cli(*student, "trainer.max_steps=4", f"run_dir={tmp_path / 'straight'}", cwd=tmp_path).returncode == 0
    assert cli(*student, "trainer.max_steps=2", f"run_dir={tmp_path / 'stopped'}", cwd=tmp_path).returncode == 0
    resumed = cli(*student, "trainer.max_steps=4", f"run_dir={tmp_path / 'stopped'}",
                  f"checkpoint={tmp_path / 'stopped' / 'checkpoints' / 'last.ckpt'}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight, stopped = weights(tmp_path / "straight"), weights(tmp_path / "stopped")
    assert stopped["global_step"] == 4 and stopped["distillation"] == straight["distillation"]
    assert max_difference(straight["state_dict"], stopped["state_dict"]) == 0.0  # the RNG, loader and phase restored


def test_a_two_process_run_resumes_on_one_process_with_the_same_global_batch(tmp_path):
    """Preempted on 2 devices, resumed on 1 with twice the rows per device: every draw is the
    example's own and the loader's position is in global rows, so the run goes on as before."""
    common = ["data=digits", "debug=cpu", "model.dropout=0.0", "sampling.num_samples=0"]
    teacher = cli("algo=mdlm", *common, "loader.batch_size=8", "trainer.max_steps=2", f"run_dir={tmp_path / 'teacher'}",
                  cwd=tmp_path)
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    student = ["algo=dmmd", f"algo.teacher={tmp_path / 'teacher' / 'checkpoints' / 'final.ckpt'}", *common]
    two = ["loader.batch_size=4", *DDP]
    assert cli(*student, *two, "trainer.max_steps=4", f"run_dir={tmp_path / 'straight'}", cwd=tmp_path).returncode == 0
    assert cli(*student, *two, "trainer.max_steps=2", f"run_dir={tmp_path / 'stopped'}", cwd=tmp_path).returncode == 0
    resumed = cli(*student, "loader.batch_size=8", "trainer.max_steps=4", f"run_dir={tmp_path / 'stopped'}",
                  f"checkpoint={tmp_path / 'stopped' / 'checkpoints' / 'last.ckpt'}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight, stopped = weights(tmp_path / "straight"), weights(tmp_path / "stopped")
    assert stopped["global_step"] == 4 and stopped["distillation"]["micro_step"] == straight["distillation"]["micro_step"]
    # measured 2.9e-11: summation order only (the tolerance above); other rows or draws move weights by ~1e-4
    assert max_difference(straight["state_dict"], stopped["state_dict"]) < 1e-6


class _Replica(torch.nn.Module):
    """Stands in for an algo: a state_dict and an EMA."""

    def __init__(self, rank: int, drift: bool):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(3, 2)
        if drift and rank == 1:
            with torch.no_grad():
                self.layer.weight[0, 0] += 1e-6
        self.ema = None

    @property
    def device(self):
        return torch.device("cpu")


def _agree(rank: int, port: int, results):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for drift in (False, True):
            try:
                check_ranks_agree(_Replica(rank, drift))
                results[(rank, drift)] = "agree"
            except RuntimeError as err:
                results[(rank, drift)] = str(err)
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_check_ranks_agree_finds_a_replica_that_drifted():
    results = mp.Manager().dict()
    mp.spawn(_agree, args=(free_port(), results), nprocs=2, join=True)
    assert results[(0, False)] == results[(1, False)] == "agree"
    assert all("different weights" in results[(rank, True)] for rank in (0, 1))  # 1e-6 on one weight of rank 1


class BatchEcho:
    """A model whose sample rows hold the seed they were drawn with (its last three digits)."""

    device = torch.device("cpu")

    def generate(self, num_samples, *, generator, **options):
        return torch.full((num_samples, 2), generator.initial_seed() % 1000)


SEVEN_IN_FOURS = {"sampling": {"num_samples": 7, "batch_size": 2, "seed": 3, "temperature": 1.0, "top_p": 1.0,
                               "noise_removal": "ancestral"}}


def _share_samples(rank: int, port: int, results):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        samples = generate(BatchEcho(), OmegaConf.create(SEVEN_IN_FOURS), steps=2, progress=False, ranks=Ranks(rank, 2))
        results[rank] = samples.tolist()
        results[("total", rank)] = Ranks(rank, 2).total(3 + 4 * rank)  # e.g. each process's re-drawn samples
    finally:
        torch.distributed.destroy_process_group()


def test_rank_0_alone_receives_the_samples_the_processes_share():
    results = mp.Manager().dict()
    mp.spawn(_share_samples, args=(free_port(), results), nprocs=2, join=True)
    alone = generate(BatchEcho(), OmegaConf.create(SEVEN_IN_FOURS), steps=2, progress=False).tolist()
    assert len(alone) == 7 and len({row[0] for row in alone}) == 4  # 4 batches, each from its own seed
    assert results[0] == alone  # batches 0, 2 drawn by rank 0 and 1, 3 by rank 1, in batch order
    assert results[1] == []  # the helping process keeps no copy
    assert results[("total", 0)] == results[("total", 1)] == 3 + 7  # a count summed over both, known to both


def test_torchrun_launch_as_the_readme_gives_it(tmp_path):
    """`torchrun --nproc_per_node=2 -m mdlm_dmmd ...`: Lightning takes the processes torchrun started."""
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "mdlm_dmmd", "algo=mdlm", "data=digits", "debug=cpu", "trainer.max_steps=4", *DDP,
                          f"run_dir={tmp_path / 'run'}"],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("run written to") == 1
    assert (tmp_path / "run" / "checkpoints" / "final.ckpt").is_file()


def torchrun(*args, cwd):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "mdlm_dmmd", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=240)


def test_sampling_modes_under_torchrun_share_the_batches_and_draw_what_one_process_draws(tmp_path):
    """mode=sample and mode=sweep under torchrun: each process draws its sample batches (batch b from
    its own seed; 3 batches over 2 processes: rank 0 draws two), rank 0 gathers, scores and writes,
    and the files hold what one process writes."""
    trained = cli("algo=mdlm", "data=digits", "debug=cpu", "trainer.max_steps=2", "sampling.num_samples=0",
                  f"run_dir={tmp_path / 'teacher'}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    sampling = [f"checkpoint={tmp_path / 'teacher' / 'checkpoints' / 'final.ckpt'}", "sampling.num_samples=6",
                "sampling.batch_size=2", "sampling.steps=4", "sampling.device=cpu"]
    one = cli("mode=sample", *sampling, f"run_dir={tmp_path / 'one'}", cwd=tmp_path)
    two = torchrun("mode=sample", *sampling, f"run_dir={tmp_path / 'two'}", cwd=tmp_path)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-3000:]
    assert two.stdout.count("samples written to") == 1  # rank 0 alone writes
    samples = torch.load(tmp_path / "one" / "samples.pt")
    assert samples.shape[0] == 6 and torch.equal(samples, torch.load(tmp_path / "two" / "samples.pt"))
    assert not torch.equal(samples[:2], samples[2:4])  # each batch its own seed

    teacher = tmp_path / "teacher" / "checkpoints" / "final.ckpt"
    sweep = ["mode=sweep", "data=digits", "model.length=64", "sweep.num_samples=6", "sampling.batch_size=4",
             "sampling.device=cpu", "eval.metrics=[entropy]",
             f"sweep.methods=[{{name: Teacher, checkpoint: '{teacher}', steps: [2, 4], top_p: [1.0]}}]"]
    one = cli(*sweep, f"run_dir={tmp_path / 'sweep_one'}", cwd=tmp_path)
    two = torchrun(*sweep, f"run_dir={tmp_path / 'sweep_two'}", cwd=tmp_path)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-3000:]
    assert two.stdout.count("sweep written to") == 1

    def table(run_dir):
        import csv
        with open(run_dir / "results.csv") as f:
            return [{k: v for k, v in row.items() if k != "sample_seconds"} for row in csv.DictReader(f)]
    assert table(tmp_path / "sweep_one") == table(tmp_path / "sweep_two")
    assert [row["method"] for row in table(tmp_path / "sweep_two")] == ["Teacher", "Teacher", "Data"]
