"""Typed, versioned checkpoint metadata: old checkpoints load and sample identically, newer
versions and unsupported public keys are refused with one line."""

import json
from pathlib import Path

import pytest
import torch

from mdlm_dmmd.checkpoint_meta import META_VERSION, CheckpointMeta
from mdlm_dmmd.checkpoints import load_backbone, save_backbone
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.pipeline import Pipeline

from conftest import fixture_path

LEGACY = ("mdlm", 128), ("dmmd_masked", 2)  # (run, the steps `mode=sample sampling.steps=null` used)


def exponential_race(probs, generator=None):
    """The categorical draw of commit dfabb0a (one Exp(1) per vocabulary entry, argmax of p / e);
    the package now inverts the CDF with one uniform per row, which draws other tokens per seed."""
    e = -torch.log1p(-torch.rand(probs.shape, generator=generator, dtype=torch.float64))
    return (probs.double() / e).argmax(dim=-1)


@pytest.mark.parametrize("run,steps", LEGACY)
def test_checkpoint_written_before_the_change_loads_and_samples_identically(run, steps, monkeypatch):
    """tests/fixtures/legacy/: `mode=train` checkpoints written at commit dfabb0a (before typed
    metadata) and the samples that commit's `mode=sample` drew from them (seed 1, 4 samples),
    with that commit's categorical draw and dense steps restored (every sequence through the
    network before the revealed tokens are drawn: the order of the draws of a noise input)."""
    monkeypatch.setattr("mdlm_dmmd.diffusion.sampling.sample_categorical", exponential_race)
    monkeypatch.setattr("mdlm_dmmd.diffusion.sampling.takes_positions", lambda denoise: False)
    legacy = fixture_path("legacy")
    pipeline = Pipeline.from_checkpoint(legacy / f"{run}_dfabb0a.ckpt")
    assert "meta_version" not in torch.load(legacy / f"{run}_dfabb0a.ckpt", weights_only=True)["mdlm_dmmd"]
    assert pipeline.meta.version == META_VERSION
    assert int(pipeline.meta.sampling_steps or 128) == steps
    samples = pipeline.generate(4, steps=steps, generator=torch.Generator().manual_seed(1), batch_size=4)
    assert torch.equal(samples, torch.load(legacy / f"{run}_dfabb0a_samples.pt"))


def test_fields_round_trip_and_unknown_keys_are_kept():
    stored = {"process": "masked", "mask_id": 17, "schedule": "loglinear", "schedule_eps": 1e-3,
              "time_conditioning": False, "sampling_steps": 4, "family": "mdlm", "teacher_top_p": 0.9,
              "teacher_temperature": 0.7, "block_size": 4, "cross_attn": True, "noise_dim": 8}
    meta = CheckpointMeta.from_dict(stored)
    assert meta.mask_id == 17 and meta.sampling_steps == 4 and meta.time_conditioning is False
    assert meta.schedule == {"schedule": "loglinear", "schedule_eps": 1e-3} and meta.extra == {"family": "mdlm"}
    assert meta.to_dict() == {**stored, "meta_version": META_VERSION}
    assert CheckpointMeta.from_dict(meta.to_dict()) == meta


def test_newer_version_and_bad_fields_are_refused():
    with pytest.raises(UserError, match="newer mdlm-dmmd .*metadata version 99"):
        CheckpointMeta.from_dict({"meta_version": 99, "process": "masked"})
    with pytest.raises(UserError, match="process 'gaussian' is unknown"):
        CheckpointMeta.from_dict({"process": "gaussian"})
    with pytest.raises(UserError, match="sampling_rule 'fast' is unknown"):
        CheckpointMeta.from_dict({"sampling_rule": "fast"})


def _public_dir(tmp_path: Path, **extra) -> Path:
    from conftest import random_model
    from mdlm_dmmd.models.dit import DiTConfig

    model = random_model(DiTConfig(vocab_size=18, length=16, hidden_dim=16, cond_dim=8, n_blocks=1, n_heads=2, dropout=0.0))
    directory = save_backbone(tmp_path / "public", model)
    config = json.loads((directory / "config.json").read_text())
    config.update(extra)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_public_block_models_load_as_block_models_never_as_plain_diffusion(tmp_path):
    from mdlm_dmmd.diffusion.block_sampling import BlockSampler
    from mdlm_dmmd.diffusion.sampling import DiffusionSampler
    from mdlm_dmmd.pipeline import Pipeline

    # block_size < length without BD3-LM's [x_t, x_0] layout: no layout this package knows
    with pytest.raises(UserError, match="block_size=4 .*without cross_attn=true"):
        load_backbone(_public_dir(tmp_path / "a", block_size=4, model_type="bd3lm"))
    with pytest.raises(UserError, match="block_size=5 must be a positive int dividing the model length 16"):
        load_backbone(_public_dir(tmp_path / "d", block_size=5, cross_attn=True))
    # BD3-LM's layout: sampled block by block
    block = Pipeline.from_checkpoint(_public_dir(tmp_path / "b", cross_attn=True, block_size=4))
    assert isinstance(block.sampler, BlockSampler) and block.block_size == 4
    assert load_backbone(_public_dir(tmp_path / "c", block_size=16)).meta.block_size == 16  # = length: plain
    assert isinstance(Pipeline.from_checkpoint(_public_dir(tmp_path / "e", block_size=16)).sampler, DiffusionSampler)


@pytest.mark.parametrize("version", [-1, True, "1", 1.0])
def test_a_bad_meta_version_is_one_line(version):
    with pytest.raises(UserError, match=rf"^ckpt: metadata meta_version must be an int >= 0, got {version!r}$"):
        CheckpointMeta.from_dict({"meta_version": version, "process": "masked"}, source="ckpt")


@pytest.mark.parametrize("block_size", [0, -4, "4", 4.0, True])
def test_a_bad_block_size_is_one_line(block_size):
    meta = CheckpointMeta.from_dict({"process": "masked", "block_size": block_size, "cross_attn": True})
    with pytest.raises(UserError, match=rf"^ckpt: block_size={block_size!r} must be a positive int dividing the "
                                        "model length 16$"):
        meta.refuse_unsupported("ckpt", 16)
