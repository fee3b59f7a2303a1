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


def test_block_pipeline_starts_with_bos_stops_at_eos_and_slides(tmp_path):
    """Our own export of a block model trained with ignore_bos: samples start with its BOS;
    stop_at_eos EOS-fills a row after its first EOS past position 0 and needs the EOS id;
    `length` beyond the model's slides a window of the model's length."""
    from mdlm_dmmd.checkpoints import save_backbone

    model = load_backbone(public_dir(tmp_path)).model
    meta = {"process": "masked", "mask_id": 100, "schedule": "loglinear", "time_conditioning": False,
            "block_size": 4, "cross_attn": True, "ignore_bos": True, "vocab": {"size": 100, "bos_id": 7}}
    pipe = Pipeline.from_checkpoint(save_backbone(tmp_path / "no_eos", model, meta))
    free = pipe.generate(4, steps=2, generator=torch.Generator().manual_seed(0))
    assert (free[:, 0] == 7).all()
    with pytest.raises(UserError, match=r"^sampling.stop_at_eos needs the data's EOS id"):
        pipe.generate(2, steps=2, stop_at_eos=True)
    # an EOS that some row draws at position >= 1 with other tokens after it
    eos = next(int(row[i]) for row in free for i in range(1, 15) if (row[i + 1:] != row[i]).any())
    pipe = Pipeline.from_checkpoint(save_backbone(tmp_path / "eos", model, {**meta, "vocab": {"size": 100, "bos_id": 7,
                                                                                              "eos_id": eos}}))
    stopped = pipe.generate(4, steps=2, generator=torch.Generator().manual_seed(0), stop_at_eos=True)
    assert not torch.equal(stopped, free)
    for row in stopped.tolist():
        ends = [i for i in range(1, 16) if row[i] == eos]
        assert not ends or set(row[ends[0]:]) == {eos}, row
    widths = []  # tokens the network reads per call (no cache: the whole window)
    hook = pipe.network.vocab_embed.register_forward_pre_hook(lambda module, args: widths.append(args[0].shape[1]))
    long = pipe.generate(2, steps=2, generator=torch.Generator().manual_seed(0), length=32, kv_cache=False)
    hook.remove()
    assert long.shape == (2, 32) and (long[:, 0] == 7).all() and int(long.max()) < 100
    assert max(widths) == 16  # never more than the model's length
