"""A sampling pipeline = denoiser + sampler (diffusers' pipeline idea), with no branch on the model kind.

Algos build one around their evaluation network; `Pipeline.from_checkpoint` builds one from a
checkpoint alone (this package's `.ckpt`, an exported directory, or a public MDLM/Duo/BD3-LM
directory) without the class that trained it, choosing the sampler once from its metadata.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mdlm_dmmd.checkpoint_meta import CheckpointMeta
from mdlm_dmmd.denoiser import BlockDenoiser, CausalDenoiser, Denoiser
from mdlm_dmmd.diffusion import Process, process_from_meta
from mdlm_dmmd.diffusion.block_sampling import BlockSampler
from mdlm_dmmd.diffusion.sampling import AutoregressiveSampler, DiffusionSampler
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.models.dit import DiT

logger = logging.getLogger(__name__)


def sampling_rule(meta: CheckpointMeta) -> str:
    """The recorded rule; checkpoints written before it was recorded for CE-trained uniform
    teachers (`loss: ce`, x̂ = E[x | z_t]) get the generator rule, the mixture step."""
    if meta.sampling_rule:
        return meta.sampling_rule
    return "generator" if meta.process == "uniform" and meta.loss == "ce" else "ancestral"


def first_token(meta: CheckpointMeta) -> int | None:
    """The BOS a block model trained with `ignore_bos` starts every sequence with, else None."""
    bos = (meta.vocab or {}).get("bos_id")
    return int(bos) if meta.extra.get("ignore_bos") and bos is not None else None


@dataclass
class Pipeline:
    """A denoiser and the sampler chosen for it; `meta` is the checkpoint's metadata, if any."""

    denoiser: Denoiser | BlockDenoiser | CausalDenoiser
    sampler: DiffusionSampler | BlockSampler | AutoregressiveSampler
    meta: CheckpointMeta = field(default_factory=CheckpointMeta)  # empty unless read from a checkpoint
    stats: dict = field(default_factory=dict)  # what the last `generate` reports (entropy_redraws)

    @classmethod
    def from_checkpoint(cls, path, *, device: str | torch.device = "cpu", use_ema: bool = True) -> "Pipeline":
        from mdlm_dmmd.checkpoints import load_backbone

        loaded = load_backbone(path, use_ema=use_ema)
        meta = loaded.meta
        network = loaded.model.to(device).eval()
        if meta.process == "autoregressive":
            return cls.autoregressive(network, int(meta.start_id), meta=meta)
        process, time_conditioning = process_from_meta(meta.to_dict(), network.config.vocab_size,
                                                       source=f"checkpoint {path}")
        if meta.cross_attn:  # BD3-LM's layout ([x_t, x_0] in training): sampled block by block
            return cls.block(network, process, time_conditioning, int(meta.block_size or network.config.length),
                             rule=sampling_rule(meta), first_token=first_token(meta), meta=meta)
        return cls.diffusion(network, process, time_conditioning, rule=sampling_rule(meta), meta=meta)

    @classmethod
    def diffusion(cls, network: DiT, process: Process, time_conditioning: bool = False, *, rule: str = "ancestral",
                  meta: CheckpointMeta | None = None) -> "Pipeline":
        """`rule="generator"` for distilled students (D-MMD Algorithm 1) and CE-trained uniform teachers."""
        return cls(Denoiser(network, process, time_conditioning), DiffusionSampler(process, rule),
                   meta or CheckpointMeta())

    @classmethod
    def block(cls, network: DiT, process: Process, time_conditioning: bool, block_size: int, *,
              rule: str = "ancestral", kv_cache: bool = True, first_token: int | None = None,
              meta: CheckpointMeta | None = None) -> "Pipeline":
        """A block-diffusion network (BD3-LM layout), sampled block by block, `steps` per block;
        `first_token`: the BOS every sequence starts with (a model trained with ignore_bos)."""
        return cls(BlockDenoiser(network, process, time_conditioning, block_size=block_size),
                   BlockSampler(process, block_size, rule, kv_cache, first_token), meta or CheckpointMeta())

    @classmethod
    def autoregressive(cls, network: DiT, vocab_size: int, *, meta: CheckpointMeta | None = None) -> "Pipeline":
        """A causal network over `vocab_size` real tokens whose start id is `vocab_size`."""
        return cls(CausalDenoiser(network, vocab_size), AutoregressiveSampler(vocab_size), meta or CheckpointMeta())

    def _eos(self) -> int:
        eos = (self.meta.vocab or {}).get("eos_id")
        if eos is None:
            raise UserError("sampling.stop_at_eos needs the data's EOS id, which this checkpoint does not record")
        return int(eos)

    @property
    def network(self) -> DiT:
        return self.denoiser.network

    @property
    def block_size(self) -> int | None:
        """Tokens per block of a block-diffusion model (steps count per block); None otherwise."""
        return getattr(self.sampler, "block_size", None)

    @property
    def is_autoregressive(self) -> bool:
        return self.sampler.autoregressive

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def length(self) -> int:
        return self.network.config.length

    def _check_prompts(self, prompts: Tensor) -> None:
        """Prompt tokens are tokens of this model's data: ids below its vocabulary, never its mask."""
        vocab, mask = self.network.config.vocab_size, getattr(getattr(self.denoiser, "process", None), "mask_id", None)
        low, high = int(prompts.min()), int(prompts.max())
        if low < 0 or high >= vocab or (mask is not None and bool((prompts == mask).any())):
            raise UserError(f"sampling.prompt_length: the prompts hold token ids {low}..{high}, but this model reads "
                            f"ids 0..{vocab - 1}" + (f" without its mask {mask}" if mask is not None else "") +
                            " (prompts from other data than the model's? see data_from)")

    @torch.no_grad()
    def generate(
        self,
        num_samples: int,
        *,
        steps: int,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        batch_size: int | None = None,
        progress: bool = False,
        noise_removal: str = "ancestral",
        prompts: Tensor | None = None,
        nucleus: str = "keep",
        kv_cache: bool | None = None,
        first_hitting: bool = False,
        stop_at_eos: bool = False,
        length: int | None = None,
        entropy_redraw: bool = False,
    ) -> Tensor:
        """[num_samples, L] token ids, drawn `batch_size` sequences at a time; with `prompts`
        [num_samples, P], row i continues prompt i. `nucleus`: keep | drop the token that crosses
        top_p. `noise_removal`: ancestral | greedy | greedy_tail (Duo's, one more call after the
        k steps: `sampling.network_calls`). Block models only: `kv_cache` (None: the sampler's
        setting, on by default) and `first_hitting` (BD3-LM's one-token-per-step rule, masked
        models) and `stop_at_eos` (a sequence ends at its first EOS after position 0, EOS-filled
        after; needs the data's EOS id in the checkpoint), `length` (longer than the model: a
        sliding window of the model's length) and `entropy_redraw` (BD3-LM's re-draw of
        low-entropy samples; how many were re-drawn is in `self.stats` and logged); `steps` is
        per block."""
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise UserError(f"sampling.num_samples must be a positive int, got {num_samples!r}")
        extra = {"nucleus": nucleus}
        self.stats = {}
        if self.sampler.blockwise:
            extra.update(kv_cache=kv_cache, first_hitting=first_hitting, stop_at=self._eos() if stop_at_eos else None,
                         context=self.length, entropy_redraw=entropy_redraw, stats=self.stats)
        elif first_hitting or stop_at_eos or entropy_redraw or (length is not None and length != self.length):
            key = ("first_hitting" if first_hitting else "stop_at_eos" if stop_at_eos else
                   "entropy_redraw" if entropy_redraw else "length")
            raise UserError(f"sampling.{key} is an option of the block sampler; this model is not block diffusion")
        device = self.device
        length = self.length if length is None else length
        whole = isinstance(length, int) and not isinstance(length, bool) and length >= 1
        if self.sampler.blockwise and (not whole or length % self.sampler.block_size):
            raise UserError(f"sampling.length must be a positive multiple of the block size {self.sampler.block_size}, "
                            f"got {length!r}")
        if prompts is not None:
            self._check_prompts(prompts)
        batch_size = batch_size or num_samples
        chunks = []
        for start in range(0, num_samples, batch_size):
            shape = (min(batch_size, num_samples - start), length)
            prompt = None if prompts is None else prompts[start: start + shape[0]].to(device)
            # noise inputs draw from the generator too; a block sampler calls the denoiser's block methods
            denoise = self.denoiser if self.sampler.blockwise else functools.partial(self.denoiser, generator=generator)
            with torch.inference_mode():  # no autograd bookkeeping at all while sampling
                chunk = self.sampler(denoise, steps=steps, shape=shape, generator=generator, device=device,
                                     temperature=temperature, top_p=top_p, noise_removal=noise_removal,
                                     prompt=prompt, progress=progress, **extra)
            chunks.append(chunk.clone())  # a normal tensor: callers may write to it or feed it to autograd
        if self.stats.get("entropy_redraws"):
            logger.warning("sampling.entropy_redraw: %d of %d samples re-drawn (unigram entropy of 256 tokens < 4 nats, "
                           "BD3-LM's rule)", self.stats["entropy_redraws"], num_samples)
        return torch.cat(chunks)
