"""Fréchet distance of image samples (the paper's FID) in several feature spaces, with the
kernel distance (KID) on the same features.

The D-MMD paper scores image samples with FID: the Fréchet distance between Gaussians fitted to
Inception features of generated and real images. One feature network can flatter or punish a
model for its own reasons, so the metric measures in every feature space of the option
`features` (`eval.metric_options.frechet.features`; `features.py` lists them; default
`[digits_mlp, digits_cnn]`, two independent digits classifiers) and reports, per space, the FD
and the unbiased kernel distance (`kernel_distance.py`). The first space is the primary one:
its FD is the metric's `value`, the column `frechet` of tables and the one plots draw. Every
space is a column of its own: `fd_<space>`, `kid_<space>` (with `_stderr`).

Caveat, as for FID: the FD estimate is biased upwards, and more so for small N (with N below the
feature dimension F, 64 for digits_mlp, the sample covariance is singular). Compare models at
equal N only. For scale (digits_mlp), against the train reference at N = 180: the held-out
digits score ≈ 18 (as do 180 training digits, so this is the small-N bias, not a train/valid
gap), uniformly random tokens ≈ 1560, and one digit repeated 180 times ≈ 1080. KID has no such
bias: equal distributions score ≈ 0 at any N.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from mdlm_dmmd.errors import UserError
from mdlm_dmmd.metrics.features import DEFAULT, extractor_names, feature_statistics, load_extractor
from mdlm_dmmd.metrics.kernel_distance import kernel_distance


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix; rounding-negative eigenvalues clipped to 0."""
    eigvals, eigvecs = np.linalg.eigh(matrix)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Fréchet (2-Wasserstein²) distance between N(mu1, sigma1) and N(mu2, sigma2).

    d² = ‖mu1 − mu2‖² + Tr(sigma1 + sigma2 − 2 (sigma1 sigma2)^{1/2}), with means [F] and
    covariances [F, F]; float64 throughout.

    Why eigenvalues and not `scipy.linalg.sqrtm(sigma1 @ sigma2)` (pytorch-fid's route): the
    product is not symmetric, so sqrtm can return complex noise and breaks down on singular
    covariances (N < F), which pytorch-fid patches by adding eps·I — a bias of its own. Instead, with
    S = sigma1^{1/2}, the matrix S sigma2 S is symmetric PSD and similar to sigma1 sigma2, so
    Tr((sigma1 sigma2)^{1/2}) = Σ sqrt(eig(S sigma2 S)), which `eigh` computes stably for singular
    inputs too. Tiny negative eigenvalues from rounding are clipped to 0, and so is the result.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    f = mu1.shape[0]
    if mu1.shape != (f,) or mu2.shape != (f,) or sigma1.shape != (f, f) or sigma2.shape != (f, f):
        raise UserError(f"frechet_distance: needs means [F] and covariances [F, F] of one F, got "
                        f"{mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}")
    # 1. symmetric PSD square root of sigma1 (symmetrised first: np.cov output can drift by ulps)
    sqrt1 = _psd_sqrt((sigma1 + sigma1.T) / 2)
    # 2. Tr((sigma1 sigma2)^{1/2}) from the eigenvalues of the symmetric S sigma2 S
    middle = sqrt1 @ sigma2 @ sqrt1
    eigvals = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_covmean = np.sqrt(np.clip(eigvals, 0.0, None)).sum()
    # 3. assemble; a distance cannot be negative, so rounding below 0 is clipped
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_covmean
    return max(float(distance), 0.0)


# ----------------------------------------------------------------------------- metric


def _check_options(num_bootstrap: Any, kid: Any, kid_subset_size: Any) -> None:
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(num_bootstrap) or num_bootstrap < 0 or num_bootstrap == 1:  # one resample has no spread
        raise UserError(f"frechet: num_bootstrap must be 0 (off) or an int >= 2, got {num_bootstrap!r}")
    if not isinstance(kid, bool):
        raise UserError(f"frechet: kid must be true or false, got {kid!r}")
    if not is_int(kid_subset_size) or kid_subset_size < 2:
        raise UserError(f"frechet: kid_subset_size must be an int >= 2, got {kid_subset_size!r}")


def _space(extractor, samples: Tensor, reference: str, data_config: Mapping | None, num_bootstrap: int, seed: int,
           kid: bool, kid_subset_size: int) -> dict:
    """FD (± bootstrap s.e.) and KID (± subset s.e.) of `samples` in one feature space."""
    tokens = extractor.check_samples(samples)
    mu_ref, sigma_ref = extractor.reference_statistics(reference, data_config)
    feats = extractor.features(tokens).double().numpy()  # [N, F]
    result = {"fd": frechet_distance(*feature_statistics(feats), mu_ref, sigma_ref), "fd_stderr": float("nan")}
    if num_bootstrap:
        rng = np.random.default_rng(seed)
        n = len(feats)
        boot = [frechet_distance(*feature_statistics(feats[rng.integers(0, n, size=n)]), mu_ref, sigma_ref)
                for _ in range(num_bootstrap)]
        result["fd_stderr"] = float(np.std(boot, ddof=1))
    if kid:
        ref = torch.as_tensor(extractor.reference_features(reference, data_config))
        found = kernel_distance(torch.from_numpy(feats), ref, subset_size=kid_subset_size,
                                generator=torch.Generator().manual_seed(seed))
        result |= {"kid": found["value"], "kid_stderr": found["stderr"], "kid_subsets": found["subsets"],
                   "kid_subset_size": found["subset_size"]}
    return {**result, "num_features": feats.shape[1], **extractor.details()}


def frechet(samples: Tensor, *, reference: str = "train", data_config: Mapping | None = None,
            num_bootstrap: int = 0, seed: int = 0, features: Any = DEFAULT, kid: bool = True,
            kid_subset_size: int = 100, reference_stats: str | None = None, feature_batch_size: int = 250,
            feature_device: str = "auto", inception_weights: str | None = None, metric_name: str = "frechet",
            **unknown) -> dict:
    """Registered metric `frechet`: FD and KID of `samples` against a real split, in every
    feature space of `features`.

    samples: the extractors' image tokens, LongTensor [N, H·W·C] with N >= 2 ([N, 64] digits
    tokens 0..16 for the digits extractors). `features`: one extractor name or a list
    (`features.available_extractors()`), the first primary. `reference` is the real split
    ("train" | "valid" | "all", every image of it). With `num_bootstrap` >= 2, each FD's stderr
    is the standard deviation of FD over that many with-replacement resamples of the generated
    set (numpy generator seeded with `seed`; the reference statistics stay fixed), else nan.
    Resampled sets hold duplicates, so their FDs sit above the FD: the stderr measures the
    spread of the estimate, not its small-N bias. With `kid` (default on), each space also gets
    the kernel distance over disjoint subsets of `kid_subset_size` samples ± its subset stderr.

    Returns value/stderr (the primary FD), `features` (the primary space), the primary space's
    details (e.g. classifier_accuracy), num_samples, reference, `spaces` (every space's numbers
    and details) and `columns` (the flat table columns fd_<space>, kid_<space>, with _stderr).

    The image extractors (`inception`, `random_conv`) score the run's own image data and take
    `reference_stats` (a statistics file to use or write; default: the cache, see
    `image_features.py`), `feature_batch_size`, `feature_device` (auto | cpu | cuda[:N]) and,
    for `inception`, `inception_weights` (a local weights file); the digits extractors ignore them.
    `metric_name` is the registered name the options come from (for error messages: `fid` reuses this).
    """
    _refuse_unknown(unknown, metric_name)
    option = f"eval.metric_options.{metric_name}.features"
    names = extractor_names(features, option)
    if reference_stats and len(names) > 1:
        raise UserError(f"frechet: eval.metric_options.{metric_name}.reference_stats names one statistics file, but "
                        f"features lists {len(names)} feature spaces; give one feature space or leave reference_stats unset")
    options = dict(data_config=data_config, reference_stats=reference_stats, feature_batch_size=feature_batch_size,
                   feature_device=feature_device, inception_weights=inception_weights)
    extractors = [load_extractor(name, option, **options) for name in names]
    _check_options(num_bootstrap, kid, kid_subset_size)
    # keyed by the registered names the option gives (a plugin's class may call itself otherwise)
    spaces = {name: _space(e, samples, reference, data_config, num_bootstrap, seed, kid, kid_subset_size)
              for name, e in zip(names, extractors)}
    columns = {}
    for name, space in spaces.items():
        for quantity in ("fd", "kid"):
            if quantity in space:
                columns[f"{quantity}_{name}"] = space[quantity]
                error = space[f"{quantity}_stderr"]
                if error is not None and error == error:  # not None, not NaN
                    columns[f"{quantity}_{name}_stderr"] = error
    primary = spaces[names[0]]
    details = {k: v for k, v in primary.items() if not k.startswith(("fd", "kid"))}
    return {"value": primary["fd"], "stderr": primary["fd_stderr"], "features": names[0], **details,
            "num_samples": int(torch.as_tensor(samples).shape[0]), "reference": reference, "spaces": spaces,
            "columns": columns}


def _refuse_unknown(unknown: Mapping, metric_name: str) -> None:
    if unknown:
        accepted = [p for p in inspect.signature(frechet).parameters if p not in ("samples", "unknown", "metric_name")]
        raise UserError(f"frechet: unknown eval.metric_options.{metric_name} key(s) {', '.join(sorted(unknown))}; "
                        f"accepted: {', '.join(accepted)}")


def check_ready(features: Any = DEFAULT, inception_weights: str | None = None, metric_name: str = "frechet",
                data_config: Mapping | None = None, **options) -> None:
    """Before any sampling: the options are known, and every feature space of `features` is known
    and can run here (e.g. Inception's library and weights) on the run's `data_config` (the
    digits spaces: digits data), so a long run does not fail at its first score."""
    _refuse_unknown({k: v for k, v in options.items() if k not in inspect.signature(frechet).parameters}, metric_name)
    option = f"eval.metric_options.{metric_name}.features"
    for name in extractor_names(features, option):
        extractor = load_extractor(name, option, inception_weights=inception_weights)
        getattr(extractor, "check_ready", lambda: None)()
        if data_config is not None:
            getattr(extractor, "check_data", lambda *_: None)(data_config, option)


def describe(features: Any = DEFAULT, **_) -> str:
    """What the `frechet` column is, for plot labels: the primary feature space, and the others."""
    names = extractor_names(features)
    others = f"; also {', '.join(names[1:])} (fd_*, kid_* columns)" if len(names) > 1 else ""
    return f"FD in {names[0]} features (primary{others})"


frechet.describe = describe
frechet.check_ready = check_ready
