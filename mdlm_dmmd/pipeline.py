"""A sampling pipeline = network + process + sampling rule (diffusers' pipeline idea).

Algos build one around their evaluation network; `Pipeline.from_checkpoint` builds one from a
checkpoint alone (this package's `.ckpt`, an exported directory, or a public MDLM/Duo/BD3-LM
directory) without the class that trained it. Generator noise inputs are drawn fresh for every
network call here, so a noise-conditioned student can never be sampled without its noise.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mdlm_dmmd.diffusion import MaskedProcess, UniformProcess, process_from_meta
from mdlm_dmmd.diffusion.sampling import Denoiser, sample, sample_autoregressive
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.models.dit import DiT


def sampling_rule(meta: dict) -> str:
    """The recorded rule; checkpoints written before it was recorded for CE-trained uniform
    teachers (`loss: ce`, x̂ = E[x | z_t]) get the generator rule, the mixture step."""
    if meta.get("sampling_rule"):
        return meta["sampling_rule"]
    return "generator" if meta.get("process") == "uniform" and meta.get("loss") == "ce" else "ancestral"


@dataclass
class Pipeline:
    network: DiT
    process: MaskedProcess | UniformProcess | None  # None: autoregressive (the `ar` algo)
    time_conditioning: bool = False
    rule: str = "ancestral"  # "generator" for distilled students (D-MMD Algorithm 1)
    vocab_size: int | None = None  # real tokens; AR only (its start id is vocab_size)
    meta: dict = field(default_factory=dict)  # checkpoint metadata (vocab, data config, algo)

    @classmethod
    def from_checkpoint(cls, path, *, device: str | torch.device = "cpu", use_ema: bool = True) -> "Pipeline":
        from mdlm_dmmd.checkpoints import load_backbone

        loaded = load_backbone(path, use_ema=use_ema)
        meta = loaded.meta
        network = loaded.model.to(device).eval()
        if meta.get("process") == "autoregressive":
            return cls(network, None, vocab_size=int(meta["start_id"]), meta=meta)
        process, time_conditioning = process_from_meta(meta, network.config.vocab_size, source=f"checkpoint {path}")
        return cls(network, process, time_conditioning, sampling_rule(meta), meta=meta)

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def length(self) -> int:
        return self.network.config.length

    def sigma(self, t: Tensor) -> Tensor:
        return self.process.schedule.sigma(t) if self.time_conditioning else torch.zeros_like(t)

    def log_probs(self, z_t: Tensor, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x̂(z_t) as log-probs [B, L, V]; a noise-input network gets fresh noise on every call."""
        noise = self.network.draw_noise(z_t.shape[0], z_t.shape[1], generator=generator, device=z_t.device)
        return self.process.log_probs(self.network(z_t, self.sigma(t), noise=noise), z_t)

    def denoiser(self, generator: torch.Generator | None = None) -> Denoiser:
        return functools.partial(self.log_probs, generator=generator)

    def next_token_log_probs(self, inputs: Tensor) -> Tensor:
        sigma = torch.zeros(inputs.shape[0], device=inputs.device)
        logits = self.network(inputs, sigma)[..., : self.vocab_size]
        return torch.log_softmax(logits.float(), dim=-1)

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
    ) -> Tensor:
        """[num_samples, L] token ids, drawn `batch_size` sequences at a time; with `prompts`
        [num_samples, P], row i continues prompt i."""
        if not isinstance(num_samples, int) or num_samples < 1:
            raise UserError(f"sampling.num_samples must be a positive int, got {num_samples!r}")
        device = self.device
        length = self.length
        batch_size = batch_size or num_samples
        chunks = []
        for start in range(0, num_samples, batch_size):
            shape = (min(batch_size, num_samples - start), length)
            prompt = None if prompts is None else prompts[start: start + shape[0]].to(device)
            if self.process is None:
                chunk = sample_autoregressive(
                    self.next_token_log_probs, shape=shape, start_id=self.vocab_size, generator=generator,
                    device=device, temperature=temperature, top_p=top_p, prompt=prompt, progress=progress,
                )
            else:
                chunk = sample(
                    self.denoiser(generator), self.process, steps=steps, shape=shape, generator=generator,
                    device=device, temperature=temperature, top_p=top_p, rule=self.rule, noise_removal=noise_removal,
                    prompt=prompt, progress=progress,
                )
            chunks.append(chunk)
        return torch.cat(chunks)
