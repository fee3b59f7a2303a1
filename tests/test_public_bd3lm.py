"""A public BD3-LM checkpoint (kuleshov-group/bd3lm-owt-block_size* layout: config.json with
block_size, cross_attn, attn_backend, model_length, ... and model.safetensors under `backbone.`)
loads as a block model, never as plain MDLM, and reproduces BD3-LM's forward: the fixture's
weights written in that layout, read back through `Pipeline.from_checkpoint`."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mdlm_dmmd.checkpoints import load_backbone
from mdlm_dmmd.diffusion.block_sampling import BlockSampler
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.pipeline import Pipeline

from conftest import fixture_path

FIXTURE = fixture_path("bd3lm-dit")
PUBLIC_CONFIG = {  # the public BD3LMConfig fields, at the fixture's size
    "architectures": ["BD3LM"], "model_type": "bd3lm", "auto_map": {"AutoConfig": "configuration_bd3lm.BD3LMConfig"},
    "block_size": 4, "vocab_size": 101, "model_length": 16, "cross_attn": True, "adaln": True,
    "attn_backend": "sdpa", "causal": False, "hidden_dim": 64, "cond_dim": 32, "n_blocks": 2, "n_heads": 4,
    "dropout": 0.0, "time_conditioning": False, "var_min": True, "sampling_eps_min": 1e-3, "sampling_eps_max": 0.999,
    "return_dict": False,
}


def public_dir(tmp_path, **changes):
    directory = tmp_path / "bd3lm-owt-block_size4"
    directory.mkdir(parents=True)
    weights = load_file(str(FIXTURE / "bd3lm_tiny_state_dict.safetensors"))
    save_file({f"backbone.{k}": v for k, v in weights.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({**PUBLIC_CONFIG, **changes}))
    return directory


def test_loads_as_a_block_model_and_reproduces_the_public_forward(tmp_path):
    io = load_file(str(FIXTURE / "bd3lm_tiny_io.safetensors"))
    pipeline = Pipeline.from_checkpoint(public_dir(tmp_path))
    assert isinstance(pipeline.sampler, BlockSampler) and pipeline.block_size == 4
    denoiser = pipeline.denoiser
    assert denoiser.block_size == 4 and not denoiser.time_conditioning and denoiser.process.mask_id == 100
    with torch.no_grad():  # training layout [x_t, x_0] then SUBS, as BD3-LM's `_subs_parameterization`
        log_p = denoiser(io["train_xt"], torch.full((3,), 0.5), clean=io["train_x0"])
    masked = io["train_xt"] == 100
    keep = torch.ones_like(log_p, dtype=torch.bool)
    keep[..., 100] = ~masked  # upstream subtracts 1e6 from the mask logit, we set it: both ≈ −1e6
    assert (log_p - io["train_logprobs_subs"])[keep].abs().max() <= 1e-5
    samples = pipeline.generate(2, steps=2, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (2, 16) and int(samples.max()) < 100


def test_keys_it_cannot_honour_are_named(tmp_path):
    with pytest.raises(UserError, match=r"attn_backend must be one of auto, sdpa, flash, flex; got 'xformers'"):
        load_backbone(public_dir(tmp_path / "a", attn_backend="xformers"))
    with pytest.raises(UserError, match=r"cross_attn='yes'; accepted: true"):
        load_backbone(public_dir(tmp_path / "b", cross_attn="yes"))
    with pytest.raises(UserError, match=r"block_size=4 \(model length 16\) without cross_attn=true"):
        load_backbone(public_dir(tmp_path / "c", cross_attn=False))
    # flex is honoured (on CPU it samples; training with it is refused elsewhere)
    assert Pipeline.from_checkpoint(public_dir(tmp_path / "d", attn_backend="flex")).network.config.attn_backend == "flex"


def test_public_gpt2_bd3lm_starts_samples_with_bos():
    """BD3-LM trains with ignore_bos and its sampler writes BOS (GPT-2's <|endoftext|>) first."""
    from mdlm_dmmd.checkpoint_meta import CheckpointMeta
    from mdlm_dmmd.models.dit import DiTConfig
    from mdlm_dmmd.pipeline import first_token
    from mdlm_dmmd.public_config import public_meta

    config = DiTConfig(vocab_size=50258, length=1024, hidden_dim=64, cond_dim=32, n_blocks=1, n_heads=2)
    meta = CheckpointMeta.from_dict(public_meta({**PUBLIC_CONFIG, "vocab_size": 50258}, config))
    assert first_token(meta) == 50256 and meta.mask_id == 50257
    plain = CheckpointMeta.from_dict(public_meta({"model_type": "mdlm", "vocab_size": 50258}, config))
    assert first_token(plain) is None
