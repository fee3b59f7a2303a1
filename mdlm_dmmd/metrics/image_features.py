"""What the feature extractors of the run's own image data share (Inception for FID, the random
stand-in): pixel tokens to uint8 images, features in batches, and reference statistics computed
once and cached on disk.

The digits extractors (`digits_classifier.py`) know their one dataset. These read whatever image
data the run has (`data_config`, e.g. `data=cifar10_pixels`): the reference set is every image of
that data's train (or valid) split, built by the same `build_data` as training, so a crop with
`data.image_size` applies to both. Tokens are 0..V−1 with V the data's vocab (256 for pixels);
they become uint8 0..255 (V = 256: unchanged; otherwise scaled by 255 / (V − 1)), the input
published FIDs use.

Reference statistics (mean and covariance of the reference features) are written as .npz with
what they were computed from: the extractor's identity (e.g. a hash of the Inception weights),
the data's identity, the split, the image shape and the number of images. They are looked up at
`$MDLM_DMMD_CACHE/frechet/stats/<extractor>-<hash of all that>.npz`, or at the path given as
`reference_stats`. A file whose record differs from this run's (another image size, another
number of images, other weights or data) is refused with a one-line error, never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from mdlm_dmmd.data import modality_of
from mdlm_dmmd.data.rows import cache_root
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.files import atomic_write
from mdlm_dmmd.metrics.features import feature_statistics
from mdlm_dmmd.metrics.run_data import data_bundle, plain_config

logger = logging.getLogger(__name__)

REFERENCE_SPLITS = ("train", "valid")
# `data` keys that decide which images a split holds (never train_shard: the reference is the whole split)
_DATA_IDENTITY = ("name", "source", "hub_name", "path", "image_size", "valid_fraction", "split_seed")


def stats_dir() -> Path:
    return cache_root({}) / "frechet" / "stats"


def _data_identity(data_config: Mapping) -> dict[str, Any]:
    return {key: (None if data_config.get(key, None) is None else str(data_config.get(key)))
            for key in _DATA_IDENTITY}


class ImageFeatures:
    """Base of a `FeatureExtractor` (features.py) over the run's image data. A subclass sets
    `name`, builds its network in `network(channels)` (input uint8 [N, C, H, W], output [N, F])
    and describes itself in `identity()` (what its features depend on) and `details()`."""

    name = "image_features"

    def __init__(self, *, data_config: Mapping | None = None, reference_stats: str | None = None,
                 feature_batch_size: int = 250, feature_device: str = "auto"):
        if isinstance(feature_batch_size, bool) or not isinstance(feature_batch_size, int) or feature_batch_size < 1:
            raise UserError(f"frechet: feature_batch_size must be a positive int, got {feature_batch_size!r}")
        if feature_device == "auto":
            feature_device = "cuda" if torch.cuda.is_available() else "cpu"
        self.data_config = plain_config(data_config or {})
        self.reference_stats = reference_stats
        self.batch_size = feature_batch_size
        try:
            self.device = torch.device(feature_device)
        except (RuntimeError, TypeError):
            raise UserError(f"frechet: feature_device must be auto, cpu or cuda[:N], got {feature_device!r}") from None
        self.image_shape: tuple[int, int, int] | None = None  # (H, W, C), set by check_samples

    # ----------------------------------------------------------------- subclass hooks

    def network(self, channels: int) -> nn.Module:
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """JSON-able description of everything the features depend on (keys the stats cache)."""
        raise NotImplementedError

    def details(self) -> dict[str, Any]:
        return {}

    def check_data(self, data_config: Mapping, option: str = "eval.metric_options.frechet.features") -> None:
        """Before sampling: the run's data is image data (one line naming data.name if not), so
        `fid` on a text run fails now, not at its first score."""
        name = plain_config(data_config or {}).get("name")
        if modality_of(name) == "text":
            metric = option.split(".")[-2]  # eval.metric_options.<metric>.features
            raise UserError(f"{metric}: {option}={self.name} needs image data (e.g. data=cifar10_pixels), "
                            f"got data.name='{name}' (text)")

    # ----------------------------------------------------------------- samples

    def _data(self, length: int):
        if not self.data_config.get("name"):
            raise UserError(f"frechet: features={self.name} scores the run's image data; data.name is not set")
        # without train_shard: the reference is every image of the split, whichever shard this process trains on
        return data_bundle(self.data_config | {"train_shard": None}, length, "frechet")

    def check_samples(self, samples: Any) -> Tensor:
        """Samples as LongTensor [N, H·W·C] (N >= 2) of the data's pixel levels, or a UserError."""
        samples = torch.as_tensor(samples)
        if samples.dim() != 2 or samples.dtype == torch.bool or samples.is_floating_point() or samples.is_complex():
            raise UserError(f"frechet: samples must be integer image tokens [N, H·W·C], got shape "
                            f"{tuple(samples.shape)} of {samples.dtype}")
        if samples.shape[0] < 2:
            raise UserError(f"frechet: samples need N >= 2 rows to estimate a covariance, got N={samples.shape[0]}")
        bundle = self._data(int(samples.shape[1]))
        if bundle.image_shape is None:
            raise UserError(f"frechet: features={self.name} needs image data; data={self.data_config.get('name')} "
                            f"is {bundle.modality}")
        low, high = samples.min().item(), samples.max().item()
        if low < 0 or high >= bundle.vocab_size:
            raise UserError(f"frechet: samples must be pixel levels 0..{bundle.vocab_size - 1}, got values in "
                            f"{low}..{high} (a mask id left in the samples?)")
        self.image_shape, self.levels = bundle.image_shape, bundle.vocab_size
        return samples.long().cpu()

    def as_uint8_images(self, tokens: Tensor) -> Tensor:
        """Tokens [N, H·W·C] (row-major over H, W, C) as uint8 images [N, C, H, W] in 0..255."""
        h, w, c = self.image_shape
        images = tokens.reshape(-1, h, w, c).permute(0, 3, 1, 2)
        if self.levels != 256:
            images = torch.round(images.double() * (255 / (self.levels - 1)))
        return images.to(torch.uint8).contiguous()

    def features(self, tokens: Tensor, *, progress: bool = False) -> Tensor:
        """Features [N, F] (float32, CPU) of checked tokens, `feature_batch_size` images at a time."""
        from tqdm.auto import tqdm

        images = self.as_uint8_images(tokens)
        net = self.network(images.shape[1]).to(self.device).eval()
        batches = range(0, len(images), self.batch_size)
        out = []
        with torch.no_grad():
            for start in tqdm(batches, desc=f"{self.name} features", disable=not progress, leave=False):
                out.append(net(images[start: start + self.batch_size].to(self.device)).float().cpu())
        return torch.cat(out)

    # ----------------------------------------------------------------- reference

    def _reference_images(self, split: str) -> Tensor:
        if split not in REFERENCE_SPLITS:
            raise UserError(f"frechet: reference must be one of {', '.join(REFERENCE_SPLITS)} for "
                            f"features={self.name}, got '{split}'")
        if self.image_shape is None:
            raise UserError("frechet: check_samples must run before the reference statistics")
        bundle = self._data(int(np.prod(self.image_shape)))
        return (bundle.train if split == "train" else bundle.valid).input_ids

    def _record(self, split: str, count: int) -> dict[str, Any]:
        return {"extractor": self.identity(), "data": _data_identity(self.data_config), "split": split,
                "image_shape": list(self.image_shape), "num_images": count}

    def _stats_path(self, record: Mapping) -> Path:
        if self.reference_stats:
            return Path(str(self.reference_stats)).expanduser()
        key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
        return stats_dir() / f"{self.name}-{key}.npz"

    def reference_statistics(self, split: str, data_config: Mapping | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(mu [F], sigma [F, F]) of the features of every image of `split`, from the cache file
        when one matches this run, else computed (with a progress bar) and written."""
        tokens = self._reference_images(split)
        record = self._record(split, len(tokens))
        path = self._stats_path(record)
        if path.is_file():
            return _read_stats(path, record)
        logger.info("frechet: %s features of %d %s images (once; cached at %s)", self.name, len(tokens), split, path)
        mu, sigma = feature_statistics(self.features(tokens, progress=True))
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:  # never half a file
            np.savez(tmp, mu=mu, sigma=sigma, record=np.array(json.dumps(record, sort_keys=True)))
        return mu, sigma

    def reference_features(self, split: str, data_config: Mapping | None = None) -> Tensor:
        """Features [N, F] of every image of `split` (for KID; computed in this process, not cached)."""
        return self.features(self._reference_images(split), progress=True)


def _read_stats(path: Path, record: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """mu, sigma of a stats file whose record equals `record`; a one-line UserError otherwise."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            found, mu, sigma = json.loads(str(saved["record"])), saved["mu"], saved["sigma"]
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"frechet: reference_stats '{path}' is not a statistics file of this package ({err})") from None
    for key, what in (("image_shape", "image shape"), ("num_images", "number of reference images"),
                      ("split", "reference split"), ("extractor", "feature extractor"), ("data", "data")):
        if found.get(key) != record[key]:
            raise UserError(f"frechet: reference_stats '{path}' were computed with {what} {found.get(key)}, this run "
                            f"has {record[key]}; delete the file or pass another reference_stats path")
    return mu, sigma
