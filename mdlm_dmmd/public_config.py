"""The public config.json names of a DiT (MDLMConfig, DUOConfig, BD3LMConfig, SDTT's hub config) <-> `DiTConfig`.

Part of the checkpoint layer (`checkpoints.py` reads and writes with it): the model knows only
its own field names. Upstream's Hydra names (`hidden_size`, `length`) are accepted too, for
configs stored in Lightning checkpoints. What a public config means beyond the backbone's size
(block size, cross attention, time conditioning) is read by the checkpoint loader, not here.
"""

from __future__ import annotations

import dataclasses

from mdlm_dmmd.errors import UserError
from mdlm_dmmd.models.dit import DiTConfig

# Public name -> DiTConfig field.
PUBLIC_FIELDS = {
    "vocab_size": "vocab_size",
    "model_length": "length",
    "length": "length",
    "hidden_dim": "hidden_dim",
    "hidden_size": "hidden_dim",
    "cond_dim": "cond_dim",
    "n_blocks": "n_blocks",
    "n_heads": "n_heads",
    "dropout": "dropout",
    "causal": "causal",
    "attn_backend": "attn_backend",
    "noise_dim": "noise_dim",
    "noise_grid": "noise_grid",
}
REQUIRED = ("vocab_size", "length", "hidden_dim", "cond_dim", "n_blocks", "n_heads")
GPT2_MODEL_VOCAB = 50258  # GPT-2's 50257 tokens + the mask
# BD3-LM spells its flash backend `flash_attn`.
BACKEND_ALIASES = {"flash_attn": "flash"}


def dit_config_to_public(config: DiTConfig) -> dict:
    """The config's fields under the public config.json names (`model_length`, not `length`)."""
    d = dataclasses.asdict(config)
    d["model_length"] = d.pop("length")
    return d


def dit_config_from_public(d: dict) -> DiTConfig:
    """Read a public MDLM/Duo/BD3-LM config.json (or our own); unknown fields are ignored.

    `cond_dim` is required although MDLMConfig defaults it to 129: every public checkpoint
    stores it (128, or 64 for BD3-LM tiny), and guessing would fail on shapes later anyway.
    Raises UserError (one line) for a missing field or a bad value.
    """
    if d.get("adaln", True) is False:
        raise UserError("config has adaln=false; only adaLN DiTs (the public default) are supported")
    fields = {PUBLIC_FIELDS[key]: value for key, value in d.items() if key in PUBLIC_FIELDS}
    missing = [name for name in REQUIRED if name not in fields]
    if missing:
        public = {v: k for k, v in reversed(list(PUBLIC_FIELDS.items()))}
        raise UserError(f"config is missing required field(s): {', '.join(public[m] for m in missing)}")
    if "attn_backend" in fields:
        fields["attn_backend"] = BACKEND_ALIASES.get(fields["attn_backend"], fields["attn_backend"])
    config = DiTConfig(**fields)
    config.validate()
    return config


def public_meta(hf_config: dict, config: DiTConfig) -> dict:
    """Defaults for a public checkpoint without our metadata (host-pattern §3.7, §8).

    Duo is uniform-state and always conditions on sigma; MDLM and BD3-LM are masked with the
    mask token as the last id and feed sigma = 0 unless `time_conditioning` says otherwise.
    """
    architectures = [str(name).lower() for name in hf_config.get("architectures") or []]
    model_type = str(hf_config.get("model_type", "")).lower()
    if model_type == "duo" or "duo" in architectures:
        family = "duo"
    elif model_type == "bd3lm" or "bd3lm" in architectures:
        family = "bd3lm"
    else:
        family = "mdlm"
    uniform = family == "duo"
    meta = {
        "family": family,
        "process": "uniform" if uniform else "masked",
        "mask_id": None if uniform else config.vocab_size - 1,
        "schedule": "loglinear",
        "time_conditioning": bool(hf_config.get("time_conditioning", uniform)),
    }
    for key in ("block_size", "cross_attn"):  # recorded so that the loader can refuse what it cannot honour
        if key in hf_config:
            meta[key] = hf_config[key]
    if "cross_attn" in meta and not isinstance(meta["cross_attn"], bool):
        raise UserError(f"config has cross_attn={meta['cross_attn']!r}; accepted: true (BD3-LM's [x_t, x_0] layout) "
                        "or false")
    if family == "bd3lm" and meta.get("cross_attn"):
        # BD3-LM trains with ignore_bos and starts every sample with BOS; its public checkpoints
        # are GPT-2 models (V = 50258: BOS = <|endoftext|> 50256, mask 50257).
        meta["ignore_bos"] = True
        if config.vocab_size == GPT2_MODEL_VOCAB:
            meta["vocab"] = {"size": GPT2_MODEL_VOCAB - 1, "bos_id": GPT2_MODEL_VOCAB - 2, "eos_id": GPT2_MODEL_VOCAB - 2}
    return meta


def is_sdtt_hub_config(d: dict) -> bool:
    """SDTT's released students (`jdeschena/sdtt` revisions, `PyTorchModelHubMixin`): config.json
    is the run's whole OmegaConf tree (`model`, `parameterization`, `tokenizer`, ...), not a
    flat model config."""
    return isinstance(d.get("model"), dict) and isinstance(d.get("parameterization"), dict)


def sdtt_hub_config(d: dict, vocab_size: int) -> dict:
    """The flat model config of an SDTT hub config: its `model` node (MDLM's Hydra names,
    `hidden_size`, `length`) with the vocabulary size read from the weights (it is not stored)."""
    return {**d["model"], "vocab_size": vocab_size}


def sdtt_hub_meta(d: dict, config: DiTConfig) -> dict:
    """SDTT students are MDLM networks: masked, the mask token last, log-linear schedule."""
    return {"family": "sdtt", "process": "masked", "mask_id": config.vocab_size - 1, "schedule": "loglinear",
            "time_conditioning": bool(d.get("time_conditioning", False))}
