"""The run's dataset as the metrics see it: `build_data` of the run's `data` node, built once per
process, for the metrics that need its tokenizer (gradient_moment, gen_ppl) or its real images
(the image feature extractors of `frechet`)."""

from __future__ import annotations

import json
from typing import Any, Mapping

from mdlm_dmmd.errors import UserError

_BUNDLES: dict[tuple[str, int], Any] = {}


def plain_config(data_config: Mapping) -> dict[str, Any]:
    """The `data` node as a plain dict (an OmegaConf node resolved)."""
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # the metrics are usable without Hydra
        return dict(data_config)
    if isinstance(data_config, DictConfig):
        return OmegaConf.to_container(data_config, resolve=True)
    return dict(data_config)


def data_bundle(data_config: Mapping | None, length: int, metric: str):
    """`build_data(data_config, length)`, cached in-process per (config, length)."""
    if data_config is None:
        raise UserError(f"{metric}: needs the data config (data_config=...) for the tokenizer and "
                        f"reference data")
    plain = plain_config(data_config)
    key = (json.dumps(plain, sort_keys=True, default=str), int(length))
    if key not in _BUNDLES:
        from mdlm_dmmd.data import build_data

        _BUNDLES[key] = build_data(plain, int(length))
    return _BUNDLES[key]
