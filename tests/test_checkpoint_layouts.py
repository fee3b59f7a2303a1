"""Checkpoint layouts against hand-made files: a named EMA shadow under the backbone prefix,
upstream `shadow_params` of another length, upstream algo names and their process, public
families read from `model_type` or `architectures`, SDTT's time conditioning default, BD3-LM's
schedule bounds in the metadata, stored nulls and the next metadata version, and an export of
EMA weights that still says so. Each was written against a mutation the other tests let through.
"""

import json

import pytest
import torch
from safetensors.torch import save_file

from mdlm_dmmd.checkpoint_meta import META_VERSION, CheckpointMeta
from mdlm_dmmd.checkpoints import load_backbone
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.models.dit import DiTConfig
from mdlm_dmmd.public_config import dit_config_to_public, public_meta

from conftest import random_model


# ----------------------------------------------------------------------------- checkpoints


def _tiny(**overrides):
    fields = dict(vocab_size=11, length=8, hidden_dim=16, cond_dim=8, n_blocks=1, n_heads=2, dropout=0.0)
    fields.update(overrides)
    return DiTConfig(**fields)


def _logits(model):
    x = torch.randint(0, model.config.vocab_size, (2, model.config.length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(x, torch.tensor([0.0, 1.5]))


def test_named_ema_shadow_with_the_backbone_prefix_is_used(tmp_path):
    raw, averaged = random_model(_tiny(), seed=0), random_model(_tiny(), seed=1)
    ckpt = {"state_dict": {f"generator.{k}": v for k, v in raw.state_dict().items()},
            "ema": {"decay": 0.9, "num_updates": 3,
                    "shadow": {f"generator.{k}": v.detach().clone() for k, v in averaged.named_parameters()}},
            "mdlm_dmmd": {"backbone_config": dit_config_to_public(raw.config), "backbone_prefix": "generator.",
                          "process": "masked", "mask_id": 10}}
    torch.save(ckpt, tmp_path / "last.ckpt")
    loaded = load_backbone(tmp_path / "last.ckpt")
    assert loaded.meta.ema is True
    torch.testing.assert_close(_logits(loaded.model), _logits(averaged), atol=0, rtol=0)


def _upstream_ckpt(model, algo="duo_base", shadow=None):
    return {"state_dict": {f"backbone.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": {"config": {
                "algo": {"name": algo},
                "model": {"hidden_size": 16, "cond_dim": 8, "length": 8, "n_blocks": 1, "n_heads": 2, "dropout": 0.1}}},
            "ema": {"decay": 0.9999, "num_updates": 1,
                    "shadow_params": shadow if shadow is not None else [p.detach() for p in model.parameters()]}}


def test_upstream_shadow_params_of_another_length_are_refused(tmp_path):
    model = random_model(_tiny())
    shadow = [p.detach() for p in model.parameters()][:-1]  # one tensor short: order cannot be trusted
    torch.save(_upstream_ckpt(model, shadow=shadow), tmp_path / "short.ckpt")
    with pytest.raises(UserError, match="shadow_params has 19 tensors but the backbone has 20"):
        load_backbone(tmp_path / "short.ckpt")


@pytest.mark.parametrize("algo, process", [("duo", "uniform"), ("udlm", "uniform"), ("distillation", "uniform"),
                                           ("mdlm", "masked")])
def test_upstream_algo_names_give_the_process(tmp_path, algo, process):
    model = random_model(_tiny())
    torch.save(_upstream_ckpt(model, algo=algo), tmp_path / f"{algo}.ckpt")
    assert load_backbone(tmp_path / f"{algo}.ckpt").meta.process == process


def test_public_families_are_read_from_model_type_or_architectures():
    config = _tiny(vocab_size=50258)
    assert public_meta({"model_type": "duo"}, config)["process"] == "uniform"
    assert public_meta({"architectures": ["DUO"]}, config)["process"] == "uniform"
    block = public_meta({"architectures": ["BD3LM"], "cross_attn": True, "block_size": 4}, config)
    assert block["family"] == "bd3lm" and block["ignore_bos"] is True and block["vocab"]["bos_id"] == 50256
    assert public_meta({"model_type": "bd3lm", "cross_attn": True, "block_size": 4}, config)["family"] == "bd3lm"


def test_sdtt_without_a_time_conditioning_key_is_not_time_conditioned(tmp_path):
    model = random_model(_tiny(vocab_size=12))
    config = {"model": {"hidden_size": 16, "cond_dim": 8, "length": 8, "n_blocks": 1, "n_heads": 2, "dropout": 0.1},
              "parameterization": {"name": "multi-round-sdtt"}, "noise": {"type": "loglinear"}}
    directory = tmp_path / "sdtt"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    save_file({f"backbone.{k}": v.contiguous() for k, v in model.state_dict().items()},
              str(directory / "model.safetensors"))
    assert load_backbone(directory).meta.time_conditioning is False


def test_bd3lm_schedule_bounds_are_kept_in_the_metadata(tmp_path):
    model = random_model(_tiny())
    directory = tmp_path / "bd3lm"
    directory.mkdir()
    config = {**dit_config_to_public(model.config), "architectures": ["BD3LM"], "model_type": "bd3lm"}
    (directory / "config.json").write_text(json.dumps(config))
    tensors = {f"backbone.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors |= {"sampling_eps_min": torch.tensor(0.25), "sampling_eps_max": torch.tensor(0.75)}
    save_file(tensors, str(directory / "model.safetensors"))
    meta = load_backbone(directory).meta.to_dict()
    assert meta["sampling_eps_min"] == 0.25 and meta["sampling_eps_max"] == 0.75


def test_metadata_keeps_stored_nulls_and_refuses_the_next_version():
    assert CheckpointMeta.from_dict({"process": "masked", "mask_id": None}).to_dict() == \
        {"process": "masked", "mask_id": None, "meta_version": META_VERSION}
    with pytest.raises(UserError, match=f"metadata version {META_VERSION + 1}"):
        CheckpointMeta.from_dict({"meta_version": META_VERSION + 1})


def test_an_export_of_ema_weights_still_says_so(tmp_path):
    from mdlm_dmmd.checkpoints import save_backbone

    raw, averaged = random_model(_tiny(), seed=0), random_model(_tiny(), seed=1)
    ckpt = {"state_dict": {f"backbone.{k}": v for k, v in raw.state_dict().items()},
            "ema": {"decay": 0.9, "num_updates": 3,
                    "shadow": {k: v.detach().clone() for k, v in averaged.named_parameters()}},
            "mdlm_dmmd": {"backbone_config": dit_config_to_public(raw.config), "backbone_prefix": "backbone.",
                          "process": "masked", "mask_id": 10}}
    torch.save(ckpt, tmp_path / "last.ckpt")
    loaded = load_backbone(tmp_path / "last.ckpt")
    exported = load_backbone(save_backbone(tmp_path / "export", loaded.model, loaded.meta))
    assert exported.meta.ema is True and exported.meta.format == "hf_dir"
    torch.testing.assert_close(_logits(exported.model), _logits(averaged), atol=0, rtol=0)
