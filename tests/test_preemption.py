"""SIGTERM (a cluster's preemption or time limit) during training: crash.ckpt holds the state,
the process exits with 128 + SIGTERM, not 0 (a job chain would take 0 for a finished run), and
the run resumes from crash.ckpt."""

import os
import signal
import subprocess
import sys
import time

import torch

ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
           OMP_NUM_THREADS="1")
RUN = ["algo=mdlm", "data=digits", "debug=cpu", "sampling.num_samples=0", "trainer.val_check_interval=2"]


def test_sigterm_saves_crash_ckpt_exits_nonzero_and_resumes(tmp_path):
    run = tmp_path / "run"
    training = subprocess.Popen([sys.executable, "-m", "mdlm_dmmd", *RUN, "trainer.max_steps=100000", f"run_dir={run}"],
                                cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = time.time()
    while not (run / "checkpoints" / "step2.ckpt").exists() and training.poll() is None and time.time() - started < 120:
        time.sleep(0.1)
    training.send_signal(signal.SIGTERM)
    _, err = training.communicate(timeout=120)
    crash = run / "checkpoints" / "crash.ckpt"
    assert training.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert f"training stopped by SIGTERM; resume with checkpoint={crash}" in err
    stopped_at = torch.load(crash, map_location="cpu", weights_only=False)["global_step"]
    assert stopped_at >= 2

    resumed = subprocess.run([sys.executable, "-m", "mdlm_dmmd", *RUN, f"trainer.max_steps={stopped_at + 2}",
                              f"run_dir={run}", f"checkpoint={crash}"], cwd=tmp_path, env=ENV, capture_output=True,
                             text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert torch.load(run / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=False)["global_step"] == stopped_at + 2
