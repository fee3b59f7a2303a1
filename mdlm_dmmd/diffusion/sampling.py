"""k-step samplers shared by teachers, students and public checkpoints.

The sampler sees a denoiser function and a process, never the training module (diffusers'
pipeline/scheduler split): EMA swaps, `eval()`, noise inputs and device moves happen in the
caller, inside the denoiser closure. Two step rules:

- `ancestral`: z_s ~ q(z_s | z_t, x̂) with the prediction x̂ plugged into the posterior.
- `generator` (D-MMD Algorithm 1): draw a hard x ~ Cat(x̂) in float64, then z_s ~ q(z_s | z_t, x).
  For the masked process both rules give the same distribution; for uniform diffusion they do
  not (eq. 4 is not linear in x), and distilled students always use this rule.

A process (`diffusion.process.Process`) that can say which tokens change before x is drawn
(`draw_updated_positions`; the masked process: the revealed ones) gets x sampled at those
positions only, the rest of the float64 work per step is skipped. A denoiser that accepts
`at=` (`denoiser.Denoiser`) is then called after the draw, on the sequences with a revealed
token only, with the output head at the revealed tokens only; a step that reveals nothing
makes no call. At many steps most steps reveal nothing in most sequences (MDLM's p_x0 cache
exploits the same, for the whole batch and only for models without time conditioning); the
tokens are those of the dense path whenever the network draws no noise (same draws, same
order). Uniform diffusion returns None and takes the full path.

Time grid: t_j = j/k, stepping from 1 to 0; the last step has s = 0 and ends at the data
(α_s = 1, also where a schedule's α(0) < 1, as Duo's noise-removal step, which Duo makes an
extra call after k steps down to t = 1e-5: `step(last=True)`), which reveals
every token, so k steps cost k network evaluations (at most k where steps that reveal nothing
are skipped).

Noise removal (`noise_removal`, what happens at the end):
- `ancestral`: the last step draws, as above (k calls).
- `greedy`: the last step takes argmax x̂(z_{1/k}) instead of its draw (k calls).
- `greedy_tail`: Duo's protocol (Sahoo et al. 2025 §4.2; its `sampling.noise_removal=greedy`):
  k ordinary steps from t = 1 down to t = 1e-5 (`TAIL_T`, the schedule's own α there, no jump
  to the data), then one more call at t = 1e-5 and argmax x̂ wherever the token is not yet
  known (every token under uniform diffusion, the masks left under masked diffusion): k + 1
  calls (`network_calls`; a masked sequence with no mask left makes no extra call).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import Tensor

from mdlm_dmmd import rng
from tqdm.auto import tqdm

from mdlm_dmmd.diffusion.process import Process
from mdlm_dmmd.errors import UserError

Denoiser = Callable[..., Tensor]  # (z_t [B, L], t [B][, at=bool [B, L]]) -> log-probs [B, L, V] (at: [N, V])
RULES = ("ancestral", "generator")
NOISE_REMOVALS = ("ancestral", "greedy", "greedy_tail")
TAIL_T = 1e-5  # where Duo's greedy tail stops its k steps and makes its last call (Duo's sampling eps)
NUCLEUS_RULES = ("keep", "drop")  # the token that crosses top_p: kept (Duo, ours) | dropped (BD3-LM)


CATEGORICAL_CHUNK = 1 << 24  # float64 CDF entries built at once (128 MB): rows are drawn in chunks


def sample_categorical_at(probs: Tensor, where: Tensor, generator: rng.BatchShare | None = None) -> Tensor:
    """x ~ Cat(probs) at the positions `where` (bool [B, L]; `probs` [N, V]: their rows in
    row-major order), from one uniform per position of the batch, kept where drawn: each example
    draws the same whichever positions are drawn, and on any number of processes (a `BatchShare`)."""
    uniforms = rng.rand(where.shape, generator, device=where.device, dtype=torch.float64)
    return sample_categorical(probs, uniforms=uniforms[where])


def sample_categorical(probs: Tensor, generator: torch.Generator | None = None, uniforms: Tensor | None = None) -> Tensor:
    """Index ~ Cat(probs) along the last dim by inverting the float64 CDF: one uniform per row.

    float64 because float32 sampling (Gumbel noise, or a float32 CDF) truncates the tail of
    small probabilities, which measurably lowers sample entropy (Zheng et al. 2024; Duo's
    `use_float64`); a float64 CDF resolves masses down to ~1e-16 of the row's total. One uniform
    per row instead of one per vocabulary entry (an exponential race) matters at V = 50k, and
    the float64 CDF is built for `CATEGORICAL_CHUNK` entries at a time, never for all of a
    [B, L, V] input (13 GB at B = 32, L = 1024, V = 50k); the draws do not depend on the chunking.
    Accepts unnormalised probabilities; a zero-probability index is never drawn. `uniforms`
    (float64, one per row in row-major order) are drawn here when not given; with a
    `rng.BatchShare`, `probs` must be batch-first ([B, ..., V]).
    """
    flat = probs.reshape(-1, probs.shape[-1])
    if uniforms is not None:
        u = uniforms.reshape(-1, 1).to(torch.float64)
    elif isinstance(generator, rng.BatchShare):
        u = rng.rand(probs.shape[:-1], generator, device=probs.device, dtype=torch.float64).reshape(-1, 1)
    else:
        u = torch.rand(flat.shape[0], 1, generator=generator, device=probs.device, dtype=torch.float64)
    drawn = torch.empty(flat.shape[0], dtype=torch.long, device=probs.device)
    rows = max(1, CATEGORICAL_CHUNK // flat.shape[-1])
    for start in range(0, flat.shape[0], rows):
        cdf = flat[start: start + rows].double().cumsum(dim=-1)
        total = cdf[:, -1:]
        target = torch.minimum(u[start: start + rows] * total,  # u · total < total even after rounding
                               torch.nextafter(total, torch.zeros_like(total)))
        drawn[start: start + rows] = torch.searchsorted(cdf, target, right=True)[:, 0]  # first CDF > target
    return drawn.reshape(probs.shape[:-1])


def top_p_mask(log_p: Tensor, top_p: float, rule: str = "keep") -> Tensor:
    """True for tokens inside the nucleus.

    `keep` (Duo's `top_k_top_p_filtering`, this package's default): a token is in while the mass
    before it is ≤ `top_p`, so the token that crosses `top_p` is kept (and, at an exact tie, the
    next one too, as Duo's shifted `cum_probs > top_p`). `drop` (BD3-LM's `_nucleus_sample`, to
    reproduce its checkpoints): the tokens whose cumulative mass stays ≤ `top_p`, the crossing
    one dropped. The top-1 token is always in.
    """
    sorted_log_p, order = log_p.sort(dim=-1, descending=True)
    mass = sorted_log_p.exp().cumsum(dim=-1)
    if rule == "keep":
        keep_sorted = mass - sorted_log_p.exp() <= top_p
    else:
        keep_sorted = mass <= top_p
        keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def adjust(log_p: Tensor, temperature: float = 1.0, top_p: float = 1.0, nucleus: str = "keep") -> Tensor:
    """Temperature and nucleus on log-probs → renormalised float64 probabilities [B, L, V].

    temperature 0 is greedy (one-hot argmax). Tokens outside the nucleus get probability 0.
    """
    log_p = log_p.double()
    if temperature == 0:
        return torch.nn.functional.one_hot(log_p.argmax(-1), log_p.shape[-1]).double()
    if temperature != 1.0:
        log_p = torch.log_softmax(log_p / temperature, dim=-1)
    if top_p < 1.0:
        log_p = log_p.masked_fill(~top_p_mask(log_p, top_p, nucleus), float("-inf"))
    return torch.softmax(log_p, dim=-1)


def check_sampling_args(steps: int, temperature: float, top_p: float, rule: str, noise_removal: str = "ancestral",
                        nucleus: str = "keep") -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise UserError(f"sampling.steps must be a positive int, got {steps!r}")
    if temperature < 0:
        raise UserError(f"sampling.temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"sampling.top_p must be in (0, 1], got {top_p}")
    if rule not in RULES:
        raise UserError(f"sampling.rule '{rule}' is not supported; accepted: {', '.join(RULES)}")
    if noise_removal not in NOISE_REMOVALS:
        raise UserError(f"sampling.noise_removal '{noise_removal}' is not supported; accepted: {', '.join(NOISE_REMOVALS)}")
    if nucleus not in NUCLEUS_RULES:
        raise UserError(f"sampling.nucleus must be one of {', '.join(NUCLEUS_RULES)}, got {nucleus!r}")


@torch.no_grad()
def sample(
    denoise: Denoiser,
    process: Process,
    *,
    steps: int,
    shape: tuple[int, int],
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    temperature: float = 1.0,
    top_p: float = 1.0,
    rule: str = "ancestral",
    noise_removal: str = "ancestral",
    prompt: Tensor | None = None,
    nucleus: str = "keep",
    progress: bool = False,
) -> Tensor:
    """Draw `shape[0]` sequences of length `shape[1]` in `steps` denoising steps. [B, L] int64.

    `noise_removal`: `ancestral`, `greedy` (the last step returns argmax x̂(z_{1/k}) instead of
    its draw; `steps` calls) or `greedy_tail` (Duo's: k steps down to t = 1e-5, then argmax x̂
    of one more call; k + 1 calls). See the module docstring.
    `prompt` [B, P]: the first P tokens are given (clean from the start and after every step;
    masked diffusion carries them over anyway, uniform diffusion would re-noise them).
    """
    check_sampling_args(steps, temperature, top_p, rule, noise_removal, nucleus)
    check_prompt(prompt, shape)
    z = keep_prompt(process.prior(shape, device=device, generator=generator), prompt)
    times = time_grid(steps, noise_removal, device)
    sparse = takes_positions(denoise)
    for j in tqdm(range(steps), desc="sampling", disable=not progress, leave=False):
        t = times[j].expand(shape[0])
        s = times[j + 1].expand(shape[0])
        updated = process.draw_updated_positions(z, t, s, generator) if sparse else None
        if updated is not None:  # x̂ at the revealed tokens of the sequences that reveal any
            if not updated.any():
                continue
            log_p = log_probs_at(denoise, z, t, updated, sparse)  # [N, V], row-major like z[updated]
        else:
            log_p = denoise(z, t)
        if noise_removal == "greedy" and j == steps - 1:
            z = greedy_step(z, log_p, updated)  # argmax is unchanged by temperature > 0 and top-p
        else:
            z = step(process, log_p, z, t, s, rule=rule, temperature=temperature, top_p=top_p, nucleus=nucleus,
                     generator=generator, updated=updated, last=j == steps - 1 and noise_removal != "greedy_tail")
        z = keep_prompt(z, prompt)
    if noise_removal == "greedy_tail":
        z = keep_prompt(greedy_tail(lambda z_, t_, at: log_probs_at(denoise, z_, t_, at, sparse), process, z), prompt)
    return z


def log_probs_at(denoise: Denoiser, z: Tensor, t: Tensor, at: Tensor, sparse: bool) -> Tensor:
    """x̂ [N, V] at the `at` positions (bool [B, L]) of z, row-major: a denoiser that takes
    positions is called on the sequences with any, with its head there only; another densely."""
    if not sparse:
        return denoise(z, t)[at]
    rows = at.any(dim=1)
    return denoise(z[rows], t[rows], at=at[rows])


def time_grid(steps: int, noise_removal: str, device: torch.device | str = "cpu") -> Tensor:
    """t_0 = 1 > … > t_k: down to 0, or to `TAIL_T` before Duo's greedy tail. [k + 1]"""
    return torch.linspace(1.0, TAIL_T if noise_removal == "greedy_tail" else 0.0, steps + 1, device=device)


def network_calls(steps: int, noise_removal: str) -> int:
    """Network evaluations of k steps (per block for block models): k, or k + 1 with the greedy tail."""
    return steps + (noise_removal == "greedy_tail")


def greedy_tail(log_probs_at: Callable[[Tensor, Tensor, Tensor], Tensor], process: Process, z: Tensor) -> Tensor:
    """Duo's greedy tail after the k steps: argmax x̂(z, t = TAIL_T) at the tokens whose clean
    value is still unknown (`process.denoising_positions`); no call when there are none.
    `log_probs_at(z, t, at)` gives x̂ [N, V] at the `at` positions (bool [B, L]) of z [B, L]."""
    where = process.denoising_positions(z)
    if not where.any():
        return z
    t = torch.full((z.shape[0],), TAIL_T, device=z.device)
    out = z.clone()
    out[where] = log_probs_at(z, t, where).argmax(dim=-1)
    return out


def takes_positions(denoise: Denoiser) -> bool:
    """Whether `denoise` accepts `at=` (x̂ at some positions only): a `denoiser.Denoiser`, or a
    partial of one; any other `(z_t, t) -> log-probs` function is called densely."""
    try:
        return "at" in inspect.signature(denoise).parameters
    except (TypeError, ValueError):
        return False


def greedy_step(z: Tensor, log_p: Tensor, updated: Tensor | None) -> Tensor:
    """The greedy last step: argmax x̂ everywhere (log_p [B, L, V]) or at the `updated`
    positions only (log_p [N, V]; a masked process's other tokens are already clean)."""
    if updated is None:
        return log_p.argmax(dim=-1)
    z = z.clone()
    z[updated] = log_p.argmax(dim=-1)
    return z


def check_prompt(prompt: Tensor | None, shape: tuple[int, int]) -> None:
    if prompt is None:
        return
    if prompt.dim() != 2 or prompt.shape[0] != shape[0] or not 0 < prompt.shape[1] < shape[1] or prompt.is_floating_point():
        raise UserError(f"a prompt must be token ids [B={shape[0]}, P] with 0 < P < L={shape[1]}, "
                        f"got {prompt.dtype} of shape {tuple(prompt.shape)}")


def keep_prompt(z: Tensor, prompt: Tensor | None) -> Tensor:
    """z with its first P tokens set to the prompt [B, P] (z itself when there is none)."""
    if prompt is None:
        return z
    z = z.clone()
    z[:, : prompt.shape[1]] = prompt.to(z.device)
    return z


def step(
    process: Process,
    log_p: Tensor,
    z_t: Tensor,
    t: Tensor,
    s: Tensor,
    *,
    rule: str = "ancestral",
    temperature: float = 1.0,
    top_p: float = 1.0,
    nucleus: str = "keep",
    generator: torch.Generator | rng.BatchShare | None = None,
    updated: Tensor | None = None,
    last: bool = False,
) -> Tensor:
    """z_s given z_t and the denoiser's log-probs x̂(z_t) [B, L, V]: one step of `sample`. [B, L]

    `last`: the sampler's last step (s = 0), which a process whose posterior methods take
    `final=True` (`UniformProcess`) ends at the data (α_s = 1) whatever its schedule's α(0).

    With a `rng.BatchShare` (training: SDTT's teacher steps) every draw is the example's own, so
    a step on W processes draws what it draws on one.

    `updated` (masked process): the positions `process.draw_updated_positions` drew before the
    denoiser was called, which then gave x̂ at those positions only (log_p [N, V]).
    """
    if updated is None:
        updated = process.draw_updated_positions(z_t, t, s, generator)
        log_p = log_p if updated is None else log_p[updated]
    if updated is not None:
        # Masked: which tokens change does not depend on x and the posterior is linear in x,
        # so both rules reduce to drawing x at the revealed positions only.
        z_s = z_t.clone()
        probs = adjust(log_p, temperature, top_p, nucleus)  # [N, V]: not batch-first
        if isinstance(generator, rng.BatchShare):  # a share draws per batch row
            z_s[updated] = sample_categorical_at(probs, updated, generator)
        else:
            z_s[updated] = sample_categorical(probs, generator)
        return z_s
    probs = adjust(log_p, temperature, top_p, nucleus)  # [B, L, V] float64
    if rule == "generator":
        posterior = process.sample_posterior
        return posterior(z_t, sample_categorical(probs, generator), t, s, generator, **final_step(posterior, last))
    soft = getattr(process, "sample_soft_posterior", None)  # optional: the ancestral draw without q [B, L, V]
    if soft is not None:
        return soft(z_t, probs, sample_categorical(probs, generator), t, s, generator, **final_step(soft, last))
    posterior = process.posterior_probs
    return sample_categorical(posterior(z_t, probs, t, s, **final_step(posterior, last)), generator)


def final_step(method: Callable, last: bool) -> dict:
    """`{"final": True}` on the last step where the process's `method` takes it, else nothing."""
    if not last:
        return {}
    try:
        return {"final": True} if "final" in inspect.signature(method).parameters else {}
    except (TypeError, ValueError):
        return {}


def shift_right(x: Tensor, start_id: int) -> Tensor:
    """[start, x_0, …, x_{L−2}]: the input under which position i of a causal model predicts x_i."""
    return torch.cat([torch.full_like(x[:, :1], start_id), x[:, :-1]], dim=1)


@torch.no_grad()
def sample_autoregressive(
    next_log_probs: Callable[[Tensor], Tensor],
    *,
    shape: tuple[int, int],
    start_id: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    temperature: float = 1.0,
    top_p: float = 1.0,
    prompt: Tensor | None = None,
    nucleus: str = "keep",
    progress: bool = False,
) -> Tensor:
    """Left-to-right sampling for a causal model fed [start, x_0, …, x_{L−2}]. [B, L] int64.

    `next_log_probs(inputs [B, L]) -> [B, L, V]`; position i of the output predicts x_i.
    `prompt` [B, P]: the first P tokens are given and sampling starts at position P.
    """
    check_sampling_args(1, temperature, top_p, "ancestral", nucleus=nucleus)
    check_prompt(prompt, shape)
    x = keep_prompt(torch.full(shape, start_id, dtype=torch.long, device=device), prompt)
    first = 0 if prompt is None else prompt.shape[1]
    for i in tqdm(range(first, shape[1]), desc="sampling", disable=not progress, leave=False):
        log_p = next_log_probs(shift_right(x, start_id))[:, i]  # [B, V]
        x[:, i] = sample_categorical(adjust(log_p, temperature, top_p, nucleus), generator)
    return x


# -- samplers: chosen once (from checkpoint metadata or by the algo), then called per batch ------
@dataclass(frozen=True)
class DiffusionSampler:
    """k-step sampling of a diffusion denoiser `(z_t, t) -> log-probs` with one step rule."""

    process: Process
    rule: str = "ancestral"
    autoregressive: ClassVar[bool] = False
    blockwise: ClassVar[bool] = False  # called with a (z_t, t) -> log-probs function

    def __call__(self, denoise: Denoiser, *, steps: int, shape: tuple[int, int], **options) -> Tensor:
        return sample(denoise, self.process, steps=steps, shape=shape, rule=self.rule, **options)


@dataclass(frozen=True)
class AutoregressiveSampler:
    """Left to right for a causal denoiser `inputs -> next-token log-probs`; one network call
    per token whatever `steps` says (and there is no noise to remove)."""

    start_id: int
    autoregressive: ClassVar[bool] = True
    blockwise: ClassVar[bool] = False

    def __call__(self, next_log_probs: Callable[[Tensor], Tensor], *, steps: int, shape: tuple[int, int],
                 noise_removal: str = "ancestral", **options) -> Tensor:
        del steps, noise_removal
        return sample_autoregressive(next_log_probs, shape=shape, start_id=self.start_id, **options)
