"""Fully sharded data parallelism (`trainer.strategy=fsdp`: FSDP2 through Lightning, `mdlm_dmmd/sharding.py`)
on CPU with 2 gloo processes: every algo ends with the weights of 1 process on the same global
batch, gradient accumulation included; a sharded run resumes exactly from its own checkpoint,
and a run moves between DDP and FSDP (the files are the same); rank 0 alone samples, from whole
weights; the EMA follows the shards.
"""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mdlm_dmmd.errors import UserError
from mdlm_dmmd.models.dit import DiT, DiTConfig
from mdlm_dmmd.models.ema import EMA
from mdlm_dmmd.models.shards import full, is_sharded, shard_like
from mdlm_dmmd.sharding import shard_networks
from test_ddp import TOLERANCE, cli, max_difference, torchrun, weights

FSDP = ["trainer.strategy=fsdp", "trainer.devices=2", "trainer.accelerator=cpu"]
DDP = ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
COMMON = ["data=digits", "debug=cpu", "model.dropout=0.0"]  # dropout: the RNG of the network


def train(tmp_path, name, *args):
    run = cli(*args, *COMMON, f"run_dir={tmp_path / name}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_sharded_processes_train_what_one_process_trains(tmp_path):
    """mdlm (Lightning's optimisation and clipping over sharded gradients) and dmmd (the
    Alternation, whose gradients FSDP averages). Measured: 2.1e-8 (mdlm), 1.2e-10 (dmmd); the
    tolerance is DDP's (see test_ddp.TOLERANCE): only float32 summation order differs."""
    one, two = ["loader.batch_size=8"], ["loader.batch_size=4", *FSDP]
    teacher = ["algo=mdlm", "trainer.max_steps=4", "sampling.num_samples=4"]
    train(tmp_path, "teacher_one", *teacher, *one)
    # the processes started by torchrun here, by Lightning for the students below
    run = torchrun(*teacher, *COMMON, *two, f"run_dir={tmp_path / 'teacher_two'}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("run written to") == 1  # rank 0 alone samples (whole weights) and writes
    teachers = weights(tmp_path / "teacher_one"), weights(tmp_path / "teacher_two")
    assert max_difference(teachers[0]["state_dict"], teachers[1]["state_dict"]) < TOLERANCE
    assert max_difference(teachers[0]["ema"]["shadow"], teachers[1]["ema"]["shadow"]) < TOLERANCE  # whole tensors
    assert torch.load(tmp_path / "teacher_two" / "samples.pt").shape == (4, 64)

    teacher = tmp_path / "teacher_one" / "checkpoints" / "final.ckpt"
    for name, extra in (("one", one), ("two", two)):
        train(tmp_path, f"student_{name}", "algo=dmmd", f"algo.teacher={teacher}", "trainer.max_steps=4",
              "sampling.num_samples=0", *extra)
    students = weights(tmp_path / "student_one"), weights(tmp_path / "student_two")
    assert students[1]["global_step"] == 4 and students[1]["distillation"]["micro_step"] == 4
    assert "teacher.vocab_embed.embedding" not in students[1]["state_dict"]  # reloaded from algo.teacher
    assert max_difference(students[0]["state_dict"], students[1]["state_dict"]) < TOLERANCE
    # the optimiser state is laid out as DDP's (Optimizer.state_dict: parameters by index)
    for mine, theirs in zip(students[1]["optimizer_states"], students[0]["optimizer_states"]):
        assert sorted(mine["state"]) == sorted(theirs["state"]) == list(range(len(mine["state"])))
        assert max(max_difference(mine["state"][i], theirs["state"][i]) for i in mine["state"]) < TOLERANCE


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp_teacher")
    train(folder, "teacher", "algo=mdlm", "sampling.num_samples=0", "trainer.max_steps=2", "loader.batch_size=8")
    return folder / "teacher" / "checkpoints" / "final.ckpt"


def one_and_two_processes_agree(tmp_path, algos: dict, rows: int) -> None:
    """Each algo with `rows` rows per micro-batch (and validation batch) on 1 process and rows / 2
    on each of 2 sharded ones."""
    quiet = ["sampling.num_samples=0", "trainer.max_steps=4"]
    for algo, overrides in algos.items():
        train(tmp_path, f"{algo}_one", *overrides, *quiet, f"loader.batch_size={rows}", f"loader.eval_batch_size={rows}")
        train(tmp_path, f"{algo}_two", *overrides, *quiet, f"loader.batch_size={rows // 2}",
              f"loader.eval_batch_size={rows // 2}", *FSDP)
        runs = weights(tmp_path / f"{algo}_one"), weights(tmp_path / f"{algo}_two")
        assert runs[1]["global_step"] == runs[0]["global_step"] == 4, algo
        assert max_difference(runs[0]["state_dict"], runs[1]["state_dict"]) < TOLERANCE, algo
        for theirs, mine in zip(runs[0]["optimizer_states"], runs[1]["optimizer_states"]):  # AdamW's step counts too
            assert sorted(mine["state"]) == sorted(theirs["state"]), algo
            assert all(max_difference(theirs["state"][i], mine["state"][i]) < TOLERANCE for i in mine["state"]), algo


def test_the_other_algos_sharded(tmp_path, teacher):
    """bd3lm (buffers beside the shards, moved by the clip search, whose one all-gather makes the
    sharded processes pick the interval of one process), sdtt (a round swap at step 2 loads the
    student into the sharded teacher) and idlm. Measured: 1.5e-8 each. udlm and ar share mdlm's
    path (Lightning's optimisation; only the loss differs) and were measured once by hand: 1.5e-8 each."""
    one_and_two_processes_agree(tmp_path, {
        "bd3lm": ["algo=bd3lm", "block_size=16", "algo.clip_search_widths=[0.3,1.0]"],
        "sdtt": ["algo=sdtt", f"algo.teacher={teacher}", "algo.initial_steps=16", "algo.final_steps=4",
                 "algo.steps_per_round=2"],
        "idlm": ["algo=idlm", f"algo.teacher={teacher}", "algo.lr_generator=1e-3", "algo.lr_fake=1e-3"],
    }, rows=8)
    state = weights(tmp_path / "bd3lm_two")["state_dict"]
    searched = (state["sampling_eps_min"].item(), state["sampling_eps_max"].item())
    assert searched != pytest.approx((1e-3, 1.0))  # the search ran and moved the interval (measured: (0.7, 1.0))


def test_gradient_accumulation_sharded(tmp_path, teacher):
    """2 micro-batches of 2 rows on each of 2 processes = 2 of 4 rows on one: Lightning's
    accumulation (mdlm) and the Alternation's (dmmd). Measured: 2.0e-8 (mdlm), 5.8e-9 (dmmd)."""
    accumulate = ["trainer.accumulate_grad_batches=2"]
    one_and_two_processes_agree(tmp_path, {"mdlm": ["algo=mdlm", *accumulate],
                                           "dmmd": ["algo=dmmd", f"algo.teacher={teacher}", *accumulate]}, rows=4)


def test_an_optimiser_checkpointed_before_its_first_step_takes_no_step(tmp_path, teacher):
    """Two auxiliary updates first: the checkpoint at step 2 holds a generator optimiser that never
    stepped. torch's sharded state_dict helpers would initialise it with a zero step (AdamW's count
    1, a first real step 26% too small: measured 8.6e-7 off); saved and loaded as it is, the run
    equals one process (5.8e-11), with the same step counts, and resumes from DDP's checkpoint."""
    aux_first = ["algo=dmmd", f"algo.teacher={teacher}", "algo.first_step=aux", "algo.aux_steps_per_gen_step=2"]
    one_and_two_processes_agree(tmp_path, {"aux_first": aux_first}, rows=8)
    quiet = ["sampling.num_samples=0", "loader.batch_size=4"]
    train(tmp_path, "stopped", *aux_first, *quiet, *DDP, "trainer.max_steps=2")
    assert not weights(tmp_path / "stopped")["optimizer_states"][0]["state"]  # the generator's: not stepped
    train(tmp_path, "stopped", *aux_first, *quiet, *FSDP, "trainer.max_steps=4",
          f"checkpoint={tmp_path / 'stopped' / 'checkpoints' / 'last.ckpt'}")
    straight, resumed = weights(tmp_path / "aux_first_two"), weights(tmp_path / "stopped")
    assert max_difference(straight["state_dict"], resumed["state_dict"]) == 0.0
    assert [sorted(float(v["step"]) for v in o["state"].values()) for o in resumed["optimizer_states"]] == \
        [sorted(float(v["step"]) for v in o["state"].values()) for o in straight["optimizer_states"]]


STUDENT = ["algo=dmmd", "sampling.num_samples=0", "loader.batch_size=4"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, teacher):
    """A sharded dmmd run of 4 updates that never stopped."""
    folder = tmp_path_factory.mktemp("fsdp_straight")
    train(folder, "straight", *STUDENT, f"algo.teacher={teacher}", *FSDP, "trainer.max_steps=4")
    return weights(folder / "straight")


def stopped_and_resumed(tmp_path, teacher, first: list, then: list) -> dict:
    student = [*STUDENT, f"algo.teacher={teacher}"]
    train(tmp_path, "run", *student, *first, "trainer.max_steps=2")
    train(tmp_path, "run", *student, *then, "trainer.max_steps=4", f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}")
    return weights(tmp_path / "run")


def same_run(straight: dict, resumed: dict) -> None:
    """The RNG, loader, phase, optimiser state and EMA restored: bit for bit."""
    assert resumed["global_step"] == 4 and resumed["distillation"] == straight["distillation"]
    assert max_difference(straight["state_dict"], resumed["state_dict"]) == 0.0
    assert max_difference(straight["ema"]["shadow"], resumed["ema"]["shadow"]) == 0.0


def test_a_sharded_run_resumes_exactly(tmp_path, teacher, straight):
    same_run(straight, stopped_and_resumed(tmp_path, teacher, FSDP, FSDP))


@pytest.mark.parametrize("first, then", [(DDP, FSDP), (FSDP, DDP)], ids=["ddp_to_fsdp", "fsdp_to_ddp"])
def test_a_run_moves_between_ddp_and_fsdp_exactly(tmp_path, teacher, straight, first, then):
    """The checkpoint files are the same, so a run stopped under one strategy resumes under the
    other; bit for bit here (measured: 2 processes reduce in the same order under DDP and FSDP)."""
    same_run(straight, stopped_and_resumed(tmp_path, teacher, first, then))


def test_a_sharded_run_resumes_on_one_process(tmp_path, teacher, straight):
    """Preempted on 2 sharded processes, resumed on 1 unsharded one with the global batch: the
    whole-file checkpoint and the loader's position in global rows carry over."""
    student = ["algo=dmmd", "sampling.num_samples=0", f"algo.teacher={teacher}"]
    train(tmp_path, "run", *student, "loader.batch_size=4", *FSDP, "trainer.max_steps=2")
    train(tmp_path, "run", *student, "loader.batch_size=8", "trainer.max_steps=4",
          f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}")
    resumed = weights(tmp_path / "run")
    assert resumed["global_step"] == 4 and resumed["distillation"]["micro_step"] == straight["distillation"]["micro_step"]
    assert max_difference(straight["state_dict"], resumed["state_dict"]) < TOLERANCE  # measured 2.9e-11: summation order


# -- in-process checks of the pieces, on a gloo group of 1 or 2 processes ---------------------------

def tiny_dit() -> DiT:
    torch.manual_seed(0)
    return DiT(DiTConfig(vocab_size=11, length=8, hidden_dim=16, cond_dim=8, n_blocks=2, n_heads=2, dropout=0.0))


def _ema_over_shards(rank: int, world: int, init: str, results):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        sharded, whole = tiny_dit(), tiny_dit()
        ema, reference = EMA(sharded, 0.9), EMA(whole, 0.9)  # made before sharding, as algos make theirs
        shard_networks(sharded, init_device_mesh("cpu", (world,)))
        step = torch.Generator().manual_seed(1)
        for keep in (None, torch.tensor(True), torch.tensor(False), None):  # `keep`: the device-side skip
            with torch.no_grad():
                for (name, p), q in zip(sharded.named_parameters(), whole.parameters()):
                    change = torch.randn(q.shape, generator=step)  # the same whole change on every rank
                    q.add_(change)
                    p.add_(shard_like(change, p))
            ema.update(sharded, keep)
            reference.update(whole, keep)
        assert all(is_sharded(t) for t in ema.shadow.values())
        shadow = ema.state_dict()["shadow"]  # whole tensors again (collective)
        error = max((shadow[n] - t).abs().max().item() for n, t in reference.shadow.items())
        with ema.swapped_in(sharded):
            swapped = max((full(p) - reference.shadow[n]).abs().max().item() for n, p in sharded.named_parameters())
        restored = max((full(p) - q).abs().max().item() for p, q in zip(sharded.parameters(), whole.parameters()))
        results[rank] = (error, swapped, restored, not any(is_sharded(t) for t in shadow.values()))
    finally:
        dist.destroy_process_group()


def test_the_ema_follows_the_shards(tmp_path):
    """An EMA made before `shard_networks` takes each parameter's shard layout at its first update,
    each process updating its piece; its state_dict gathers whole tensors equal to an EMA of the
    unsharded network; swapping it in and out works on the shards."""
    results = mp.Manager().dict()
    mp.spawn(_ema_over_shards, args=(2, f"file://{tmp_path / 'group'}", results), nprocs=2)
    for rank in (0, 1):
        error, swapped, restored, whole = results[rank]
        assert error < 1e-6 and swapped < 1e-6 and restored == 0.0 and whole, (rank, results[rank])


@pytest.fixture
def one_process_group():
    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'group')}", rank=0, world_size=1)
        try:
            from torch.distributed.device_mesh import init_device_mesh

            yield init_device_mesh("cpu", (1,))
        finally:
            dist.destroy_process_group()


def test_sharding_refuses_parameters_outside_a_dit_and_is_idempotent(one_process_group):
    holder = torch.nn.Module()
    holder.network = tiny_dit()
    holder.scale = torch.nn.Parameter(torch.ones(()))
    with pytest.raises(UserError, match=r"trainer.strategy=fsdp shards DiT networks only.*\(scale\).*strategy=ddp"):
        shard_networks(holder, one_process_group)
    del holder.scale
    shard_networks(holder, one_process_group)
    shard_networks(holder, one_process_group)  # Lightning calls configure_model per stage
    assert all(is_sharded(p) for p in holder.parameters())


def test_fsdp_with_an_algo_that_does_not_shard_is_one_line(tmp_path):
    """A third-party LightningModule without configure_model: refused before the run folder exists."""
    import lightning as L

    from mdlm_dmmd import cli
    from mdlm_dmmd.training import build_trainer

    cfg = cli.compose(["algo=mdlm", "debug=cpu", "trainer.strategy=fsdp", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(UserError, match=r"^trainer.strategy=fsdp needs an algo that shards its networks .*"
                                        r"algo=mdlm does not: use trainer.strategy=ddp$"):
        build_trainer(cfg, tmp_path / "run", L.LightningModule())
    assert not (tmp_path / "run").exists()
