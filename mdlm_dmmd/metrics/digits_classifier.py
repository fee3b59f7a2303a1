"""What the digits feature extractors share: FID's Inception rebuilt at the scale of sklearn's 8x8
digits, as a small classifier whose penultimate layer gives the features.

Inception does not exist for 8x8 images with 17 grey levels, so each digits extractor is a small
classifier trained on the digits training split; its penultimate layer plays the role of
Inception's pool3 layer. An extractor is a `Recipe` (architecture, seed, optimiser steps) and
one `DigitsClassifierFeatures` built from it; `digits_mlp.py` and `digits_cnn.py` hold the two
recipes. Two recipes with other architectures and seeds give two feature spaces whose verdicts
do not hang on one network's quirks.

Each classifier is a fixed measuring instrument, like Inception in FID: always trained on the
default split (`valid_fraction=0.1`, `split_seed=0`), deterministically, and cached at
`$MDLM_DMMD_CACHE/frechet/<name>-<settings hash>.pt` (default `~/.cache/mdlm_dmmd`) with its
held-out accuracy and the settings it was trained with. The hash covers the architecture (the
module's repr), the seed, the optimiser recipe and the split, so changing any of them trains a
new classifier instead of reading a stale one. `data_config` only chooses which real images
form the reference set.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from mdlm_dmmd.data.images import digits_arrays
from mdlm_dmmd.data.rows import cache_root
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.files import atomic_write
from mdlm_dmmd.metrics.features import OPTION, feature_statistics

logger = logging.getLogger(__name__)

NUM_PIXELS = 64  # 8x8, row-major
MAX_LEVEL = 16  # pixel values (tokens) are 0..16
REFERENCE_SPLITS = ("train", "valid", "all")
CLASSIFIER_SPLIT = {"valid_fraction": 0.1, "split_seed": 0}  # every classifier's own split


@dataclass(frozen=True)
class Recipe:
    """How one feature classifier is built and trained (full-batch AdamW: no data order to seed).

    `build` returns a module with `forward(pixels) -> logits [N, 10]` and
    `features(pixels) -> [N, F]`, pixels [N, 64] scaled to [0, 1].
    """

    name: str
    build: Callable[[], nn.Module] = field(compare=False)
    seed: int
    steps: int
    lr: float
    weight_decay: float
    description: str  # one line for reports, e.g. "MLP 64-128-64-10"

    @functools.cached_property
    def settings(self) -> dict[str, Any]:
        """Everything the trained weights depend on, as JSON-able values."""
        with torch.random.fork_rng(devices=[]):
            architecture = repr(self.build())
        values = {k: v for k, v in asdict(self).items() if k not in ("build", "description")}
        return {**values, "architecture": architecture, "split": CLASSIFIER_SPLIT}

    def settings_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:12]


def scaled(pixels: np.ndarray | Tensor) -> Tensor:
    """Pixels 0..16 as float32 in [0, 1]."""
    return torch.as_tensor(pixels).float() / MAX_LEVEL


def check_samples(samples: Any) -> Tensor:
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


# ----------------------------------------------------------------------------- training and cache


def train(recipe: Recipe) -> tuple[nn.Module, float]:
    """Train `recipe`'s classifier, ignoring the cache; returns (eval-mode model, held-out accuracy).

    Deterministic: weights are initialised under a forked, fixed-seed RNG (the caller's global
    RNG is untouched), training is full batch, and for its duration deterministic algorithms are
    enforced and torch runs on one thread. One thread also makes the result independent of the
    core count, and on a loaded 2-core machine it is much faster than threads that wait for each
    other. Another CPU or BLAS may still differ in the last bits, which is why the trained
    weights are cached rather than retrained per run.
    """
    x_train, y_train = digits_arrays("train", **CLASSIFIER_SPLIT)
    x_valid, y_valid = digits_arrays("valid", **CLASSIFIER_SPLIT)
    x_train, y_train = scaled(x_train), torch.as_tensor(y_train)
    x_valid, y_valid = scaled(x_valid), torch.as_tensor(y_valid)

    was_deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            model = recipe.build()
        optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        for _ in range(recipe.steps):
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


def cache_path(recipe: Recipe) -> Path:
    """$MDLM_DMMD_CACHE (default ~/.cache/mdlm_dmmd)/frechet/<name>-<settings hash>.pt"""
    return cache_root({}) / "frechet" / f"{recipe.name}-{recipe.settings_hash()}.pt"


def load(recipe: Recipe) -> tuple[nn.Module, float]:
    """The cached classifier of `recipe` and its held-out accuracy; trained and saved on first use."""
    return _load(recipe, str(cache_path(recipe)))


@functools.lru_cache(maxsize=None)
def _load(recipe: Recipe, path: str) -> tuple[nn.Module, float]:
    # Keyed by recipe and path, so a changed recipe or $MDLM_DMMD_CACHE never returns a stale model.
    file, settings = Path(path), recipe.settings
    if file.is_file():
        try:
            saved = torch.load(file, map_location="cpu", weights_only=True)
            if json.loads(saved["settings"]) != settings:
                raise ValueError("trained with other settings")
            model = recipe.build()
            model.load_state_dict(saved["state_dict"])
            return model.eval().requires_grad_(False), float(saved["accuracy"])
        except Exception as err:  # torn, foreign or stale: retraining is cheap and deterministic
            logger.warning("frechet: cannot use %s (%s); retraining the %s classifier", file, err, recipe.name)
    logger.info("frechet: training the %s feature classifier (once; cached at %s)", recipe.name, file)
    model, accuracy = train(recipe)
    file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(file) as tmp:  # a concurrent reader never sees half a file
        torch.save({"state_dict": model.state_dict(), "accuracy": accuracy,
                    "settings": json.dumps(settings, sort_keys=True)}, tmp)
    return model, accuracy


# ----------------------------------------------------------------------------- reference statistics


def _split_options(name: str, data_config: Mapping | None, option: str = OPTION) -> dict[str, Any]:
    """valid_fraction / split_seed of the reference split, from the `data` config node if given."""
    data_config = data_config or {}
    data_name = data_config.get("name", None)
    if data_name not in (None, "digits"):
        metric = option.split(".")[-2]  # eval.metric_options.<metric>.features
        raise UserError(f"{metric}: {option}={name} needs data.name=digits (8x8 grey image tokens), "
                        f"got '{data_name}'")

    def value(key: str, cast):
        v = data_config.get(key, None)
        return cast(CLASSIFIER_SPLIT[key] if v is None else v)

    return {"valid_fraction": value("valid_fraction", float), "split_seed": value("split_seed", int)}


@functools.lru_cache(maxsize=None)
def _reference_statistics(recipe: Recipe, path: str, split: str, valid_fraction: float, split_seed: int):
    pixels, _ = digits_arrays(split, valid_fraction=valid_fraction, split_seed=split_seed)
    model, _ = _load(recipe, path)
    with torch.no_grad():
        feats = model.features(scaled(pixels))
    mu, sigma = feature_statistics(feats)
    for array in (feats, mu, sigma):
        if isinstance(array, np.ndarray):
            array.setflags(write=False)
    return feats, mu, sigma


# ----------------------------------------------------------------------------- extractor


class DigitsClassifierFeatures:
    """A `FeatureExtractor` (features.py) of 8x8 grey digits tokens 0..16: the penultimate layer
    of `recipe`'s classifier, against a real digits split."""

    image_shape = (8, 8, 1)

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.name = recipe.name

    def model(self) -> tuple[nn.Module, float]:
        return load(self.recipe)

    def check_samples(self, samples: Any) -> Tensor:
        return check_samples(samples)

    def check_data(self, data_config: Mapping, option: str = OPTION) -> None:
        """Before sampling: the reference split is of digits (one line naming data.name if not)."""
        _split_options(self.name, data_config, option)

    def features(self, tokens: Tensor) -> Tensor:
        model, _ = self.model()
        with torch.no_grad():
            return model.features(scaled(check_samples(tokens)))

    def reference(self, split: str, data_config: Mapping | None) -> tuple[Tensor, np.ndarray, np.ndarray]:
        """(features [N, F], mu [F], sigma [F, F]) of every image of a real split, cached, read-only."""
        if split not in REFERENCE_SPLITS:
            raise UserError(f"frechet: reference must be one of {', '.join(REFERENCE_SPLITS)}, got '{split}'")
        options = _split_options(self.name, data_config)
        return _reference_statistics(self.recipe, str(cache_path(self.recipe)), split, options["valid_fraction"],
                                     options["split_seed"])

    def reference_statistics(self, split: str, data_config: Mapping | None) -> tuple[np.ndarray, np.ndarray]:
        return self.reference(split, data_config)[1:]

    def reference_features(self, split: str, data_config: Mapping | None) -> Tensor:
        return self.reference(split, data_config)[0]

    def details(self) -> dict[str, Any]:
        _, accuracy = self.model()
        return {"classifier_accuracy": accuracy, "seed": self.recipe.seed, "architecture": self.recipe.description}
