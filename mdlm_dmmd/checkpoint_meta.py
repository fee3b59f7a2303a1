"""Typed, versioned checkpoint metadata: what a sampler needs to rebuild a model without its algo.

Every checkpoint this package writes carries `CheckpointMeta.to_dict()` under `"mdlm_dmmd"` (in
a Lightning `.ckpt`) or in `config.json` (an exported directory), and every reader goes through
`CheckpointMeta.from_dict`. The stored form stays a flat dict with the key names older
checkpoints already use, plus `meta_version`; a checkpoint without `meta_version` is version 0
(written before this module, read field for field the same way). A newer version than this code
knows is an error, never a guess.

Public checkpoints (MDLM/Duo/BD3-LM) get inferred metadata from `checkpoints._public_meta`. A
block-diffusion model records `block_size` and `cross_attn: true` (BD3-LM's [x_t, x_0] training
layout) and is sampled block by block; a `block_size` below the length without `cross_attn`
is refused by `refuse_unsupported`, so no model is sampled with the wrong attention.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mdlm_dmmd.errors import UserError

META_VERSION = 1
PROCESSES = ("masked", "uniform", "autoregressive")
SAMPLING_RULES = ("ancestral", "generator")


@dataclass(frozen=True)
class CheckpointMeta:
    """Fields of the `"mdlm_dmmd"` metadata; `extra` keeps anything else (e.g. a public
    checkpoint's `family`, loader fields such as `source`) so that nothing read is lost."""

    process: str | None = None  # masked | uniform | autoregressive; None: a public file without it
    algo: str | None = None
    backbone_prefix: str | None = None  # where the sampled network lives in a Lightning state_dict
    backbone_config: dict | None = None  # public config.json names (public_config.py)
    schedule: dict = field(default_factory=dict)  # {"schedule": name, "schedule_eps": ..., ...}
    mask_id: int | None = None
    vocab_size: int | None = None  # uniform: the number of classes
    start_id: int | None = None  # autoregressive: the start token
    time_conditioning: bool | None = None
    sampling_rule: str | None = None  # ancestral | generator (students, CE-trained uniform teachers)
    sampling_steps: int | None = None  # a distilled student's own k
    loss: str | None = None  # uniform teachers: elbo | ce
    teacher: str | None = None  # a student's teacher (resolved path)
    teacher_sha256: str | None = None
    teacher_top_p: float | None = None
    teacher_temperature: float | None = None
    block_size: int | None = None
    cross_attn: bool | None = None
    vocab: dict | None = None  # the data's token space (size, bos/eos, modality, image_shape)
    data: dict | None = None  # the data config, to decode samples
    # set by `checkpoints.load_backbone` when reading, never by a saver
    source: str | None = None  # the path read
    format: str | None = None  # hf_dir | safetensors | lightning_ckpt
    ema: bool | None = None  # the weights are EMA averages
    noise_dim: int | None = None  # the network's noise input width (0: none)
    extra: dict = field(default_factory=dict)
    version: int = META_VERSION
    given: tuple[str, ...] = field(default=(), compare=False, repr=False)  # fields stored, even as null

    @classmethod
    def from_dict(cls, stored: dict, source: str = "checkpoint") -> "CheckpointMeta":
        stored = dict(stored or {})
        version = stored.pop("meta_version", 0)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise UserError(f"{source}: metadata meta_version must be an int >= 0, got {version!r}")
        if version > META_VERSION:
            raise UserError(f"{source}: written by a newer mdlm-dmmd (metadata version {version}; this one reads "
                            f"up to {META_VERSION}); upgrade mdlm-dmmd to load it")
        schedule = {k: stored.pop(k) for k in list(stored) if k == "schedule" or k.startswith("schedule_")}
        names = {f.name for f in dataclasses.fields(cls)} - {"schedule", "extra", "version"}
        known = {k: stored.pop(k) for k in list(stored) if k in names}
        meta = cls(**known, schedule=schedule, extra=stored, version=META_VERSION, given=tuple(known))
        meta.check(source)
        return meta

    def check(self, source: str) -> None:
        if self.process is not None and self.process not in PROCESSES:
            raise UserError(f"{source}: metadata process {self.process!r} is unknown; accepted: {', '.join(PROCESSES)}")
        if self.sampling_rule is not None and self.sampling_rule not in SAMPLING_RULES:
            raise UserError(f"{source}: metadata sampling_rule {self.sampling_rule!r} is unknown; "
                            f"accepted: {', '.join(SAMPLING_RULES)}")

    def to_dict(self) -> dict:
        """The stored flat form (older key names; null fields only where they were stored; `meta_version`)."""
        out = {k: v for k, v in dataclasses.asdict(self).items()
               if k not in ("schedule", "extra", "version", "given") and (v is not None or k in self.given)}
        return {**out, **self.schedule, **self.extra, "meta_version": self.version}

    def refuse_unsupported(self, source: str, length: int) -> None:
        """One-line error for a model this package cannot sample correctly.

        Block diffusion is BD3-LM's layout (`cross_attn`: trained on [x_t, x_0], sampled block by
        block); a block size below the length without it is no layout this package knows.
        """
        if self.block_size is not None and (not isinstance(self.block_size, int) or isinstance(self.block_size, bool)
                                            or self.block_size < 1
                                            or length % self.block_size):
            raise UserError(f"{source}: block_size={self.block_size!r} must be a positive int dividing the model "
                            f"length {length}")
        if self.block_size is not None and self.block_size != length and not self.cross_attn:
            raise UserError(f"{source}: block_size={self.block_size} (model length {length}) without cross_attn=true "
                            "is not a block-diffusion layout this package knows (BD3-LM trains with cross_attn)")
