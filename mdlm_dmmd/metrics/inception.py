"""The `inception` feature space of FID: Inception-v3 pool3 (2048 features) as published FIDs
compute it, through torch-fidelity (the `[images]` extra).

Why torch-fidelity: its Inception is a port of the TensorFlow graph the original FID code
used, weights and TF-1 bilinear resize included, and it takes uint8 images of any size (CIFAR-10's
32x32) as the TF code did, so its FIDs match the published ones; pytorch-fid documents small
deviations from them. Only its Inception module is used; the Fréchet distance is `frechet.py`'s.

Weights (the TF-Inception port, ~92 MB), first found wins:
1. `eval.metric_options.<metric>.inception_weights=PATH`, or the environment variable
   `MDLM_DMMD_INCEPTION_WEIGHTS`;
2. torch hub's cache (`$TORCH_HOME/hub/checkpoints/`), where a download puts them;
3. a download from torch-fidelity's release (`WEIGHTS_URL`), unless `HF_HUB_OFFLINE` is set.
Offline without them, the metric stops with a one-line error saying how to provide them.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mdlm_dmmd.errors import UserError
from mdlm_dmmd.metrics.image_features import ImageFeatures

WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
               "weights-inception-2015-12-05-6726825d.pth")
WEIGHTS_FILE = WEIGHTS_URL.rsplit("/", 1)[1]
ENV = "MDLM_DMMD_INCEPTION_WEIGHTS"
INSTALL = "pip install 'mdlm-dmmd[images]' with a torchvision built for your torch"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def library_version() -> str:
    """torch-fidelity's version; a one-line UserError when it cannot be imported."""
    try:
        import torch_fidelity
    except Exception as err:  # noqa: BLE001 - ImportError, or torchvision failing to load its ops
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"frechet: features=inception needs torch-fidelity ({INSTALL}); importing it failed: "
                        f"{reason}") from None
    return torch_fidelity.__version__


def weights_path(option: Any = None) -> Path:
    """Where the Inception weights are (see the module docstring), downloading them if allowed."""
    explicit = option or os.environ.get(ENV)
    if explicit:
        path = Path(str(explicit)).expanduser()
        if not path.is_file():
            source = "inception_weights" if option else ENV
            raise UserError(f"frechet: {source} '{path}' does not exist; download {WEIGHTS_URL} there")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE
    if cached.is_file():
        return cached
    how = (f"download {WEIGHTS_URL} and pass eval.metric_options.fid.inception_weights=PATH "
           f"(or set {ENV}, or put it at {cached})")
    if _offline():
        raise UserError(f"frechet: the Inception weights are not on this machine and HF_HUB_OFFLINE is set; {how}")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(WEIGHTS_URL, str(cached), progress=True)
    except Exception as err:  # noqa: BLE001 - any network or disk failure, as one line
        raise UserError(f"frechet: downloading the Inception weights failed ({type(err).__name__}); {how}") from None
    return cached


@functools.lru_cache(maxsize=2)
def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _Pool3(nn.Module):
    """torch-fidelity's Inception as uint8 [N, C, H, W] -> pool3 [N, 2048]; grey images (C = 1)
    are repeated to RGB, as torch-fidelity does for grey datasets."""

    def __init__(self, path: Path):
        super().__init__()
        library_version()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.inception = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                     feature_extractor_weights_path=str(path))

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if images.shape[1] != 3:
            raise UserError(f"frechet: features=inception reads RGB (or grey) images, got {images.shape[1]} channels")
        return self.inception(images)[0]


class InceptionFeatures(ImageFeatures):
    """`features: inception` (FID's feature space)."""

    name = "inception"

    def __init__(self, *, inception_weights: str | None = None, data_config=None, reference_stats: str | None = None,
                 feature_batch_size: int = 250, feature_device: str = "auto"):
        super().__init__(data_config=data_config, reference_stats=reference_stats,
                         feature_batch_size=feature_batch_size, feature_device=feature_device)
        self.weights_option = inception_weights
        self._net: nn.Module | None = None

    def weights(self) -> Path:
        return weights_path(self.weights_option)

    def check_ready(self) -> None:
        """torch-fidelity imports and the weights are here (or downloaded now); a UserError otherwise."""
        library_version()
        self.weights()

    def check_samples(self, samples: Any) -> Tensor:
        self.check_ready()  # a missing extra or weights fail here, before any data is loaded
        return super().check_samples(samples)

    def network(self, channels: int) -> nn.Module:
        if self._net is None:
            self._net = _Pool3(self.weights())
        return self._net

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "layer": "pool3", "weights_sha256": _sha256(str(self.weights()))[:16]}

    def details(self) -> dict[str, Any]:
        return {"weights": str(self.weights()), "library": f"torch-fidelity {library_version()}"}
