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


def test_convert_keeps_plain_config_values_and_drops_objects_anywhere(tmp_path):
    """Floats of the config survive (upstream's dropout 0.0, not DiTConfig's default 0.1); objects
    inside lists are dropped too; the exported metadata names no temporary file."""
    import json

    upstream_checkpoint(tmp_path / "duo.ckpt")
    raw = torch.load(tmp_path / "duo.ckpt", weights_only=False)
    raw["hyper_parameters"]["callbacks"] = [Tokenizer(), "kept", 3]
    torch.save(raw, tmp_path / "duo.ckpt")
    out = convert_lightning_checkpoint(tmp_path / "duo.ckpt", tmp_path / "converted")
    assert load_backbone(out).config.dropout == 0.0
    stored = json.loads((out / "config.json").read_text())["mdlm_dmmd"]
    assert "source" not in stored and "format" not in stored


def test_convert_keeps_this_packages_own_metadata(tmp_path):
    """An old checkpoint of this package with a pickled object in it: its metadata (masked, mask 10,
    its own k) is kept, not re-inferred from the Hydra config (which names a Duo run)."""
    from mdlm_dmmd.public_config import dit_config_to_public

    model, _ = upstream_checkpoint(tmp_path / "ours.ckpt")
    raw = torch.load(tmp_path / "ours.ckpt", weights_only=False)
    raw["mdlm_dmmd"] = {"backbone_config": dit_config_to_public(model.config), "process": "masked", "mask_id": 10,
                        "schedule": "loglinear", "time_conditioning": False, "sampling_steps": 4}
    torch.save(raw, tmp_path / "ours.ckpt")
    loaded = load_backbone(convert_lightning_checkpoint(tmp_path / "ours.ckpt", tmp_path / "converted"))
    assert (loaded.meta.process, loaded.meta.mask_id, loaded.meta.sampling_steps) == ("masked", 10, 4)


def test_convert_refuses_what_is_not_a_lightning_checkpoint_in_one_line(tmp_path):
    import re

    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    with pytest.raises(UserError, match=rf"^{re.escape(str(text))} is not a readable torch checkpoint: "):
        convert_lightning_checkpoint(text, tmp_path / "out")
    weights = tmp_path / "weights.ckpt"
    torch.save({"model": {"w": torch.zeros(1)}}, weights)
    with pytest.raises(UserError, match=rf"^{re.escape(str(weights))} is not a Lightning checkpoint \(no 'state_dict'"):
        convert_lightning_checkpoint(weights, tmp_path / "out")
