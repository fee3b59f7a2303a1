"""The judge is never judged: a `gradient_moment` or `gen_ppl` reference model that is also one
of the evaluated checkpoints is refused (GM of a model's samples under itself measures the score
identity ‖E_q ∇L‖², not sample quality, research/algorithms.md §6.6; its gen-PPL is its own
likelihood)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from omegaconf import DictConfig

from mdlm_dmmd.errors import UserError
from mdlm_dmmd.metrics.references import all_specs

JUDGE_METRICS = ("gradient_moment", "gen_ppl")  # metrics whose `reference` option is a model


def _same_path(a: str, b: str) -> bool:
    """True when `a` and `b` are the same existing file or directory (links followed).

    A `.safetensors` file also counts as the exported directory that holds it: both load the
    same weights.
    """
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if not (pa.exists() and pb.exists()):
        return False
    candidates = [(pa, pb)]
    if pa.suffix == ".safetensors":
        candidates.append((pa.parent, pb))
    if pb.suffix == ".safetensors":
        candidates.append((pa, pb.parent))
    return any(os.path.samefile(x, y) for x, y in candidates)


def check_judges(cfg: DictConfig, evaluated: dict[str, str]) -> None:
    """Refuse a GM / gen-PPL reference (any of them, when there are several) that is also a
    checkpoint being evaluated.

    evaluated: config key -> checkpoint path (e.g. "sweep.methods.0.checkpoint" -> "a.ckpt").
    """
    options = cfg.eval.get("metric_options") or {}
    for metric in JUDGE_METRICS:
        if metric not in (cfg.eval.get("metrics") or []):
            continue
        value = (options.get(metric) or {}).get("reference")
        for reference, (key, path) in itertools.product(all_specs(value), evaluated.items()):
            if _same_path(reference, path):
                raise UserError(
                    f"eval.metric_options.{metric}.reference '{reference}' is also evaluated as {key}; "
                    f"the reference model must not judge itself: use another reference or drop it from the sweep")
