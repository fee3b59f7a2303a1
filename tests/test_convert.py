"""Upstream Lightning checkpoints (pickled Hydra config): refused by the loader, converted on request."""

import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from mdlm_dmmd.checkpoints import load_backbone
from mdlm_dmmd.upstream import convert_lightning_checkpoint
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.models.dit import DiTConfig

from conftest import random_model


class Tokenizer:  # stands in for the pickled HF tokenizer of upstream hyper_parameters
    vocab = {"a": 0}


def upstream_checkpoint(path, algo="duo_base"):
    """Shaped like a Duo/MDLM `.ckpt`: `backbone.` keys, EMA `shadow_params` list, pickled config."""
    model = random_model(DiTConfig(vocab_size=11, length=8, hidden_dim=16, cond_dim=8, n_blocks=1, n_heads=2, dropout=0.0))
    shadow = [p.detach() * 0.5 for p in model.parameters()]  # EMA differs from the live weights
    config = OmegaConf.create({"model": {"hidden_size": 16, "cond_dim": 8, "length": 8, "n_blocks": 1, "n_heads": 2,
                                         "dropout": 0.0}, "algo": {"name": algo}})
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in model.state_dict().items()},
                "ema": {"decay": 0.9999, "num_updates": 10, "shadow_params": shadow},
                "hyper_parameters": {"config": config, "tokenizer": Tokenizer()}}, path)
    return model, shadow


def test_loader_refuses_and_convert_keeps_the_ema_weights(tmp_path):
    model, shadow = upstream_checkpoint(tmp_path / "duo.ckpt")
    with pytest.raises(UserError, match="pickled Python objects.*mdlm_dmmd.upstream convert"):
        load_backbone(tmp_path / "duo.ckpt")
    out = convert_lightning_checkpoint(tmp_path / "duo.ckpt", tmp_path / "converted")
    loaded = load_backbone(out)
    for (name, param), ema in zip(loaded.model.named_parameters(), shadow):
        assert torch.equal(param, ema), name
    assert loaded.meta.process == "uniform" and loaded.meta.time_conditioning is True  # a Duo run
    assert loaded.meta.extra["converted_from"].endswith("duo.ckpt")


def test_convert_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        convert_lightning_checkpoint(tmp_path / "missing.ckpt", tmp_path / "out")
    proc = subprocess.run([sys.executable, "-m", "mdlm_dmmd.upstream", "convert", str(tmp_path / "x.ckpt"), str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr
