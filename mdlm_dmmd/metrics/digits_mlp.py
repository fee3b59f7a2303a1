"""The `digits_mlp` feature extractor of the `frechet` metric: FID's Inception, rebuilt at the
scale of sklearn's 8x8 digits.

Inception does not exist for 8x8 images with 17 grey levels, so the feature network here is a
small MLP classifier trained on the digits training split (held-out accuracy ≈ 0.98, checked
≥ 0.95 by the tests); its penultimate layer (64 ReLU units) plays the role of Inception's pool3
layer.

The classifier is a fixed measuring instrument, like Inception in FID: it is always trained on
the default split (`valid_fraction=0.1`, `split_seed=0`), deterministically, and cached at
`$MDLM_DMMD_CACHE/frechet/digits_classifier_v1.pt` (default `~/.cache/mdlm_dmmd`) with its
held-out accuracy. `data_config` only chooses which real images form the reference set. Bump the
`_v1` in the file name whenever the architecture or the training recipe changes.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from mdlm_dmmd.errors import UserError
from mdlm_dmmd.metrics.features import OPTION, feature_statistics

logger = logging.getLogger(__name__)

CLASSIFIER_FILE = "digits_classifier_v1.pt"
NUM_PIXELS = 64  # 8x8, row-major
MAX_LEVEL = 16  # pixel values (tokens) are 0..16
REFERENCE_SPLITS = ("train", "valid", "all")

# The classifier's own split and recipe. Full-batch AdamW: no data order to seed, and ~200
# steps take about a second on CPU. Longer training overfits (0.96 at 800 steps vs 0.98 at 200).
_CLASSIFIER_SPLIT = {"valid_fraction": 0.1, "split_seed": 0}
_SEED = 0
_STEPS = 200
_LR = 1e-2
_WEIGHT_DECAY = 1e-4


# ----------------------------------------------------------------------------- data


def _digits_arrays(split: str, *, valid_fraction: float,
                   split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Digits pixels [N, 64] int64 and labels [N] of one split, via `data.images` when present.

    The fallback repeats `data.images.digits_arrays`'s rule (seeded `torch.randperm`, the first
    `round(N * valid_fraction)` indices are validation) so both always hold out the same images.
    """
    try:
        from mdlm_dmmd.data.images import digits_arrays
    except ImportError:
        digits_arrays = None
    if digits_arrays is not None:
        return digits_arrays(split, valid_fraction=valid_fraction, split_seed=split_seed)

    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels, labels = digits.data.astype(np.int64), digits.target.astype(np.int64)
    if split == "all":
        return pixels, labels
    n_valid = max(1, round(len(pixels) * valid_fraction))
    perm = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(split_seed)).numpy()
    index = np.sort(perm[:n_valid] if split == "valid" else perm[n_valid:])
    return pixels[index], labels[index]


def _check_samples(samples: Any) -> Tensor:
    """`samples` as a LongTensor [N, 64] of tokens 0..16 with N >= 2, or a one-line UserError."""
    samples = torch.as_tensor(samples)
    if samples.dim() != 2 or samples.shape[1] != NUM_PIXELS:
        raise UserError(f"frechet: samples must be [N, {NUM_PIXELS}] digits tokens in 0..{MAX_LEVEL}, "
                        f"got shape {tuple(samples.shape)}")
    if samples.dtype == torch.bool or samples.is_floating_point() or samples.is_complex():
        raise UserError(f"frechet: samples must be integer digits tokens in 0..{MAX_LEVEL}, "
                        f"got dtype {samples.dtype}")
    if samples.shape[0] < 2:
        raise UserError(f"frechet: samples need N >= 2 rows to estimate a covariance, "
                        f"got N={samples.shape[0]}")
    low, high = samples.min().item(), samples.max().item()
    if low < 0 or high > MAX_LEVEL:
        raise UserError(f"frechet: samples must be digits tokens in 0..{MAX_LEVEL}, got values in "
                        f"{low}..{high} (a mask id left in the samples?)")
    return samples.long().cpu()


# ----------------------------------------------------------------------------- classifier


class DigitsClassifier(nn.Module):
    """MLP 64 → 128 → 64 → 10 on pixels scaled to [0, 1]; `features` is the 64-unit layer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(NUM_PIXELS, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, pixels: Tensor) -> Tensor:
        """Penultimate activations [N, 64] of pixels [N, 64] in [0, 1]."""
        return self.body(pixels)

    def forward(self, pixels: Tensor) -> Tensor:
        """Class logits [N, 10]."""
        return self.head(self.body(pixels))


def _scaled(pixels: np.ndarray | Tensor) -> Tensor:
    return torch.as_tensor(pixels).float() / MAX_LEVEL


def train_classifier() -> tuple[DigitsClassifier, float]:
    """Train the feature classifier, ignoring the cache; returns (eval-mode model, held-out accuracy).

    Deterministic: weights are initialised under a forked, fixed-seed RNG (the caller's global
    RNG is untouched), training is full batch, and for its duration deterministic algorithms are
    enforced and torch runs on one thread. One thread also makes the result independent of the
    core count, and on a loaded 2-core machine it is ~10x faster (0.6 s vs 6 s) than threads
    that wait for each other. Another CPU or BLAS may still differ in the last bits, which is
    why the trained weights are cached rather than retrained per run.
    """
    x_train, y_train = _digits_arrays("train", **_CLASSIFIER_SPLIT)
    x_valid, y_valid = _digits_arrays("valid", **_CLASSIFIER_SPLIT)
    x_train, y_train = _scaled(x_train), torch.as_tensor(y_train)
    x_valid, y_valid = _scaled(x_valid), torch.as_tensor(y_valid)

    was_deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_SEED)
            model = DigitsClassifier()
        optimizer = torch.optim.AdamW(model.parameters(), lr=_LR, weight_decay=_WEIGHT_DECAY)
        for _ in range(_STEPS):
            loss = nn.functional.cross_entropy(model(x_train), y_train)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)

    model.eval().requires_grad_(False)
    with torch.no_grad():
        accuracy = (model(x_valid).argmax(-1) == y_valid).double().mean().item()
    return model, accuracy


def classifier_path() -> Path:
    """Where the classifier is cached: $MDLM_DMMD_CACHE (default ~/.cache/mdlm_dmmd)/frechet/."""
    root = os.environ.get("MDLM_DMMD_CACHE") or "~/.cache/mdlm_dmmd"
    return Path(root).expanduser() / "frechet" / CLASSIFIER_FILE


def load_classifier() -> tuple[DigitsClassifier, float]:
    """The cached classifier and its held-out accuracy; trained and saved on first use."""
    return _load_classifier(str(classifier_path()))


@functools.lru_cache(maxsize=None)
def _load_classifier(path: str) -> tuple[DigitsClassifier, float]:
    # Keyed by path, so changing $MDLM_DMMD_CACHE (as the tests do) never returns a stale model.
    file = Path(path)
    if file.is_file():
        try:
            saved = torch.load(file, map_location="cpu", weights_only=True)
            model = DigitsClassifier()
            model.load_state_dict(saved["state_dict"])
            return model.eval().requires_grad_(False), float(saved["accuracy"])
        except Exception as err:  # a torn or foreign file: retraining is cheap and deterministic
            logger.warning("frechet: cannot read %s (%s); retraining the classifier", file, err)
    logger.info("frechet: training the digits feature classifier (once; cached at %s)", file)
    model, accuracy = train_classifier()
    file.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a concurrent reader never sees half a file.
    tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
    torch.save({"state_dict": model.state_dict(), "accuracy": accuracy}, tmp)
    os.replace(tmp, file)
    return model, accuracy


def features(images_tokens: Any) -> Tensor:
    """Classifier features [N, 64] (float32) of digits tokens [N, 64] with values 0..16."""
    tokens = _check_samples(images_tokens)
    model, _ = load_classifier()
    with torch.no_grad():
        return model.features(_scaled(tokens))


# ----------------------------------------------------------------------------- reference statistics


def _split_options(data_config: Mapping | None) -> dict[str, Any]:
    """valid_fraction / split_seed of the reference split, from the `data` config node if given."""
    data_config = data_config or {}
    name = data_config.get("name", None)
    if name not in (None, "digits"):
        raise UserError(f"frechet: {OPTION}=digits_mlp needs data.name=digits (8x8 grey image tokens), "
                        f"got '{name}'")

    def value(key: str, cast):
        v = data_config.get(key, None)
        return cast(_CLASSIFIER_SPLIT[key] if v is None else v)

    return {"valid_fraction": value("valid_fraction", float), "split_seed": value("split_seed", int)}


def reference_statistics(split: str = "train",
                         data_config: Mapping | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mu [F], sigma [F, F]) of the classifier features of every image in a real digits split.

    `split` is "train", "valid" or "all"; the arrays are cached in memory and read-only.
    """
    if split not in REFERENCE_SPLITS:
        raise UserError(f"frechet: reference must be one of {', '.join(REFERENCE_SPLITS)}, "
                        f"got '{split}'")
    options = _split_options(data_config)
    return _reference_statistics(str(classifier_path()), split, options["valid_fraction"],
                                 options["split_seed"])


@functools.lru_cache(maxsize=None)
def _reference_statistics(path: str, split: str, valid_fraction: float, split_seed: int):
    pixels, _ = _digits_arrays(split, valid_fraction=valid_fraction, split_seed=split_seed)
    model, _ = _load_classifier(path)
    with torch.no_grad():
        mu, sigma = feature_statistics(model.features(_scaled(pixels)))
    mu.setflags(write=False)
    sigma.setflags(write=False)
    return mu, sigma


# ----------------------------------------------------------------------------- extractor


class DigitsMLPFeatures:
    """`features: digits_mlp` (the default): the classifier's 64 penultimate units of 8x8
    grey digits tokens 0..16, against a real digits split."""

    name = "digits_mlp"
    image_shape = (8, 8, 1)

    def check_samples(self, samples: Any) -> Tensor:
        return _check_samples(samples)

    def features(self, tokens: Tensor) -> Tensor:
        return features(tokens)

    def reference_statistics(self, split: str, data_config: Mapping | None) -> tuple[np.ndarray, np.ndarray]:
        return reference_statistics(split, data_config)

    def details(self) -> dict[str, Any]:
        _, accuracy = load_classifier()
        return {"classifier_accuracy": accuracy}
