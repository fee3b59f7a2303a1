"""Several nodes, simulated on this one machine: the two launches the README gives for several
machines, each run with two "nodes" of two processes that meet over loopback.

- torchrun: two agents (`--nnodes=2 --nproc_per_node=2`) that find each other through the c10d
  rendezvous, as the README's recipe does with HOST=127.0.0.1;
- SLURM: `scripts/slurm_multinode.sh` itself, with the variables of `sbatch --nodes=2
  --ntasks-per-node=2` that Lightning and this package read, and a stand-in `srun` that starts
  two tasks per node with srun's per-task variables (SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, ...).

Both end with the weights of one process on the same global batch, and only global rank 0
writes; `mode=sample` on two torchrun nodes writes the samples of one process, and FSDP over two
torchrun nodes trains what one process trains. Two processes per node make global rank, node
rank and local rank differ. What this cannot show: separate hosts (their names, a SLURM host
list of several names, network interfaces, firewalls), NCCL, or a filesystem shared between
machines; multi-node stays untested there.
"""

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_ddp import ENV, TOLERANCE, cli, max_difference, weights

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["data=digits", "debug=cpu", "model.dropout=0.0", "trainer.max_steps=4", "trainer.accelerator=cpu"]
PER_DEVICE = ["loader.batch_size=2"]  # 2 nodes x 2 processes x 2 rows = the 8 rows of one process
TWO_BY_TWO = [*PER_DEVICE, "trainer.strategy=ddp", "trainer.devices=2", "trainer.num_nodes=2"]
TIMEOUT = 300

# srun's stand-in: SLURM_JOB_NUM_NODES x SLURM_NTASKS_PER_NODE tasks of its command, each with the
# per-task variables srun sets; it exits with the worst task's status.
FAKE_SRUN = """#!/usr/bin/env python
import os, subprocess, sys
nodes, per_node = int(os.environ["SLURM_JOB_NUM_NODES"]), int(os.environ["SLURM_NTASKS_PER_NODE"])
tasks = []
for node in range(nodes):
    for local in range(per_node):
        env = dict(os.environ, SLURM_NTASKS=str(nodes * per_node), SLURM_NNODES=str(nodes), SLURM_STEP_ID="0",
                   SLURM_PROCID=str(node * per_node + local), SLURM_LOCALID=str(local), SLURM_NODEID=str(node))
        tasks.append(subprocess.Popen(sys.argv[1:], env=env))
sys.exit(max(task.wait() for task in tasks))
"""


def free_port(low: int, high: int) -> int:
    """A port in [low, high) that nothing listens on, from a random start (concurrent runs)."""
    start = random.randrange(low, high)
    for port in (*range(start, high), *range(low, start)):
        with socket.socket() as s:
            try:
                s.bind(("", port))  # all interfaces, as the stores listen
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low}, {high})")


def without_launchers(env: dict) -> dict:
    return {k: v for k, v in env.items() if not k.startswith(("SLURM_", "MASTER_", "TORCHELASTIC_"))
            and k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "GROUP_RANK", "NODE_RANK")}


def run_together(commands: list[list[str]], *, env: dict, cwd) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each command, all started at once, each in its own
    session. A hang (a rendezvous that never completes, an undetected launcher) stops every
    process group, the launched workers with them, and fails with what each printed."""
    procs = [subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True) for command in commands]
    deadline, results = time.monotonic() + TIMEOUT, []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((proc.returncode, out, err))
        return results
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):  # torchrun ends its workers on SIGTERM
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                for proc in procs:
                    proc.wait(timeout=15)
        printed = [proc.communicate()[1][-2000:] for proc in procs]
        pytest.fail(f"the multi-node launch did not end in {TIMEOUT} s:\n" + "\n---\n".join(printed))


def torchrun_two_nodes(*args, tmp_path):
    port = free_port(29500, 30500)
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2",
             "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=mn{port}",
             "-m", "mdlm_dmmd", *args]
    return run_together([agent, agent], env=without_launchers(ENV), cwd=tmp_path)


def sbatch_two_nodes(*args, tmp_path) -> tuple[int, str, str]:
    """`sbatch --nodes=2 --ntasks-per-node=2 scripts/slurm_multinode.sh ARGS`, on this machine."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    (fake_bin / "srun").write_text(FAKE_SRUN)
    (fake_bin / "srun").chmod(0o755)
    port = free_port(15000, 25000)  # Lightning takes MASTER_PORT = 15000 + the job id's last 4 digits
    env = dict(without_launchers(ENV), PATH=f"{fake_bin}:{Path(sys.executable).parent}:{ENV['PATH']}",
               SLURM_JOB_ID=f"77{port - 15000:04d}", SLURM_JOB_NAME="mdlm-dmmd", SLURM_JOB_NUM_NODES="2",
               SLURM_NNODES="2", SLURM_NTASKS_PER_NODE="2", SLURM_NODELIST="127.0.0.1",
               SLURM_JOB_NODELIST="127.0.0.1")
    [result] = run_together([["bash", str(ROOT / "scripts" / "slurm_multinode.sh"), *args]], env=env, cwd=tmp_path)
    return result


def members(printed: str) -> set[str]:
    """Lightning's "MEMBER: i/W" of every process that joined the run."""
    return {part.split(",")[0].split()[0] for part in printed.split("MEMBER: ")[1:]}


ALL_FOUR = {"1/4", "2/4", "3/4", "4/4"}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process mdlm run (8 rows per step) that every launch must reproduce."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    run = cli("algo=mdlm", *COMMON, "loader.batch_size=8", f"run_dir={run_dir}", cwd=run_dir.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    return run_dir


def test_two_torchrun_nodes_train_and_sample_as_one_process(tmp_path, one_process):
    nodes = torchrun_two_nodes("algo=mdlm", *COMMON, *TWO_BY_TWO, f"run_dir={tmp_path / 'torchrun'}", tmp_path=tmp_path)
    assert [code for code, _, _ in nodes] == [0, 0], "\n".join(err[-2000:] for _, _, err in nodes)
    assert sum(out.count("run written to") for _, out, _ in nodes) == 1  # global rank 0 alone writes
    assert members("".join(err for _, _, err in nodes)) == ALL_FOUR
    assert max_difference(weights(one_process)["state_dict"], weights(tmp_path / "torchrun")["state_dict"]) < TOLERANCE

    # mode=sample (outside Lightning): 3 batches over 4 processes (one draws none), gathered on
    # rank 0, which alone writes
    sampling = [f"checkpoint={one_process / 'checkpoints' / 'final.ckpt'}", "sampling.num_samples=6",
                "sampling.batch_size=2", "sampling.steps=4", "sampling.device=cpu"]
    one_sampled = cli("mode=sample", *sampling, f"run_dir={tmp_path / 'sample_one'}", cwd=tmp_path)
    assert one_sampled.returncode == 0, one_sampled.stderr[-3000:]
    nodes = torchrun_two_nodes("mode=sample", *sampling, f"run_dir={tmp_path / 'sample_two'}", tmp_path=tmp_path)
    assert [code for code, _, _ in nodes] == [0, 0], "\n".join(err[-2000:] for _, _, err in nodes)
    assert sum(out.count("samples written to") for _, out, _ in nodes) == 1
    assert torch.equal(torch.load(tmp_path / "sample_one" / "samples.pt"),
                       torch.load(tmp_path / "sample_two" / "samples.pt"))


def test_two_torchrun_nodes_shard_as_one_process(tmp_path, one_process):
    """FSDP over both nodes: every network sharded over the 4 processes (`sharding.py` makes
    every process of every node a data-parallel rank); weights and EMA those of one process."""
    fsdp = [*PER_DEVICE, "trainer.strategy=fsdp", "trainer.devices=2", "trainer.num_nodes=2"]
    nodes = torchrun_two_nodes("algo=mdlm", *COMMON, *fsdp, f"run_dir={tmp_path / 'fsdp'}", tmp_path=tmp_path)
    assert [code for code, _, _ in nodes] == [0, 0], "\n".join(err[-2000:] for _, _, err in nodes)
    assert sum(out.count("run written to") for _, out, _ in nodes) == 1
    assert members("".join(err for _, _, err in nodes)) == ALL_FOUR
    alone, sharded = weights(one_process), weights(tmp_path / "fsdp")
    assert max_difference(alone["state_dict"], sharded["state_dict"]) < TOLERANCE
    assert max_difference(alone["ema"]["shadow"], sharded["ema"]["shadow"]) < TOLERANCE


def test_the_slurm_script_on_two_nodes_trains_as_one_process(tmp_path, one_process):
    # the job's arguments come after the script's gpu default, so trainer.accelerator=cpu wins
    code, out, err = sbatch_two_nodes("algo=mdlm", *COMMON, *PER_DEVICE, f"run_dir={tmp_path / 'slurm'}",
                                      tmp_path=tmp_path)
    assert code == 0, err[-3000:]
    assert out.count("run written to") == 1 and members(err) == ALL_FOUR
    assert max_difference(weights(one_process)["state_dict"], weights(tmp_path / "slurm")["state_dict"]) < TOLERANCE

    # D-MMD's alternating updates on two nodes: as on one process
    teacher = f"algo.teacher={one_process / 'checkpoints' / 'final.ckpt'}"
    one = cli("algo=dmmd", teacher, *COMMON, "loader.batch_size=8", f"run_dir={tmp_path / 'student_one'}",
              cwd=tmp_path)
    code, _, err = sbatch_two_nodes("algo=dmmd", teacher, *COMMON, *PER_DEVICE, f"run_dir={tmp_path / 'student_slurm'}",
                                    tmp_path=tmp_path)
    assert one.returncode == 0 and code == 0, one.stderr[-2000:] + err[-3000:]
    assert max_difference(weights(tmp_path / "student_one")["state_dict"],
                          weights(tmp_path / "student_slurm")["state_dict"]) < TOLERANCE
