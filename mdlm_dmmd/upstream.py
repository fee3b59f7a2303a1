"""Convert an upstream MDLM/Duo/BD3-LM Lightning `.ckpt` (pickled Hydra config and tokenizer)
into an exported directory, once, on a file you trust:

    python -m mdlm_dmmd.upstream convert UPSTREAM.ckpt OUT_DIR

This is the one place in the package that unpickles; everything else loads the result.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from mdlm_dmmd.checkpoints import META_KEY, load_backbone, save_backbone
from mdlm_dmmd.errors import UserError


def _plain(value):
    """Containers of tensors and Python scalars only: OmegaConf nodes become dicts/lists, and
    anything else (a pickled tokenizer, a custom class) is dropped."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=False)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(value, dict):
        return {str(k): v for k, v in ((k, _plain(v)) for k, v in value.items()) if v is not _DROP}
    if isinstance(value, (list, tuple)):
        return [v for v in (_plain(v) for v in value) if v is not _DROP]
    if value is None or isinstance(value, (Tensor, str, int, float, bool)):
        return value
    return _DROP


_DROP = object()


def convert_lightning_checkpoint(path: str | os.PathLike, directory: str | os.PathLike) -> Path:
    """Turn an upstream MDLM/Duo/BD3-LM Lightning `.ckpt` into an hf_dir checkpoint (EMA weights).

    Upstream files pickle their Hydra config and tokenizer, so this is the one place that
    unpickles (`weights_only=False`): run it once, on a file you trust; everything afterwards
    loads the safetensors directory. Objects other than tensors and plain config are dropped.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise UserError(f"{path} is not a readable torch checkpoint: {err}") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("state_dict"), dict):
        raise UserError(f"{path} is not a Lightning checkpoint (no 'state_dict' entry)")
    plain = {key: _plain(raw[key]) for key in ("state_dict", "ema", "hyper_parameters", META_KEY) if key in raw}
    with tempfile.TemporaryDirectory() as tmp:
        sanitized = Path(tmp) / "sanitized.ckpt"
        torch.save(plain, sanitized)
        loaded = load_backbone(sanitized)
    meta = {k: v for k, v in loaded.meta.to_dict().items() if k not in ("source", "format", "meta_version")}
    meta["converted_from"] = str(path)
    return save_backbone(directory, loaded.model, meta)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 4 or sys.argv[1] != "convert":
        print("usage: python -m mdlm_dmmd.upstream convert UPSTREAM.ckpt OUT_DIR", file=sys.stderr)
        sys.exit(2)
    try:
        print(convert_lightning_checkpoint(sys.argv[2], sys.argv[3]))
    except UserError as err:
        print(f"mdlm-dmmd: error: {err}", file=sys.stderr)
        sys.exit(2)
