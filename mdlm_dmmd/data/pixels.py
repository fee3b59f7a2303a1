"""Colour images as pixel tokens: CIFAR-10 as 32·32·3 = 3072 tokens of 256 values (paper §6.1).

The paper models "the {0, …, 255}^{32×32×3} pixel values, resulting in a total of 3072 tokens"
and does not say in which order; this package uses the layout of every image here: row-major
over [H, W, C], channels last (the R, G, B values of a pixel are neighbours; `data.images`).

Sources (`data.source`):
- `hub`: Hugging Face `datasets` CIFAR-10 (`data.hub_name`, default `uoft-cs/cifar10`; its
  train split for training, its test split for validation), or a `datasets.save_to_disk` copy of
  it at `data.path` (the download needs network and never ran here; a saved copy is tested offline);
- `npy`: an array [N, H, W, C] of integers 0..255 at `data.path`;
- `png`: every `*.png` under the folder `data.path` (recursively, sorted by path), RGB.
For `npy` and `png` the validation rows are `data.valid_fraction` of the images, chosen by a
permutation seeded with `data.split_seed`. `data.image_size` (optional) centre-crops every image
to S × S for cheap runs; `model.length` must then be S·S·C.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from mdlm_dmmd.data import DataBundle, TokenDataset, option
from mdlm_dmmd.data.hub import failure_reason, is_hub_failure
from mdlm_dmmd.data.rows import split_indices
from mdlm_dmmd.errors import UserError

LEVELS = 256  # pixel values 0..255: the vocabulary (the masked process adds its mask)
SOURCES = ("hub", "npy", "png")


def build_pixels(cfg: Mapping, length: int, *, seed: int = 0) -> DataBundle:
    """Images of `data.source` as [N, H·W·C] tokens; `model.length` must be H·W·C."""
    del seed  # splits use data.split_seed
    source = option(cfg, "source", "hub")
    if source not in SOURCES:
        raise UserError(f"data.source must be one of {', '.join(SOURCES)}, got {source!r}")
    if source == "hub":
        train, valid = _hub_images(cfg)
    else:
        images = _npy_images(cfg) if source == "npy" else _png_images(cfg)
        train, valid = _split(images, float(option(cfg, "valid_fraction", 0.02)), int(option(cfg, "split_seed", 0)))
    size = option(cfg, "image_size", None)
    if size is not None:
        train, valid = _centre_crop(train, size), _centre_crop(valid, size)
    shape = tuple(int(v) for v in train.shape[1:])
    if int(np.prod(shape)) != length:
        raise UserError(f"model.length ({length}) must equal the images' H·W·C = {'·'.join(map(str, shape))} = "
                        f"{int(np.prod(shape))} for data={option(cfg, 'name')}")
    rows = lambda a: TokenDataset(torch.from_numpy(a.reshape(len(a), -1).astype(np.int64)))  # noqa: E731
    return DataBundle(train=rows(train), valid=rows(valid), vocab_size=LEVELS, tokenizer=None, modality="image",
                      bos_id=None, eos_id=None, image_shape=shape)


def _checked(images: np.ndarray, where: str) -> np.ndarray:
    """[N, H, W, C] integers in 0..255 (a 3-dim array is greyscale, C = 1)."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or len(images) < 2:
        raise UserError(f"{where}: expected images [N, H, W, C] with N >= 2, got shape {tuple(images.shape)}")
    if not np.issubdtype(images.dtype, np.integer):
        raise UserError(f"{where}: pixel values must be integers 0..255, got dtype {images.dtype}")
    low, high = int(images.min()), int(images.max())
    if low < 0 or high >= LEVELS:
        raise UserError(f"{where}: pixel values must be in 0..{LEVELS - 1} (the vocab), found {low if low < 0 else high}")
    return images.astype(np.uint8)


def _path(cfg: Mapping) -> Path:
    path = option(cfg, "path")
    if path is None:
        raise UserError(f"data.path is required for data.source={option(cfg, 'source')}")
    path = Path(str(path)).expanduser()
    if not path.exists():
        raise UserError(f"data.path '{path}' does not exist")
    return path


def _npy_images(cfg: Mapping) -> np.ndarray:
    path = _path(cfg)
    try:
        images = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise UserError(f"data.path '{path}' is not a .npy array: {error}") from None
    return _checked(images, f"data.path '{path}'")


def _png_images(cfg: Mapping) -> np.ndarray:
    from PIL import Image

    path = _path(cfg)
    files = sorted(path.rglob("*.png"))
    if not files:
        raise UserError(f"data.path '{path}' holds no *.png files")
    images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    if len({image.shape for image in images}) != 1:
        raise UserError(f"data.path '{path}': the PNGs differ in size; every image must have the same H × W")
    return _checked(np.stack(images), f"data.path '{path}'")


def _hub_images(cfg: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 from the hub (or a save_to_disk copy at data.path): train and test splits."""
    import datasets

    path = _path(cfg) if option(cfg, "path") else None
    hub_name = option(cfg, "hub_name", "uoft-cs/cifar10")
    try:
        data = datasets.load_from_disk(str(path)) if path else datasets.load_dataset(hub_name)
    except Exception as err:  # noqa: BLE001 - hub failures (any error of a local copy) wrapped, the rest re-raised
        if path is None and not is_hub_failure(err):
            raise
        where = f"data.path '{path}' (a save_to_disk copy)" if path else f"load_dataset('{hub_name}') from the hub"
        raise UserError(f"data=cifar10_pixels with data.source=hub: {where} failed: {failure_reason(err)}; "
                        "offline, use data.source=npy or png with data.path") from err
    column = next(c for c in ("img", "image") if c in data["train"].column_names)
    arrays = [np.stack([np.asarray(image.convert("RGB")) for image in data[split][column]]) for split in ("train", "test")]
    return _checked(arrays[0], "hub train split"), _checked(arrays[1], "hub test split")


def _split(images: np.ndarray, valid_fraction: float, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    train, valid = split_indices(len(images), valid_fraction, split_seed)
    return images[train], images[valid]


def _centre_crop(images: np.ndarray, size) -> np.ndarray:
    height, width = images.shape[1:3]
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= min(height, width):
        raise UserError(f"data.image_size must be an int in [1, {min(height, width)}] (a centre crop), got {size!r}")
    top, left = (height - size) // 2, (width - size) // 2
    return images[:, top: top + size, left: left + size]
