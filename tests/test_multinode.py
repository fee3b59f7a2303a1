"""Several nodes, simulated on this one machine: the two launches the README gives for several
machines, each run with two "nodes" of one process that meet over loopback.

- torchrun: two agents (`--nnodes=2 --nproc_per_node=1`) that find each other through the c10d
  rendezvous, as the README's recipe does with HOST=127.0.0.1;
- SLURM: `scripts/slurm_multinode.sh` itself, with the variables `sbatch --nodes=2
  --ntasks-per-node=1` would set and a stand-in `srun` that starts one task per node with
  srun's per-task variables (SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, ...).

Both end with the weights of one process on the same global batch, and only global rank 0
writes; `mode=sample` on two torchrun nodes writes the samples of one process. What this cannot show: separate hosts (their names, network interfaces, firewalls),
NCCL, or a filesystem shared between machines; multi-node stays untested there.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from test_ddp import ENV, TOLERANCE, cli, max_difference, weights

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["data=digits", "debug=cpu", "model.dropout=0.0", "trainer.max_steps=4", "trainer.accelerator=cpu"]
TWO_NODES = ["loader.batch_size=4", "trainer.strategy=ddp", "trainer.devices=1", "trainer.num_nodes=2"]

# srun's stand-in: SLURM_JOB_NUM_NODES x SLURM_NTASKS_PER_NODE tasks of its command, each with the
# per-task variables srun sets; it exits with the worst task's status.
FAKE_SRUN = f"""#!{sys.executable}
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


def free_port(low: int = 1024, high: int = 65535) -> int:
    for port in range(low, high):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def without_launchers(env: dict) -> dict:
    return {k: v for k, v in env.items() if not k.startswith(("SLURM_", "MASTER_", "TORCHELASTIC_"))
            and k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "GROUP_RANK", "NODE_RANK")}


def torchrun_two_nodes(*args, tmp_path):
    port = free_port(29500 + os.getpid() % 1000)
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
             "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=mn{port}",
             "-m", "mdlm_dmmd", *args]
    nodes = [subprocess.Popen(agent, cwd=tmp_path, env=without_launchers(ENV), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [node.communicate(timeout=240) for node in nodes]
    return [node.returncode for node in nodes], [out for out, _ in outs], [err for _, err in outs]


def sbatch_two_nodes(*args, tmp_path):
    """`sbatch --nodes=2 --ntasks-per-node=1 scripts/slurm_multinode.sh ARGS`, on this machine."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    (fake_bin / "srun").write_text(FAKE_SRUN)
    (fake_bin / "srun").chmod(0o755)
    port = free_port(15000, 25000)  # Lightning takes MASTER_PORT = 15000 + the job id's last 4 digits
    env = dict(without_launchers(ENV), PATH=f"{fake_bin}:{Path(sys.executable).parent}:{ENV['PATH']}",
               SLURM_JOB_ID=f"77{port - 15000:04d}", SLURM_JOB_NAME="mdlm-dmmd", SLURM_JOB_NUM_NODES="2",
               SLURM_NNODES="2", SLURM_NTASKS_PER_NODE="1", SLURM_NODELIST="127.0.0.1",
               SLURM_JOB_NODELIST="127.0.0.1")
    return subprocess.run(["bash", str(ROOT / "scripts" / "slurm_multinode.sh"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)


def test_two_nodes_train_what_one_process_trains(tmp_path):
    one = cli("algo=mdlm", *COMMON, "loader.batch_size=8", f"run_dir={tmp_path / 'one'}", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    alone = weights(tmp_path / "one")["state_dict"]

    codes, outs, errs = torchrun_two_nodes("algo=mdlm", *COMMON, *TWO_NODES, f"run_dir={tmp_path / 'torchrun'}",
                                           tmp_path=tmp_path)
    assert codes == [0, 0], "\n".join(err[-2000:] for err in errs)
    assert sum(out.count("run written to") for out in outs) == 1  # global rank 0 alone writes
    assert "MEMBER: 2/2" in "".join(errs)  # the second node's process is global rank 1 of 2
    assert max_difference(alone, weights(tmp_path / "torchrun")["state_dict"]) < TOLERANCE

    # mode=sample (outside Lightning) on two torchrun nodes: the batches shared, rank 0 writes
    sampling = [f"checkpoint={tmp_path / 'one' / 'checkpoints' / 'final.ckpt'}", "sampling.num_samples=6",
                "sampling.batch_size=2", "sampling.steps=4", "sampling.device=cpu"]
    one_sampled = cli("mode=sample", *sampling, f"run_dir={tmp_path / 'sample_one'}", cwd=tmp_path)
    assert one_sampled.returncode == 0, one_sampled.stderr[-3000:]
    codes, outs, errs = torchrun_two_nodes("mode=sample", *sampling, f"run_dir={tmp_path / 'sample_two'}",
                                           tmp_path=tmp_path)
    assert codes == [0, 0], "\n".join(err[-2000:] for err in errs)
    assert sum(out.count("samples written to") for out in outs) == 1
    assert torch.equal(torch.load(tmp_path / "sample_one" / "samples.pt"),
                       torch.load(tmp_path / "sample_two" / "samples.pt"))

    # the job's arguments come after the script's gpu default, so trainer.accelerator=cpu wins
    slurm = sbatch_two_nodes("algo=mdlm", *COMMON, *TWO_NODES[:1], f"run_dir={tmp_path / 'slurm'}", tmp_path=tmp_path)
    assert slurm.returncode == 0, slurm.stderr[-3000:]
    assert slurm.stdout.count("run written to") == 1 and "MEMBER: 2/2" in slurm.stderr
    assert max_difference(alone, weights(tmp_path / "slurm")["state_dict"]) < TOLERANCE

    # D-MMD's alternating updates on two nodes: as on one process
    teacher = f"algo.teacher={tmp_path / 'one' / 'checkpoints' / 'final.ckpt'}"
    one = cli("algo=dmmd", teacher, *COMMON, "loader.batch_size=8", f"run_dir={tmp_path / 'student_one'}",
              cwd=tmp_path)
    slurm = sbatch_two_nodes("algo=dmmd", teacher, *COMMON, *TWO_NODES[:1], f"run_dir={tmp_path / 'student_slurm'}",
                             tmp_path=tmp_path)
    assert one.returncode == 0 and slurm.returncode == 0, one.stderr[-2000:] + slurm.stderr[-3000:]
    assert max_difference(weights(tmp_path / "student_one")["state_dict"],
                          weights(tmp_path / "student_slurm")["state_dict"]) < TOLERANCE
