"""Discrete images: scikit-learn's 8x8 digits as 64-token sequences, and a PNG grid writer.

`load_digits()` ships inside scikit-learn, so this is the fully offline image dataset: 1797
images whose pixels are the integers 0..16. Each pixel is one token (row-major), so the vocab
is 17 and a sequence is exactly 64 tokens. The train/valid split is a permutation seeded with
`data.split_seed` (default 0) and does not depend on the training seed, so the Fréchet-distance
classifier (`digits_arrays`) and the models always agree on which images are held out.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import Tensor

from mdlm_dmmd.data import DataBundle, TokenDataset, option
from mdlm_dmmd.errors import UserError

DIGITS_SHAPE = (8, 8)
DIGITS_LEVELS = 17  # pixel values 0..16


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.data.astype(np.int64), digits.target.astype(np.int64)


def digits_arrays(split: str = "all", *, valid_fraction: float = 0.1,
                  split_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Digits of one split ("train" | "valid" | "all") as (pixels [N, 64] int64, labels [N]).

    Same permutation as `build_digits` for the same `valid_fraction` and `split_seed`.
    """
    pixels, labels = _digits()
    if split == "all":
        return pixels.copy(), labels.copy()
    if split not in ("train", "valid"):
        raise UserError(f"digits split must be 'train', 'valid' or 'all', got '{split}'")
    if not 0.0 < valid_fraction < 1.0:
        raise UserError(f"data.valid_fraction must be in (0, 1), got {valid_fraction}")
    n = len(pixels)
    n_valid = max(1, round(n * valid_fraction))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed)).numpy()
    index = np.sort(perm[:n_valid] if split == "valid" else perm[n_valid:])
    return pixels[index], labels[index]


def build_digits(cfg: Mapping, length: int, *, seed: int = 0) -> DataBundle:
    """8x8 digits, 64 tokens per image, vocab 17; `model.length` must be 64."""
    if length != DIGITS_SHAPE[0] * DIGITS_SHAPE[1]:
        raise UserError(f"model.length must be 64 for data=digits, got {length}")
    kwargs = dict(valid_fraction=float(option(cfg, "valid_fraction", 0.1)),
                  split_seed=int(option(cfg, "split_seed", 0)))
    train, _ = digits_arrays("train", **kwargs)
    valid, _ = digits_arrays("valid", **kwargs)
    return DataBundle(train=TokenDataset(torch.from_numpy(train)),
                      valid=TokenDataset(torch.from_numpy(valid)),
                      vocab_size=DIGITS_LEVELS, tokenizer=None, modality="image",
                      bos_id=None, eos_id=None, image_shape=DIGITS_SHAPE)


def image_grid(tokens: Tensor | np.ndarray, *, nrow: int = 8, max_value: int = 16,
               image_shape: tuple[int, int] = DIGITS_SHAPE, scale: int = 1) -> np.ndarray:
    """Token images [N, H*W] laid out `nrow` per row as an RGB array in [0, 1].

    Ink is dark on white (pixel value / max_value, like sklearn's own plots). Tokens above
    `max_value`, i.e. mask ids left in a sample, are drawn red so they are not mistaken for ink.
    Each pixel is repeated `scale` times.
    """
    tokens = np.asarray(torch.as_tensor(tokens).cpu(), dtype=np.int64)
    h, w = image_shape
    if tokens.ndim != 2 or tokens.shape[1] != h * w or len(tokens) == 0:
        raise UserError(f"save_image_grid needs tokens of shape [N, {h * w}], "
                        f"got {list(tokens.shape)}")
    n, ncol = len(tokens), max(1, min(nrow, len(tokens)))
    nrows = -(-n // ncol)
    pad = 1
    canvas = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, 3), 0.75)  # grey frame
    for i, image in enumerate(tokens.reshape(n, h, w)):
        gray = 1.0 - np.clip(image, 0, max_value) / max_value  # [H, W], 1 = white
        rgb = np.repeat(gray[..., None], 3, axis=-1)
        rgb[image > max_value] = (1.0, 0.0, 0.0)
        r, c = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        canvas[top: top + h, left: left + w] = rgb
    return np.repeat(np.repeat(canvas, scale, axis=0), scale, axis=1)


def save_image_grid(tokens: Tensor | np.ndarray, path: str | os.PathLike, *, nrow: int = 8,
                    max_value: int = 16, image_shape: tuple[int, int] = DIGITS_SHAPE,
                    scale: int = 4) -> Path:
    """Write token images [N, H*W] as a PNG grid (`image_grid`, 4x enlarged); returns the path."""
    # matplotlib.image.imsave renders without a figure or GUI backend (same result as Agg).
    from matplotlib.image import imsave

    canvas = image_grid(tokens, nrow=nrow, max_value=max_value, image_shape=image_shape, scale=scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(path, canvas, format="png")
    return path
