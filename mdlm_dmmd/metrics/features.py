"""Feature extractors for the `frechet` metric: the networks whose features the Fréchet and
kernel distances compare (Inception's pool3 layer for FID; small digits classifiers here).

Extractors are chosen by name with `eval.metric_options.frechet.features`, one name or a list
(default `[digits_mlp, digits_cnn]`: two independent feature spaces, the first one primary).
Each lives in its own module and is listed in `_EXTRACTORS` below, imported only when asked
for; adding one is one new module with a class (or factory) that meets `FeatureExtractor` plus
its line here (`inception.py`, FID's Inception, and `random_conv.py`, its stand-in, were added
so; both read the run's own image data through `image_features.py`). The Gaussian fit and the distances stay in
`frechet.py` and `kernel_distance.py`, the same for every extractor.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any, Mapping, Protocol, runtime_checkable

import numpy as np
from torch import Tensor

from mdlm_dmmd.errors import UserError

OPTION = "eval.metric_options.frechet.features"
DEFAULT = ("digits_mlp", "digits_cnn")  # the first is the primary feature space

# name -> "module:callable". It is called with the keyword options it declares of
# `load_extractor`'s (data_config, the metric's extractor options) and must not load weights or
# data yet (the metric asks for them when it runs).
_EXTRACTORS = {
    "digits_mlp": "mdlm_dmmd.metrics.digits_mlp:DigitsMLPFeatures",
    "digits_cnn": "mdlm_dmmd.metrics.digits_cnn:DigitsCNNFeatures",
    "inception": "mdlm_dmmd.metrics.inception:InceptionFeatures",  # FID's; the [images] extra
    "random_conv": "mdlm_dmmd.metrics.random_conv:RandomConvFeatures",  # stand-in, not FID
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

    def reference_features(self, split: str, data_config: Mapping | None) -> Tensor:
        """Features [N, F] of every image of that split (the kernel distance compares sets, not
        Gaussians); read-only."""

    def details(self) -> dict[str, Any]:
        """Extra fields for the metric's result (e.g. the classifier's held-out accuracy)."""


def feature_statistics(feats: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [F] and unbiased covariance [F, F] of features [N, F], in float64."""
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def available_extractors() -> list[str]:
    """Every accepted `features` name, sorted."""
    return sorted(_EXTRACTORS)


def extractor_names(value: Any, option: str = OPTION) -> list[str]:
    """The option's value (one name or a list of distinct names) as a list; a one-line UserError
    otherwise. Unknown names are refused by `load_extractor`."""
    names = list(value) if isinstance(value, (list, tuple)) else [value]
    if not names or len({repr(n) for n in names}) != len(names):
        raise UserError(f"frechet: {option} must be a name or a list of distinct names of "
                        f"{', '.join(available_extractors())}, got {value!r}")
    return names


def load_extractor(name: Any = DEFAULT[0], option: str = OPTION, **options: Any) -> FeatureExtractor:
    """The extractor registered as `name`, given those of `options` its factory declares (the
    image extractors take data_config, reference_stats, feature_batch_size, feature_device,
    inception_weights; the digits ones none); a one-line UserError naming the option (the config
    key `option`, which differs for the `fid` metric) otherwise."""
    names = available_extractors()
    if not isinstance(name, str) or name not in _EXTRACTORS:
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"frechet: unknown {option} {name!r}; available: {', '.join(names)}{hint}")
    module, attr = _EXTRACTORS[name].split(":")
    factory = getattr(importlib.import_module(module), attr)
    parameters = inspect.signature(factory).parameters
    return factory(**{k: v for k, v in options.items() if k in parameters})
