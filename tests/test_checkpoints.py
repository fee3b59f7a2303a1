"""Checkpoint loading/saving: public HF layout, our own dirs, Lightning ckpts with EMA, errors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mdlm_dmmd.checkpoint_meta import META_VERSION, CheckpointMeta
from mdlm_dmmd.checkpoints import LoadedBackbone, load_backbone, load_backbone_weights, save_backbone
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.models.dit import DiT, DiTConfig
from mdlm_dmmd.public_config import dit_config_to_public, public_meta

from conftest import fixture_path, random_model

REPO_ROOT = Path(__file__).resolve().parents[1]


def fixture_dir() -> Path:
    """`tests/fixtures/mdlm-dit/`, in the repository (tests/fixtures/README.md says how it was made)."""
    return fixture_path("mdlm-dit")


PUBLIC_MDLM_CONFIG = {  # kuleshov-group/mdlm-owt config.json, sizes of the tiny fixture
    "architectures": ["MDLM"],
    "auto_map": {"AutoConfig": "configuration_mdlm.MDLMConfig", "AutoModelForMaskedLM": "modeling_mdlm.MDLM"},
    "model_type": "mdlm",
    "vocab_size": 101,
    "model_length": 32,
    "hidden_dim": 64,
    "cond_dim": 32,
    "n_blocks": 2,
    "n_heads": 4,
    "dropout": 0.1,
    "time_conditioning": False,
    "return_dict": False,
    "torch_dtype": "float32",
}


def write_public_dir(directory: Path, config: dict, state_dict: dict, extra: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    tensors = {f"backbone.{k}": v.contiguous() for k, v in state_dict.items()}
    tensors.update(extra or {})
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def tiny_config(**overrides) -> DiTConfig:
    fields = dict(vocab_size=11, length=8, hidden_dim=16, cond_dim=8, n_blocks=1, n_heads=2, dropout=0.0)
    fields.update(overrides)
    return DiTConfig(**fields)


def logits_of(model: DiT, noise: torch.Tensor | None = None) -> torch.Tensor:
    config = model.config
    x = torch.randint(0, config.vocab_size, (2, config.length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(x, torch.tensor([0.0, 1.5]), noise)


# ---------------------------------------------------------------------------------------------
# Public HF layout


def test_public_hf_dir_reproduces_fixture_logits(tmp_path):
    folder = fixture_dir()
    state_dict = load_file(str(folder / "mdlm_tiny_state_dict.safetensors"))
    io = load_file(str(folder / "mdlm_tiny_io.safetensors"))
    extra = {"sampling_eps_min": torch.tensor(1e-3), "sampling_eps_max": torch.tensor(0.999)}  # BD3-LM buffers
    directory = write_public_dir(tmp_path / "mdlm-owt", PUBLIC_MDLM_CONFIG, state_dict, extra)

    loaded = load_backbone(directory)
    assert isinstance(loaded, LoadedBackbone)
    assert loaded.config.hidden_dim == 64 and loaded.config.length == 32
    assert loaded.meta.process == "masked" and loaded.meta.mask_id == 100
    assert loaded.meta.time_conditioning is False and loaded.meta.format == "hf_dir"
    assert loaded.meta.source == str(directory)
    assert loaded.meta.ema is True  # the public hub exports copy the EMA shadow into the weights
    with torch.no_grad():
        logits = loaded.model.eval()(io["indices"], io["sigma"])
    # 5e-5 on logits up to 8.5: fp32 summation order differs between kernels, thread counts and
    # devices (1.2e-5 seen on an H100, 2026-11-26); a wrong formula is off by far more.
    assert (logits - io["logits"]).abs().max().item() <= 5e-5

    # The same weights as a lone .safetensors file next to config.json.
    single = load_backbone(directory / "model.safetensors")
    assert single.meta.format == "safetensors"
    with torch.no_grad():
        assert torch.equal(single.model.eval()(io["indices"], io["sigma"]), logits)


def test_duo_config_infers_uniform_process(tmp_path):
    model = random_model(tiny_config())
    duo = {"architectures": ["DUO"], "vocab_size": 11, "model_length": 8, "hidden_dim": 16, "cond_dim": 8,
           "n_blocks": 1, "n_heads": 2, "dropout": 0.1, "causal": False, "var_min": True}
    directory = write_public_dir(tmp_path / "duo", duo, model.state_dict())
    loaded = load_backbone(directory)
    assert loaded.meta.process == "uniform" and loaded.meta.mask_id is None
    assert loaded.meta.time_conditioning is True
    torch.testing.assert_close(logits_of(loaded.model), logits_of(model), atol=0, rtol=0)


SDTT_HUB_CONFIG = {  # jdeschena/sdtt config.json: the run's OmegaConf tree (MultiRoundSDTT.push_to_hub), sizes shrunk
    "mode": "train", "backbone": "dit", "time_conditioning": False, "T": 0, "subs_masking": False,
    "model": {"name": "small", "type": "ddit", "hidden_size": 16, "cond_dim": 8, "length": 8, "n_blocks": 1,
              "n_heads": 2, "scale_by_sigma": True, "dropout": 0.1, "tie_word_embeddings": False},
    "parameterization": {"name": "multi-round-sdtt", "num_distill_steps": 2, "orig_num_sampling_steps": 1024,
                         "min_num_sampling_steps": 4, "distill_mode": "kl-bwd", "grow_dt_every": 10000,
                         "checkpoint_path": "kuleshov-group/mdlm-owt", "start_from_hf": True},
    "noise": {"type": "loglinear", "sigma_min": 1e-4, "sigma_max": 20},
    "tokenizer": {"name": "gpt2"},
}


def test_sdtt_hub_layout_loads_as_a_masked_mdlm_network(tmp_path):
    """A directory as `MultiRoundSDTT.from_pretrained` reads it: config.json = the OmegaConf tree,
    model.safetensors = the module's state dict (the backbone under `backbone.`, other entries
    beside it); the vocabulary size comes from the embedding, the mask is the last id."""
    model = random_model(tiny_config(vocab_size=12))
    extra = {"sampling_eps_tensor": torch.tensor(1e-3)}  # a module buffer outside the backbone
    directory = write_public_dir(tmp_path / "sdtt", SDTT_HUB_CONFIG, model.state_dict(), extra)
    loaded = load_backbone(directory)
    assert (loaded.config.vocab_size, loaded.config.length, loaded.config.hidden_dim) == (12, 8, 16)
    assert loaded.meta.process == "masked" and loaded.meta.mask_id == 11 and loaded.meta.time_conditioning is False
    assert loaded.meta.schedule == {"schedule": "loglinear"} and loaded.meta.format == "hf_dir"
    torch.testing.assert_close(logits_of(loaded.model), logits_of(model), atol=0, rtol=0)
    (directory / "model.safetensors").unlink()
    save_file({"backbone.blocks.0.attn_qkv.weight": torch.zeros(48, 16)}, str(directory / "model.safetensors"))
    with pytest.raises(UserError, match="an SDTT checkpoint needs backbone.vocab_embed.embedding"):
        load_backbone(directory)


@pytest.mark.parametrize("model_type, process", [("mdlm", "masked"), ("duo", "uniform")])
def test_idlm_students_load_in_the_hf_dit_layout(tmp_path, model_type, process):
    """kekchpek/idlm-mdlm, idlm-duo and idlm-dcd are read by IDLM's code as `algo.backbone=hf_dit`
    (its README), i.e. MDLM/Duo hub directories: they load as such, as the right process."""
    model = random_model(tiny_config())
    config = {"architectures": [model_type.upper()], "model_type": model_type, "vocab_size": 11, "model_length": 8,
              "hidden_dim": 16, "cond_dim": 8, "n_blocks": 1, "n_heads": 2, "dropout": 0.1}
    loaded = load_backbone(write_public_dir(tmp_path / f"idlm-{model_type}", config, model.state_dict()))
    assert loaded.meta.process == process
    torch.testing.assert_close(logits_of(loaded.model), logits_of(model), atol=0, rtol=0)


def test_unprefixed_keys_and_compiled_prefix_load(tmp_path):
    model = random_model(tiny_config())
    directory = tmp_path / "plain"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(dit_config_to_public(model.config)))
    save_file({f"_orig_mod.{k}": v.contiguous() for k, v in model.state_dict().items()},
              str(directory / "model.safetensors"))
    loaded = load_backbone(directory)
    torch.testing.assert_close(logits_of(loaded.model), logits_of(model), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# save_backbone round trip


@pytest.mark.parametrize("noise_dim, noise_grid", [(0, None), (3, None), (3, [2, 4])])
def test_save_load_round_trip(tmp_path, noise_dim, noise_grid):
    model = random_model(tiny_config(noise_dim=noise_dim, noise_grid=noise_grid, attn_backend="sdpa"))
    meta = {"process": "masked", "mask_id": 10, "schedule": "loglinear", "time_conditioning": False}
    path = save_backbone(tmp_path / "out", model, meta)
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]  # no temporary left
    assert all(k.startswith("backbone.") for k in load_file(str(path / "model.safetensors")))

    loaded = load_backbone(path)
    assert loaded.config == model.config
    assert loaded.meta.noise_dim == noise_dim
    assert {k: loaded.meta.to_dict()[k] for k in meta} == meta
    noise = model.draw_noise(2, model.config.length, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(logits_of(loaded.model, noise), logits_of(model, noise), atol=0, rtol=0)


def test_attn_backend_override(tmp_path):
    path = save_backbone(tmp_path / "out", random_model(tiny_config(attn_backend="flex")))
    assert load_backbone(path).config.attn_backend == "flex"
    assert load_backbone(path, attn_backend="sdpa").config.attn_backend == "sdpa"


def test_teacher_weights_initialise_noise_generator():
    teacher = random_model(tiny_config())
    generator = DiT(tiny_config(noise_dim=4))
    load_backbone_weights(generator, teacher.state_dict(), allow_missing_noise=True)
    noise = generator.draw_noise(2, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits_of(generator, noise), logits_of(teacher), atol=0, rtol=0)
    with pytest.raises(UserError, match="missing key.*noise_proj.weight"):
        load_backbone_weights(DiT(tiny_config(noise_dim=4)), teacher.state_dict(), allow_missing_noise=False)


# ---------------------------------------------------------------------------------------------
# Lightning checkpoints


def lightning_ckpt(model: DiT, ema_model: DiT, prefix: str = "generator.", named: bool = True,
                   shadow_prefix: str = "") -> dict:
    """What this package's training host stores, plus another network under a second prefix;
    a named EMA shadow's keys carry `shadow_prefix` (e.g. the backbone's own prefix)."""
    state_dict = {f"{prefix}{k}": v for k, v in model.state_dict().items()}
    state_dict.update({f"teacher.{k}": torch.zeros_like(v) for k, v in model.state_dict().items()})
    params = dict(ema_model.named_parameters())
    if named:
        ema = {"decay": 0.9999, "num_updates": 7,
               "shadow": {f"{shadow_prefix}{k}": v.detach().clone() for k, v in params.items()}}
    else:  # upstream layout: a bare list in parameter order
        ema = {"decay": 0.9999, "num_updates": 7, "shadow_params": [p.detach().clone() for p in params.values()]}
    return {
        "state_dict": state_dict,
        "ema": ema,
        "mdlm_dmmd": {"backbone_config": dit_config_to_public(model.config), "backbone_prefix": prefix,
                      "process": "masked", "mask_id": 10},
        "global_step": 7,
    }


@pytest.mark.parametrize("named", [True, False])
def test_lightning_ckpt_uses_ema_weights(tmp_path, named):
    raw, averaged = random_model(tiny_config(), seed=0), random_model(tiny_config(), seed=1)
    path = tmp_path / "last.ckpt"
    torch.save(lightning_ckpt(raw, averaged, named=named), path)

    loaded = load_backbone(path)
    assert loaded.meta.ema is True and loaded.meta.format == "lightning_ckpt"
    assert loaded.meta.process == "masked" and loaded.meta.mask_id == 10
    torch.testing.assert_close(logits_of(loaded.model), logits_of(averaged), atol=0, rtol=0)

    no_ema = load_backbone(path, use_ema=False)
    assert no_ema.meta.ema is False
    torch.testing.assert_close(logits_of(no_ema.model), logits_of(raw), atol=0, rtol=0)


def test_lightning_ckpt_prefix_argument(tmp_path):
    model = random_model(tiny_config())
    path = tmp_path / "last.ckpt"
    torch.save(lightning_ckpt(model, model), path)
    teacher = load_backbone(path, prefix="teacher.")  # the zeros stored under teacher.*
    assert teacher.meta.ema is False  # the EMA belongs to the generator, not the teacher
    assert not teacher.model.blocks[0].attn_qkv.weight.any()
    with pytest.raises(UserError, match="no weights under prefix 'aux.'"):
        load_backbone(path, prefix="aux.")


def upstream_ckpt(model: DiT, algo: str = "duo_base", shadow: list | None = None) -> dict:
    """An upstream MDLM/Duo Lightning checkpoint: `backbone.*`, the Hydra config, a bare shadow list."""
    return {
        "state_dict": {f"backbone.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {"config": {
            "algo": {"name": algo},
            "model": {"hidden_size": 16, "cond_dim": 8, "length": 8, "n_blocks": 1, "n_heads": 2, "dropout": 0.1},
        }},
        "ema": {"decay": 0.9999, "num_updates": 1,
                "shadow_params": shadow if shadow is not None else [p.detach() for p in model.parameters()]},
    }


def test_upstream_shaped_ckpt_with_plain_hyper_parameters(tmp_path):
    model = random_model(tiny_config())
    torch.save(upstream_ckpt(model), tmp_path / "duo.ckpt")
    loaded = load_backbone(tmp_path / "duo.ckpt")
    assert loaded.config.vocab_size == 11 and loaded.meta.process == "uniform"
    torch.testing.assert_close(logits_of(loaded.model), logits_of(model), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# Errors: one line, naming the path


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_backbone(tmp_path / "nope.ckpt")


def test_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("hello")
    with pytest.raises(UserError, match=f"{path} is not a checkpoint"):
        load_backbone(path)


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PUBLIC_MDLM_CONFIG))
    with pytest.raises(UserError, match="needs config.json and model.safetensors"):
        load_backbone(tmp_path)


def test_safetensors_without_config(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(UserError, match="needs a config.json next to it"):
        load_backbone(tmp_path / "w.safetensors")


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "upstream.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"tokenizer": Path("gpt2")}}, path)
    with pytest.raises(UserError, match="pickled Python objects"):
        load_backbone(path)


def test_missing_config_fields(tmp_path):
    model = random_model(tiny_config())
    config = {k: v for k, v in dit_config_to_public(model.config).items() if k not in ("cond_dim", "n_heads")}
    directory = write_public_dir(tmp_path / "d", config, model.state_dict())
    with pytest.raises(UserError, match="missing required field.*cond_dim, n_heads"):
        load_backbone(directory)


def test_vocab_mismatch(tmp_path):
    model = random_model(tiny_config())
    directory = write_public_dir(tmp_path / "d", dict(dit_config_to_public(model.config), vocab_size=12), model.state_dict())
    with pytest.raises(UserError, match="checkpoint vocab_size 11 != config vocab_size 12"):
        load_backbone(directory)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    model = random_model(tiny_config())
    directory = write_public_dir(tmp_path / "d", dict(dit_config_to_public(model.config), cond_dim=4), model.state_dict())
    with pytest.raises(UserError, match=r"shape mismatch for sigma_map.mlp.0.weight: checkpoint \(8, 256\) vs model \(4, 256\)"):
        load_backbone(directory)


def test_missing_and_unexpected_keys(tmp_path):
    model = random_model(tiny_config())
    state_dict = model.state_dict()
    del state_dict["blocks.0.attn_out.weight"]
    directory = write_public_dir(tmp_path / "missing", dit_config_to_public(model.config), state_dict)
    with pytest.raises(UserError, match="missing key.*blocks.0.attn_out.weight"):
        load_backbone(directory)

    extra = {"backbone.blocks.7.norm1.weight": torch.ones(16)}
    directory = write_public_dir(tmp_path / "unexpected", dit_config_to_public(model.config), model.state_dict(), extra)
    with pytest.raises(UserError, match="unexpected key.*blocks.7.norm1.weight"):
        load_backbone(directory)

    stray = {"scheduler.step": torch.ones(1)}  # outside the backbone prefix of an HF dir
    directory = write_public_dir(tmp_path / "stray", dit_config_to_public(model.config), model.state_dict(), stray)
    with pytest.raises(UserError, match="scheduler.step"):
        load_backbone(directory)


def test_noise_checkpoint_into_plain_config_hints_noise_dim(tmp_path):
    model = random_model(tiny_config(noise_dim=3))
    directory = write_public_dir(tmp_path / "d", dit_config_to_public(tiny_config()), model.state_dict())
    with pytest.raises(UserError, match="has a noise input of width 3"):
        load_backbone(directory)


# ---------------------------------------------------------------------------------------------
# Layouts that mutation testing found untested


def test_named_ema_shadow_with_the_backbone_prefix_is_used(tmp_path):
    raw, averaged = random_model(tiny_config(), seed=0), random_model(tiny_config(), seed=1)
    torch.save(lightning_ckpt(raw, averaged, shadow_prefix="generator."), tmp_path / "last.ckpt")
    loaded = load_backbone(tmp_path / "last.ckpt")
    assert loaded.meta.ema is True
    torch.testing.assert_close(logits_of(loaded.model), logits_of(averaged), atol=0, rtol=0)


def test_upstream_shadow_params_of_another_length_are_refused(tmp_path):
    model = random_model(tiny_config())
    shadow = [p.detach() for p in model.parameters()][:-1]  # one tensor short: order cannot be trusted
    torch.save(upstream_ckpt(model, shadow=shadow), tmp_path / "short.ckpt")
    with pytest.raises(UserError, match="shadow_params has 19 tensors but the backbone has 20"):
        load_backbone(tmp_path / "short.ckpt")


@pytest.mark.parametrize("algo, process", [("duo", "uniform"), ("udlm", "uniform"), ("distillation", "uniform"),
                                           ("mdlm", "masked")])
def test_upstream_algo_names_give_the_process(tmp_path, algo, process):
    torch.save(upstream_ckpt(random_model(tiny_config()), algo=algo), tmp_path / f"{algo}.ckpt")
    assert load_backbone(tmp_path / f"{algo}.ckpt").meta.process == process


def test_public_families_are_read_from_model_type_or_architectures():
    config = tiny_config(vocab_size=50258)
    assert public_meta({"model_type": "duo"}, config)["process"] == "uniform"
    assert public_meta({"architectures": ["DUO"]}, config)["process"] == "uniform"
    block = public_meta({"architectures": ["BD3LM"], "cross_attn": True, "block_size": 4}, config)
    assert block["family"] == "bd3lm" and block["ignore_bos"] is True and block["vocab"]["bos_id"] == 50256
    assert public_meta({"model_type": "bd3lm", "cross_attn": True, "block_size": 4}, config)["family"] == "bd3lm"


def test_sdtt_without_a_time_conditioning_key_is_not_time_conditioned(tmp_path):
    model = random_model(tiny_config(vocab_size=12))
    config = {"model": {"hidden_size": 16, "cond_dim": 8, "length": 8, "n_blocks": 1, "n_heads": 2, "dropout": 0.1},
              "parameterization": {"name": "multi-round-sdtt"}, "noise": {"type": "loglinear"}}
    directory = write_public_dir(tmp_path / "sdtt", config, model.state_dict())
    assert load_backbone(directory).meta.time_conditioning is False


def test_bd3lm_schedule_bounds_are_kept_in_the_metadata(tmp_path):
    model = random_model(tiny_config())
    config = {**dit_config_to_public(model.config), "architectures": ["BD3LM"], "model_type": "bd3lm"}
    bounds = {"sampling_eps_min": torch.tensor(0.25), "sampling_eps_max": torch.tensor(0.75)}
    meta = load_backbone(write_public_dir(tmp_path / "bd3lm", config, model.state_dict(), bounds)).meta.to_dict()
    assert meta["sampling_eps_min"] == 0.25 and meta["sampling_eps_max"] == 0.75


def test_metadata_keeps_stored_nulls_and_refuses_the_next_version():
    assert CheckpointMeta.from_dict({"process": "masked", "mask_id": None}).to_dict() == \
        {"process": "masked", "mask_id": None, "meta_version": META_VERSION}
    with pytest.raises(UserError, match=f"metadata version {META_VERSION + 1}"):
        CheckpointMeta.from_dict({"meta_version": META_VERSION + 1})


def test_an_export_of_ema_weights_still_says_so(tmp_path):
    raw, averaged = random_model(tiny_config(), seed=0), random_model(tiny_config(), seed=1)
    torch.save(lightning_ckpt(raw, averaged, prefix="backbone."), tmp_path / "last.ckpt")
    loaded = load_backbone(tmp_path / "last.ckpt")
    exported = load_backbone(save_backbone(tmp_path / "export", loaded.model, loaded.meta))
    assert exported.meta.ema is True and exported.meta.format == "hf_dir"
    torch.testing.assert_close(logits_of(exported.model), logits_of(averaged), atol=0, rtol=0)
