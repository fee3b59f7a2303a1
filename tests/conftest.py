"""Test-wide setup: offline, no W&B, caches in a temp dir; where the reference fixtures are (in the repo)."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

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
