"""Discrete images: scikit-learn's 8x8 digits as 64-token sequences, and a PNG grid writer.

An image of shape (H, W, C) is H·W·C tokens, row-major over [H, W, C] (channels last: the C
values of a pixel are neighbours), each token one intensity level 0..max_value.

`load_digits()` ships inside scikit-learn, so this is the fully offline image dataset: 1797
greyscale images (C = 1) whose pixels are the integers 0..16. Each pixel is one token
(row-major), so the vocab is 17 and a sequence is exactly 64 tokens. The train/valid split is a permutation seeded with
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

from mdlm_dmmd.data import DataBundle, TokenDataset, image_shape_of, option
from mdlm_dmmd.data.rows import split_indices
from mdlm_dmmd.errors import UserError

DIGITS_SHAPE = (8, 8, 1)  # (H, W, C)
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
    train, valid = split_indices(len(pixels), valid_fraction, split_seed)
    index = valid if split == "valid" else train
    return pixels[index], labels[index]


def build_digits(cfg: Mapping, length: int, *, seed: int = 0) -> DataBundle:
    """8x8 digits, 64 tokens per image, vocab 17; `model.length` must be 64."""
    if length != int(np.prod(DIGITS_SHAPE)):
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
               image_shape: tuple[int, ...] = DIGITS_SHAPE, scale: int = 1) -> np.ndarray:
    """Token images [N, H·W·C] laid out `nrow` per row as an RGB array in [0, 1].

    `image_shape` is (H, W, C) with C = 1 (grey) or 3 (RGB); a 2-element (H, W) means C = 1.
    Grey: ink is dark on white (1 - value / max_value, like sklearn's own plots). RGB: each
    channel is value / max_value. Tokens above `max_value`, i.e. mask ids left in a sample, are
    drawn red (the whole pixel, if any channel holds one) so a grey image never shows them as
    ink; in colour a masked pixel looks like a pure red one, so samples.pt is the exact record.
    Images sit on a grey frame one pixel wide; each pixel is repeated `scale` times.
    """
    tokens = np.asarray(torch.as_tensor(tokens).cpu(), dtype=np.int64)
    h, w, c = image_shape_of(image_shape, "image_shape")
    if c not in (1, 3):
        raise UserError(f"image_shape: a sample grid draws C = 1 (grey) or 3 (RGB) channels, got C = {c} "
                        f"in {tuple(image_shape)}")
    if tokens.ndim != 2 or tokens.shape[1] != h * w * c or len(tokens) == 0:
        raise UserError(f"save_image_grid needs tokens of shape [N, {h * w * c}], "
                        f"got {list(tokens.shape)}")
    n, ncol = len(tokens), max(1, min(nrow, len(tokens)))
    nrows = -(-n // ncol)
    pad = 1
    canvas = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, 3), 0.75)  # grey frame
    for i, image in enumerate(tokens.reshape(n, h, w, c)):
        masked = (image > max_value).any(axis=-1)  # [H, W]
        level = np.clip(image, 0, max_value) / max_value  # [H, W, C] in [0, 1]
        if c == 1:
            gray = 1.0 - level[..., 0]  # [H, W], 1 = white
            rgb = np.repeat(gray[..., None], 3, axis=-1)
        else:
            rgb = level
        rgb[masked] = (1.0, 0.0, 0.0)
        r, col = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        canvas[top: top + h, left: left + w] = rgb
    return np.repeat(np.repeat(canvas, scale, axis=0), scale, axis=1)


def save_image_grid(tokens: Tensor | np.ndarray, path: str | os.PathLike, *, nrow: int = 8,
                    max_value: int = 16, image_shape: tuple[int, ...] = DIGITS_SHAPE,
                    scale: int = 4) -> Path:
    """Write token images [N, H·W·C] as a PNG grid (`image_grid`, 4x enlarged); returns the path."""
    # matplotlib.image.imsave renders without a figure or GUI backend (same result as Agg).
    from matplotlib.image import imsave

    canvas = image_grid(tokens, nrow=nrow, max_value=max_value, image_shape=image_shape, scale=scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(path, canvas, format="png")
    return path
