"""Test-wide setup: offline, no W&B, caches in a temp dir; where the reference fixtures are (in the repo)."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# Run inside a torchrun or SLURM task, a test process would take itself for a helper process:
# wait for a data cache that its local rank 0 builds (`mdlm_dmmd/data/once.py`), or refuse the
# modes outside Lightning (`ranks.check_launcher`).
for _launcher_rank in ("LOCAL_RANK", "SLURM_LOCALID", "SLURM_PROCID"):
    os.environ.pop(_launcher_rank, None)

# Tiny models: one thread is faster than two that fight each other (and any other process).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
# Reference tensors from the public MDLM / BD3-LM code, kept in the repository so that a clone
# tests itself (how each was made: tests/fixtures/README.md).
FIXTURES = REPO / "tests" / "fixtures"


def fixture_path(name: str) -> Path:
    """`tests/fixtures/<name>`; a missing fixture fails the test (it ships with the repo), never skips it."""
    path = FIXTURES / name
    if not path.exists():
        raise FileNotFoundError(f"test fixture {path} is missing; it is part of the repository (tests/fixtures/README.md)")
    return path


@pytest.fixture(autouse=True, scope="session")
def _isolated_caches(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    os.environ.setdefault("MDLM_DMMD_CACHE", str(cache / "mdlm_dmmd"))
    os.environ.setdefault("HF_HOME", str(cache / "hf"))
    yield


@pytest.fixture
def fixtures_dir() -> Path:
    """The in-repo fixture folder (`tests/fixtures/`)."""
    return FIXTURES


@pytest.fixture
def shared_dir() -> Path:
    """The folder that holds `fixtures/`, as the project's shared folder did: now `tests/`, so
    `shared_dir / "fixtures" / "mdlm-dit"` is the in-repo copy."""
    return FIXTURES.parent


def random_model(config, seed: int = 0):
    """A DiT with every parameter random, so zero-inits (adaLN, head, noise input) hide nothing."""
    from mdlm_dmmd.models.dit import DiT

    model = DiT(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def write_ar_checkpoint(directory, vocab=17, length=64, seed=0, process="autoregressive"):
    """A random tiny causal DiT saved as an exported directory: an `ar` checkpoint of this
    package (or, with process="masked", a diffusion one that a reference loader must refuse)."""
    from mdlm_dmmd.checkpoints import save_backbone
    from mdlm_dmmd.models.dit import DiTConfig

    model = random_model(DiTConfig(vocab_size=vocab + 1, length=length, hidden_dim=16, cond_dim=8, n_blocks=1,
                                   n_heads=2, dropout=0.0, causal=True), seed=seed)
    meta = {"process": process, "start_id": vocab} if process == "autoregressive" else \
        {"process": process, "mask_id": vocab, "schedule": "loglinear", "time_conditioning": False}
    save_backbone(directory, model, meta)
    return directory


def host_config(algo: dict, *, vocab: int = 17, length: int = 64, ema: float = 0.0, clip: float | None = 1.0,
                noise: dict | None = None, **top) -> dict:
    """A composed config for building an algo directly (no Hydra): `algo` plus the host keys at
    tiny-test settings (digits-sized vocabulary, lr 1e-3 without warmup); `top` adds top-level keys."""
    return {
        "algo": algo,
        "model": {"length": length},
        "training": {"ema": ema, "antithetic_sampling": True, "sampling_eps": 1e-3},
        "optim": {"lr": 1e-3, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "warmup_steps": 0},
        "trainer": {"accumulate_grad_batches": 1, "gradient_clip_val": clip},
        "noise": noise or {"type": "loglinear", "eps": 1e-3},
        "vocab": {"size": vocab},
        "data": {"name": "digits"},
        **top,
    }


STUDY_TINY = ["experiment=quickstart", "debug=cpu", "study.num_samples=8", "study.teacher_steps=[]",
              "eval.metrics=[entropy]", "~study.student_overrides", "study.noise_input=[null]"]


def study_rows(tmp_path, monkeypatch, *overrides) -> list[dict]:
    """mode=study at quickstart settings shrunk to seconds, with its own teacher cache (the shared
    one is what tests/eval/test_study.py counts on); the rows of its results.csv."""
    import csv

    from mdlm_dmmd import cli

    monkeypatch.setenv("MDLM_DMMD_CACHE", str(tmp_path / "cache"))
    assert cli.main([*STUDY_TINY, *overrides, f"run_dir={tmp_path / 'study'}"]) == 0
    with open(tmp_path / "study" / "results.csv") as f:
        return list(csv.DictReader(f))
