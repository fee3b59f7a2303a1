"""Registered metric `fid`: the paper's image metric, FID, i.e. the Fréchet distance of
Inception-v3 pool3 features of generated images and of the real train split (Table 1: 50K
samples against the CIFAR-10 train set).

It is `frechet` with FID's defaults: features `inception` (torch-fidelity's port of the TF
graph, the `[images]` extra; `inception.py`), reference `train`, no KID (its reference
features, 50K x 2048, are not cached). Every result carries `num_samples`, the number of
generated images it used: FID is biased upwards at small N, so numbers compare only at equal N
(the paper's is 50K). The reference statistics are computed once and cached (`image_features.py`).
Options are `frechet`'s (`eval.metric_options.fid`), e.g. `inception_weights=PATH` offline, or
`features=random_conv` for a CPU smoke run (then the value is an FD in random features, not FID,
and the result's `features` and `note` say so).
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from mdlm_dmmd.metrics.frechet import check_ready as check_frechet_ready
from mdlm_dmmd.metrics.frechet import describe as describe_frechet
from mdlm_dmmd.metrics.frechet import frechet

FEATURES = "inception"


def fid(samples: Tensor, *, features: Any = FEATURES, kid: bool = False, reference: str = "train", **options) -> dict:
    """FID of image samples [N, H·W·C] of the run's image data (`data_config`); see `frechet`."""
    return frechet(samples, features=features, kid=kid, reference=reference, metric_name="fid", **options)


def describe(features: Any = FEATURES, **_) -> str:
    if features == FEATURES:
        return "FID (Inception-v3 pool3, against the train split)"
    return describe_frechet(features=features)


def check_ready(features: Any = FEATURES, data_config: Mapping | None = None, **options) -> None:
    """Before any sampling: torch-fidelity imports and the Inception weights are here (and a
    digits feature space, if asked for, has digits data)."""
    check_frechet_ready(features=features, metric_name="fid", data_config=data_config, **options)


fid.describe = describe
fid.check_ready = check_ready
