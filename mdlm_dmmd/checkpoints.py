"""Load and save DiT backbones: public MDLM/Duo/BD3-LM checkpoints and this package's own.

Three formats load into one `DiT` (`research/host-pattern.md` §1.7, §8):

- **hf_dir**: a directory with `config.json` (public field names: `vocab_size`, `model_length`,
  `hidden_dim`, ...) and `model.safetensors`, keys with or without a leading `backbone.`; as
  published on the hub (MDLM, Duo, BD3-LM, and IDLM's students, which are MDLM/Duo `hf_dit`
  checkpoints). Public HF weights are already the EMA weights. A `.safetensors` file with a
  `config.json` beside it loads the same way. SDTT's released students (`jdeschena/sdtt`,
  `PyTorchModelHubMixin`) are this layout with the run's whole OmegaConf tree as config.json
  (the network under `model`, MDLM's Hydra names) and the module's state dict as weights.
- **lightning_ckpt**: a `.ckpt` written by this package's training host. Read with
  `torch.load(weights_only=True)`; holds `state_dict` (keys under a prefix such as `backbone.`
  or `generator.`), `mdlm_dmmd` = {"backbone_config": dit_config_to_public(config), "backbone_prefix":
  ..., other meta} and optionally `ema`.
- public Lightning ckpts *shaped* like upstream's (`ema.shadow_params` list), as long as they
  hold no pickled Python objects. Upstream's own files pickle their Hydra config and tokenizer,
  so they are refused with a message, never loaded unsafely.

`save_backbone` writes the hf_dir format, with this package's metadata under "mdlm_dmmd".
Nothing here knows about processes or algos beyond recording their names in `meta`.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from mdlm_dmmd.checkpoint_meta import CheckpointMeta
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.files import atomic_write
from mdlm_dmmd.models.dit import DiT, DiTConfig
from mdlm_dmmd.public_config import (
    dit_config_from_public,
    dit_config_to_public,
    is_sdtt_hub_config,
    public_meta,
    sdtt_hub_config,
    sdtt_hub_meta,
)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
META_KEY = "mdlm_dmmd"  # our metadata, in config.json and in Lightning checkpoints
# Schedule buffers BD3-LM's HF wrapper stores next to `backbone.*`; not backbone weights.
IGNORED_KEYS = ("sampling_eps_min", "sampling_eps_max")
# Always recomputable, so a state dict may omit it.
OPTIONAL_KEYS = ("rotary_emb.inv_freq",)


@dataclass
class LoadedBackbone:
    """A ready DiT, its config, and its typed metadata (`CheckpointMeta`).

    The loader sets `source`, `format`, `ema` and `noise_dim`. Public checkpoints also get
    inferred `process`, `mask_id`, `schedule`, `time_conditioning` (and `family` in `extra`);
    our own carry what the saver wrote.
    """

    model: DiT
    config: DiTConfig
    meta: CheckpointMeta = field(default_factory=CheckpointMeta)


# ----------------------------------------------------------------------------------------------
# Loading a state dict into a DiT


def _clean_keys(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop `_orig_mod.` (left by torch.compile) wherever it occurs in a key."""
    return {key.replace("_orig_mod.", ""): value for key, value in state_dict.items()}


def _few(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_backbone_weights(
    model: DiT,
    state_dict: dict[str, Tensor],
    *,
    allow_missing_noise: bool = True,
    source: str = "state dict",
) -> None:
    """Load DiT-keyed weights into `model`, checking names and shapes first.

    `allow_missing_noise` lets a teacher's weights initialise a noise-conditioned generator: its
    zero-initialised `noise_proj.weight` is kept, so the generator equals the teacher.
    Raises UserError (one line, starting with `source`) on vocab, key or shape mismatches.
    """
    state_dict = _clean_keys(state_dict)
    expected = model.state_dict()
    config = model.config

    embedding = state_dict.get("vocab_embed.embedding")
    if embedding is not None and embedding.ndim == 2 and embedding.shape[0] != config.vocab_size:
        raise UserError(
            f"{source}: checkpoint vocab_size {embedding.shape[0]} != config vocab_size {config.vocab_size}"
        )

    optional = set(OPTIONAL_KEYS) | ({"noise_proj.weight"} if allow_missing_noise else set())
    missing = [key for key in expected if key not in state_dict and key not in optional]
    unexpected = [key for key in state_dict if key not in expected]
    if unexpected:
        hint = ""
        if "noise_proj.weight" in unexpected:
            hint = f" (the checkpoint has a noise input of width {state_dict['noise_proj.weight'].shape[1]})"
        raise UserError(f"{source}: unexpected key(s) {_few(unexpected)} for this DiT config{hint}")
    if missing:
        raise UserError(f"{source}: missing key(s) {_few(missing)}")
    for key, want in expected.items():  # model order, so "first" follows the forward pass
        if key in state_dict and state_dict[key].shape != want.shape:
            raise UserError(
                f"{source}: shape mismatch for {key}: checkpoint {tuple(state_dict[key].shape)} "
                f"vs model {tuple(want.shape)} (check hidden_dim, cond_dim, n_heads, noise_dim, noise_grid)"
            )
    model.load_state_dict(state_dict, strict=False)


def _select_prefix(
    state_dict: dict[str, Tensor], prefix: str, *, source: str, others_allowed: bool
) -> dict[str, Tensor]:
    """Keys under `prefix`, stripped. Keys outside it are dropped when `others_allowed`
    (a Lightning module also holds teacher/aux networks) and otherwise refused."""
    state_dict = _clean_keys(state_dict)
    if not prefix:
        return state_dict
    selected = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    if not selected:
        found = sorted({key.split(".", 1)[0] + "." for key in state_dict})
        raise UserError(f"{source}: no weights under prefix {prefix!r}; found prefixes {_few(found, 5)}")
    outside = [key for key in state_dict if not key.startswith(prefix) and key not in IGNORED_KEYS]
    if outside and not others_allowed:
        raise UserError(f"{source}: unexpected key(s) {_few(outside)} outside prefix {prefix!r}")
    return selected


# ----------------------------------------------------------------------------------------------
# Formats


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"checkpoint config {path} is not readable JSON: {err}") from err
    if not isinstance(data, dict):
        raise UserError(f"checkpoint config {path} must hold a JSON object")
    return data


def _config_from(hf_dict: dict, source: Path) -> DiTConfig:
    try:
        return dit_config_from_public(hf_dict)
    except UserError as err:
        raise UserError(f"{source}: {err}") from err
    except TypeError as err:  # e.g. a field of the wrong type that validate() could not even compare
        raise UserError(f"{source}: bad backbone config: {err}") from err


def _load_safetensors_dir(config_path: Path, weights_path: Path, prefix: str | None, fmt: str):
    """(config, DiT-keyed state dict, meta) from config.json + a safetensors file."""
    hf_config = _read_json(config_path)
    sdtt = is_sdtt_hub_config(hf_config)
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise UserError(f"checkpoint {weights_path} is not a readable safetensors file: {err}") from err
    tensors = _clean_keys(tensors)
    if prefix is None:
        prefix = "backbone." if any(key.startswith("backbone.") for key in tensors) else ""
    # SDTT's mixin saves its whole LightningModule, so keys outside the backbone are expected there.
    state_dict = _select_prefix(tensors, prefix, source=str(weights_path), others_allowed=sdtt)
    for key in IGNORED_KEYS:
        state_dict.pop(key, None)
    if sdtt:
        embedding = state_dict.get("vocab_embed.embedding")
        if embedding is None:
            raise UserError(f"{weights_path}: an SDTT checkpoint needs backbone.vocab_embed.embedding (its "
                            "vocabulary size is read from it)")
        config = _config_from(sdtt_hub_config(hf_config, embedding.shape[0]), config_path)
        meta = sdtt_hub_meta(hf_config, config)
        meta.update(ema=False, format=fmt)
        return config, state_dict, meta
    config = _config_from(hf_config, config_path)

    if isinstance(hf_config.get(META_KEY), dict):
        meta = dict(hf_config[META_KEY])
    else:
        meta = public_meta(hf_config, config)
        # the public MDLM/Duo/BD3-LM hub exports copy the EMA shadow into the weights (host-pattern §8)
        meta["ema"] = True
        # BD3-LM's clipped-schedule bounds, kept as plain numbers for whoever needs them.
        for key in IGNORED_KEYS:
            if key in tensors and tensors[key].numel() == 1:
                meta[key] = float(tensors[key])
    meta.setdefault("ema", False)
    meta.update(format=fmt)
    return config, state_dict, meta


def _torch_load(path: Path) -> dict:
    # torch.save writes zip archives; anything else (text, JSON, legacy pickles) is not ours.
    if not zipfile.is_zipfile(path):
        raise UserError(
            f"{path} is not a checkpoint: expected a directory with {CONFIG_NAME} + {WEIGHTS_NAME}, "
            f"a .safetensors file next to {CONFIG_NAME}, or a Lightning .ckpt"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(
            f"{path} holds pickled Python objects (e.g. upstream's Hydra config or tokenizer) and is "
            "not loaded unsafely; convert it once, if you trust it: "
            f"python -m mdlm_dmmd.upstream convert {path} OUT_DIR (or use the published HF safetensors)"
        ) from err
    except Exception as err:  # a corrupt or foreign zip archive
        raise UserError(f"{path} is not a readable torch checkpoint: {err}") from err
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise UserError(f"{path} is not a Lightning checkpoint (no 'state_dict' entry)")
    return ckpt


def _lightning_config(ckpt: dict, state_dict: dict[str, Tensor], source: Path) -> tuple[DiTConfig, dict]:
    """Backbone config and meta: ours from `ckpt["mdlm_dmmd"]`, else a plain upstream
    `hyper_parameters.config.model` dict (Hydra names; vocab_size read from the weights)."""
    ours = ckpt.get(META_KEY)
    if isinstance(ours, dict) and isinstance(ours.get("backbone_config"), dict):
        meta = {key: value for key, value in ours.items() if key != "backbone_config"}
        return _config_from(ours["backbone_config"], source), meta

    hparams = ckpt.get("hyper_parameters")
    run_config = hparams.get("config", hparams) if isinstance(hparams, dict) else None
    model_config = run_config.get("model") if isinstance(run_config, dict) else None
    if not isinstance(model_config, dict):
        raise UserError(
            f"{source}: no backbone config found (neither '{META_KEY}.backbone_config' nor "
            "'hyper_parameters.config.model')"
        )
    model_config = dict(model_config)
    if "vocab_size" not in model_config and "vocab_embed.embedding" in state_dict:
        model_config["vocab_size"] = state_dict["vocab_embed.embedding"].shape[0]
    config = _config_from(model_config, source)
    algo = run_config.get("algo", {}) if isinstance(run_config, dict) else {}
    algo_name = str(algo.get("name", "")).lower() if isinstance(algo, dict) else ""
    architectures = ["DUO"] if algo_name.startswith("duo") or algo_name in ("udlm", "distillation") else []
    return config, public_meta({"architectures": architectures}, config)


def _apply_ema(model_params: list[str], state_dict: dict[str, Tensor], ema, prefix: str, source: Path) -> bool:
    """Overwrite parameters in `state_dict` with EMA shadows; True if any were applied.

    Two layouts:
    - ours: `ema["shadow"]` = {name: tensor}, names as in the DiT state dict (a leading
      `prefix` is tolerated);
    - upstream's: `ema["shadow_params"]` = [tensor, ...] with no names, in the order of the
      backbone's trainable parameters at registration (host-pattern §1.6, §3.1); zipped with
      `DiT.parameters()`, which keeps that order. Only correct when the EMA covered the
      backbone alone, as in MDLM/Duo/BD3-LM's (noise schedules without parameters).
    """
    if not isinstance(ema, dict):
        return False
    if isinstance(ema.get("shadow"), dict):
        shadow = _clean_keys(ema["shadow"])
        if prefix:
            shadow = {key[len(prefix):] if key.startswith(prefix) else key: value for key, value in shadow.items()}
        unknown = [key for key in shadow if key not in model_params]
        if unknown:
            raise UserError(f"{source}: EMA shadow has key(s) {_few(unknown)} that are not backbone parameters")
        state_dict.update(shadow)
        return bool(shadow)
    if isinstance(ema.get("shadow_params"), (list, tuple)):
        shadow_list = list(ema["shadow_params"])
        if len(shadow_list) != len(model_params):
            raise UserError(
                f"{source}: EMA shadow_params has {len(shadow_list)} tensors but the backbone has "
                f"{len(model_params)} parameters; cannot match them by order"
            )
        state_dict.update(zip(model_params, shadow_list))
        return True
    return False


# ----------------------------------------------------------------------------------------------
# Public API


def load_backbone(
    path: str | os.PathLike,
    *,
    prefix: str | None = None,
    use_ema: bool = True,
    map_location: str | torch.device = "cpu",
    attn_backend: str | None = None,
) -> LoadedBackbone:
    """Build a DiT from a checkpoint directory or file (formats in the module docstring).

    prefix: where the backbone's keys live in the state dict; default `backbone.` if present
        (hf_dir) or the prefix recorded in the Lightning checkpoint (else `backbone.`).
    use_ema: take EMA weights from a Lightning checkpoint when it has them.
    attn_backend: override the stored `attn_backend` (a runtime choice, not part of the
        weights), e.g. "sdpa" to open a flash-trained checkpoint on a CPU.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")

    if path.is_dir():
        config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
        if not config_path.is_file() or not weights_path.is_file():
            raise UserError(f"{path} is not a checkpoint directory: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
        config, state_dict, meta = _load_safetensors_dir(config_path, weights_path, prefix, "hf_dir")
    elif path.suffix == ".safetensors":
        config_path = path.parent / CONFIG_NAME
        if not config_path.is_file():
            raise UserError(f"checkpoint {path} needs a {CONFIG_NAME} next to it")
        config, state_dict, meta = _load_safetensors_dir(config_path, path, prefix, "safetensors")
    else:
        ckpt = _torch_load(path)
        ours = ckpt.get(META_KEY) if isinstance(ckpt.get(META_KEY), dict) else {}
        recorded_prefix = ours.get("backbone_prefix", "backbone.")
        prefix = recorded_prefix if prefix is None else prefix
        state_dict = _select_prefix(ckpt["state_dict"], prefix, source=str(path), others_allowed=True)
        config, meta = _lightning_config(ckpt, state_dict, path)
        meta.pop("backbone_prefix", None)
        meta["format"] = "lightning_ckpt"
        # The EMA belongs to the recorded backbone (e.g. the generator), not to a teacher or aux
        # network picked with another prefix.
        ema_state = ckpt.get("ema") if use_ema and prefix == recorded_prefix else None

    if attn_backend is not None:
        config.attn_backend = attn_backend
        config.validate()
    try:
        model = DiT(config)
    except UserError as err:
        raise UserError(f"{path}: {err}") from err
    if meta["format"] == "lightning_ckpt":
        param_names = [name for name, _ in model.named_parameters()]
        meta["ema"] = _apply_ema(param_names, state_dict, ema_state, prefix, path)
    load_backbone_weights(model, state_dict, allow_missing_noise=False, source=str(path))
    meta.update(source=str(path), noise_dim=config.noise_dim)
    typed = CheckpointMeta.from_dict(meta, source=str(path))  # the one place metadata is read
    typed.refuse_unsupported(str(path), config.length)
    return LoadedBackbone(model=model.to(map_location), config=config, meta=typed)


def save_backbone(directory: str | os.PathLike, model: DiT, meta: "dict | CheckpointMeta | None" = None) -> Path:
    """Write `model` as an hf_dir checkpoint: config.json (public names + `meta` under
    "mdlm_dmmd") and model.safetensors (keys under `backbone.`, the public layout).

    Files are written to a temporary name and renamed, so a crash never leaves half a file.
    """
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    hf_config = dit_config_to_public(model.config)
    if isinstance(meta, CheckpointMeta):  # e.g. a loaded checkpoint's, re-exported
        meta = meta.to_dict()
    if meta:
        hf_config[META_KEY] = CheckpointMeta.from_dict(meta, source=str(directory)).to_dict()
    tensors = {f"backbone.{key}": value.detach().cpu().contiguous() for key, value in model.state_dict().items()}

    with atomic_write(directory / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp))
    with atomic_write(directory / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(hf_config, indent=2, default=str) + "\n")
    return directory
