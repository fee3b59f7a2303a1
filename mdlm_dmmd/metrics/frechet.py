"""Fréchet distance of image samples: the paper's FID, with a pluggable feature network.

The D-MMD paper scores image samples with FID: the Fréchet distance between Gaussians fitted to
Inception features of generated and real images. The feature network is chosen with the metric
option `features` (`eval.metric_options.frechet.features`, `features.py` lists them); the
default `digits_mlp` (`digits_mlp.py`) is a small classifier of sklearn's 8x8 digits, whose
penultimate layer plays the role of Inception's pool3. This module fits the Gaussians and
computes the distance, the same for every extractor; the digits classifier's names stay
importable from here.

Caveat, as for FID: the estimate is biased upwards, and more so for small N (with N below the
feature dimension F, 64 for digits, the sample covariance is singular). Compare models at equal
N only. For scale (digits), against the train reference at N = 180: the held-out digits score
≈ 18 (as do 180 training digits, so this is the small-N bias, not a train/valid gap), uniformly
random tokens ≈ 1560, and one digit repeated 180 times ≈ 1080.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from torch import Tensor

from mdlm_dmmd.errors import UserError
# The digits classifier's public names, re-exported: they lived here before extractors existed.
from mdlm_dmmd.metrics.digits_mlp import (CLASSIFIER_FILE, MAX_LEVEL, NUM_PIXELS, REFERENCE_SPLITS,  # noqa: F401
                                          DigitsClassifier, _check_samples, _digits_arrays, _load_classifier,
                                          classifier_path, features, load_classifier, reference_statistics,
                                          train_classifier)
from mdlm_dmmd.metrics.features import DEFAULT, feature_statistics, load_extractor

_statistics = feature_statistics  # the old private name


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


def frechet(samples: Tensor, *, reference: str = "train", data_config: Mapping | None = None,
            num_bootstrap: int = 0, seed: int = 0, features: str = DEFAULT, **_) -> dict:
    """Registered metric `frechet`: FD between extractor features of `samples` and a real split.

    `features` names the extractor (`features.available_extractors()`; default `digits_mlp`).
    samples: the extractor's image tokens, LongTensor [N, H·W·C] with N >= 2 ([N, 64] digits
    tokens 0..16 for `digits_mlp`). `reference` is the real split ("train" | "valid" | "all",
    every image of it). With `num_bootstrap` >= 2, `stderr` is the standard deviation of FD over
    that many with-replacement resamples of the generated set (numpy generator seeded with
    `seed`); the reference statistics stay fixed. Otherwise nan.
    Resampled sets hold duplicates, so their FDs sit above `value`: `stderr` measures the spread
    of the estimate, not its small-N bias.
    """
    extractor = load_extractor(features)
    tokens = extractor.check_samples(samples)
    is_int = isinstance(num_bootstrap, int) and not isinstance(num_bootstrap, bool)
    if not is_int or num_bootstrap < 0 or num_bootstrap == 1:  # one resample has no spread
        raise UserError(f"frechet: num_bootstrap must be 0 (off) or an int >= 2, got {num_bootstrap!r}")
    mu_ref, sigma_ref = extractor.reference_statistics(reference, data_config)
    details = extractor.details()
    feats = extractor.features(tokens).double().numpy()  # [N, F]
    value = frechet_distance(*feature_statistics(feats), mu_ref, sigma_ref)

    stderr = float("nan")
    if num_bootstrap:
        rng = np.random.default_rng(seed)
        n = len(feats)
        boot = [frechet_distance(*feature_statistics(feats[rng.integers(0, n, size=n)]), mu_ref, sigma_ref)
                for _ in range(num_bootstrap)]
        stderr = float(np.std(boot, ddof=1))
    return {"value": value, "stderr": stderr, **details, "num_samples": len(feats), "reference": reference}
