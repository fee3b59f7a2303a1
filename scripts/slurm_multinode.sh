#!/bin/bash
# Data-parallel training on several SLURM nodes through Lightning (`trainer.strategy=ddp`).
# UNTESTED under SLURM: no cluster and no GPUs here. It ran (DDP) on one CPU machine with a
# stand-in srun that starts two "nodes" of two tasks with srun's variables (tests/test_multinode.py:
# the weights of one process); DDP itself: tests/test_ddp.py. Lightning reads SLURM's environment (SLURM_PROCID,
# SLURM_NTASKS, ...) for the ranks, so one task per GPU and the two trainer keys below suffice.
#
#   sbatch --nodes=2 scripts/slurm_multinode.sh experiment=owt_masked_dmmd algo.teacher=TEACHER.ckpt \
#       run_dir=outputs/owt_masked_dmmd
#
# The global batch is nodes x GPUs per node x loader.batch_size x trainer.accumulate_grad_batches:
# divide a config's accumulation by the number of GPUs to keep its global batch. A job that SLURM
# stops (time limit, preemption: SIGTERM) saves RUN_DIR/checkpoints/crash.ckpt and exits with 143
# (tested with one process and with 2 DDP or FSDP processes under torchrun, not under SLURM); it
# resumes with the same command plus checkpoint=RUN_DIR/checkpoints/crash.ckpt (or last.ckpt, the
# latest periodic one). The processes stop together within two optimizer steps of the signal (a
# validation or periodic checkpoint due before then still runs): --signal below sends SIGTERM to
# every task 120 s before the time limit, since SLURM's KillWait before its SIGKILL is often only
# 30 s. Not --signal=USR1: Lightning's SLURM auto-requeue handler for it saves a checkpoint from
# inside the signal handler, the hazard the SIGTERM handling here avoids.
#SBATCH --job-name=mdlm-dmmd
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120

set -euo pipefail
# The job's arguments come last, so they win over these defaults (e.g. trainer.strategy=fsdp,
# which ran on two simulated nodes through torchrun, not through this script).
srun python -m mdlm_dmmd trainer.strategy=ddp trainer.accelerator=gpu \
    trainer.devices="${SLURM_NTASKS_PER_NODE}" trainer.num_nodes="${SLURM_JOB_NUM_NODES}" "$@"
