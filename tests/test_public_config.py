"""Public config.json names (MDLM/Duo/BD3-LM) <-> DiTConfig, in the checkpoint layer."""

import pytest

from mdlm_dmmd.errors import UserError
from mdlm_dmmd.models.dit import DiTConfig
from mdlm_dmmd.public_config import dit_config_from_public, dit_config_to_public


def tiny_config(**overrides) -> DiTConfig:
    fields = dict(vocab_size=13, length=10, hidden_dim=32, cond_dim=16, n_blocks=2, n_heads=4, dropout=0.0)
    fields.update(overrides)
    return DiTConfig(**fields)


def test_public_round_trip_and_public_fields():
    config = tiny_config(noise_dim=4, causal=True, attn_backend="sdpa")
    hf = dit_config_to_public(config)
    assert hf["model_length"] == config.length and "length" not in hf
    assert dit_config_from_public(hf) == config

    public_mdlm = {  # kuleshov-group/mdlm-owt config.json, sizes shrunk
        "architectures": ["MDLM"], "auto_map": {"AutoConfig": "configuration_mdlm.MDLMConfig"},
        "model_type": "mdlm", "vocab_size": 101, "model_length": 32, "hidden_dim": 64, "cond_dim": 32,
        "n_blocks": 2, "n_heads": 4, "dropout": 0.1, "time_conditioning": False, "return_dict": False,
        "torch_dtype": "float32",
    }
    config = dit_config_from_public(public_mdlm)
    assert (config.vocab_size, config.length, config.hidden_dim, config.cond_dim) == (101, 32, 64, 32)
    assert config.attn_backend == "auto" and config.noise_dim == 0 and not config.causal

    bd3lm = dict(public_mdlm, attn_backend="flash_attn", block_size=4, var_min=True, cross_attn=True)
    assert dit_config_from_public(bd3lm).attn_backend == "flash"


def test_from_public_names_missing_fields():
    with pytest.raises(UserError, match="missing required field.*model_length.*cond_dim"):
        dit_config_from_public({"vocab_size": 10, "hidden_dim": 32, "n_blocks": 1, "n_heads": 2})


def test_from_public_accepts_upstream_hydra_names_and_refuses_adaln_false():
    hydra = {"vocab_size": 101, "length": 16, "hidden_size": 64, "cond_dim": 32, "n_blocks": 2, "n_heads": 4}
    config = dit_config_from_public(hydra)
    assert (config.length, config.hidden_dim) == (16, 64)
    with pytest.raises(UserError, match="adaln=false"):
        dit_config_from_public(dict(hydra, adaln=False))


def test_from_public_refuses_bad_values():
    """A bad value is refused when the config is read, in one line naming the field."""
    good = {"vocab_size": 101, "model_length": 16, "hidden_dim": 64, "cond_dim": 32, "n_blocks": 2, "n_heads": 4}
    with pytest.raises(UserError, match=r"^model.hidden_dim \(64\) must be divisible by model.n_heads \(3\)$"):
        dit_config_from_public(dict(good, n_heads=3))
    with pytest.raises(UserError, match=r"^model.n_blocks must be a positive int, got 0$"):
        dit_config_from_public(dict(good, n_blocks=0))


def test_public_bd3lm_metadata():
    """GPT-2 BD3-LM (V = 50258 with the mask): data tokens 0..50256, BOS = EOS = <|endoftext|> 50256;
    without cross_attn no BOS rule is inferred (the model is not sampled block by block)."""
    from mdlm_dmmd.public_config import public_meta

    config = tiny_config(vocab_size=50258, length=16)
    meta = public_meta({"model_type": "bd3lm", "block_size": 4, "cross_attn": True}, config)
    assert meta["vocab"] == {"size": 50257, "bos_id": 50256, "eos_id": 50256} and meta["ignore_bos"] is True
    assert meta["mask_id"] == 50257 and meta["block_size"] == 4 and meta["cross_attn"] is True
    plain = public_meta({"model_type": "bd3lm", "block_size": 16, "cross_attn": False}, config)
    assert "ignore_bos" not in plain and "vocab" not in plain


def test_sdtt_hub_configs_are_told_apart_and_take_the_weights_vocabulary():
    from mdlm_dmmd.public_config import is_sdtt_hub_config, sdtt_hub_config

    assert is_sdtt_hub_config({"model": {"length": 8}, "parameterization": {"name": "multi-round-sdtt"}})
    assert not is_sdtt_hub_config({"model": {"length": 8}})  # a nested model node alone is not SDTT's tree
    assert not is_sdtt_hub_config({"model": "dit", "parameterization": {"name": "subs"}})
    hub = {"model": {"length": 8, "hidden_size": 16, "vocab_size": 5}, "parameterization": {}}
    assert sdtt_hub_config(hub, 11) == {"length": 8, "hidden_size": 16, "vocab_size": 11}
