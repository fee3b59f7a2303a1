"""Feature extractors for the `frechet` metric: the network whose features the Fréchet distance
compares (Inception's pool3 layer for FID; a small digits classifier here).

An extractor is chosen by name with `eval.metric_options.frechet.features` (default
`digits_mlp`). Each lives in its own module and is listed in `_EXTRACTORS` below, imported only
when asked for; adding one (e.g. Inception for CIFAR-10 FID) is one new module with a class that
meets `FeatureExtractor` plus its line here. The Gaussian fit and the distance itself stay in
`frechet.py`, the same for every extractor.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Mapping, Protocol, runtime_checkable

import numpy as np
from torch import Tensor

from mdlm_dmmd.errors import UserError

OPTION = "eval.metric_options.frechet.features"
DEFAULT = "digits_mlp"

# name -> "module:class"; the class is constructed without arguments and must not load weights
# or data in __init__ (the metric asks for them when it runs).
_EXTRACTORS = {
    "digits_mlp": "mdlm_dmmd.metrics.digits_mlp:DigitsMLPFeatures",
}


@runtime_checkable
class FeatureExtractor(Protocol):
    """What the `frechet` metric asks of a feature network. Every error is a one-line UserError
    starting with "frechet: "."""

    name: str
    image_shape: tuple[int, int, int]  # (H, W, C) of the image tokens it reads

    def check_samples(self, samples: Any) -> Tensor:
        """`samples` as the token tensor [N, H·W·C] it reads (N >= 2), or a UserError."""

    def features(self, tokens: Tensor) -> Tensor:
        """Features [N, F] of checked tokens [N, H·W·C]."""

    def reference_statistics(self, split: str, data_config: Mapping | None) -> tuple[np.ndarray, np.ndarray]:
        """(mu [F], sigma [F, F]) of the features of every image of a real split, read-only.

        `split` names the split ("train" | "valid" | "all" for digits); `data_config` is the run's
        `data` node, which picks the reference images (a dataset the extractor cannot score is
        refused here).
        """

    def details(self) -> dict[str, Any]:
        """Extra fields for the metric's result (e.g. the classifier's held-out accuracy)."""


def feature_statistics(feats: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [F] and unbiased covariance [F, F] of features [N, F], in float64."""
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def available_extractors() -> list[str]:
    """Every accepted `features` name, sorted."""
    return sorted(_EXTRACTORS)


def load_extractor(name: Any = DEFAULT) -> FeatureExtractor:
    """The extractor registered as `name`; a one-line UserError naming the option otherwise."""
    names = available_extractors()
    if not isinstance(name, str) or name not in _EXTRACTORS:
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"frechet: unknown {OPTION} {name!r}; available: {', '.join(names)}{hint}")
    module, attr = _EXTRACTORS[name].split(":")
    return getattr(importlib.import_module(module), attr)()
