"""The DiT backbone shared by every model in the package: teachers, students, generators, aux.

A diffusion transformer with adaLN time conditioning, as in MDLM, Duo and BD3-LM. Its module
names and forward pass match the public `models/dit.py:DIT` of those repos exactly, so their
checkpoints load without a conversion table (`research/host-pattern.md` §3; loading and public
config.json names: `checkpoints.py`, `public_config.py`). Read top to bottom: rotary, time
embedding, adaLN block, final layer, `DiTConfig`, `DiT`. Beside it: `attention.py` (kernels),
`kv_cache.py`, `noise_input.py` (generator noise).

Additions over the public DiT, none of which change its numbers:
- soft input: probabilities [B, S, V] instead of token ids (embedding = probs @ W);
- `causal=True` for the `ar` baseline (same keys; the public AR variant drops adaLN, we keep it);
- `noise_dim > 0`: a zero-initialised projection of Gaussian noise added to the residual stream,
  D-MMD's generator noise input (paper §6.5): white, or a pyramid over the image (`noise_grid`);
- for block diffusion: an attention mask, explicit rotary `positions` (BD3-LM's [x_t, x_0]
  training input repeats 0..L−1 for each half), a `KVCache` of finished blocks, and σ per
  segment ([B, G]: G equal runs of positions, e.g. one per block, noisy blocks conditioned on
  their σ, clean ones on 0; G = S is σ per position). The input length S is free (2L for BD3-LM
  training, one block with a cache).

Processes, losses and what sigma means for a given algo live elsewhere (`diffusion/`, `algos/`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from mdlm_dmmd.errors import UserError
from mdlm_dmmd.models import noise_input
from mdlm_dmmd.models.attention import ATTN_BACKENDS, attention, flash_attn_available, flex_block_mask, resolve_backend
from mdlm_dmmd.models.kv_cache import KVCache

# ----------------------------------------------------------------------------------------------
# Rotary position embedding


def rotate_half(x: Tensor) -> Tensor:
    """GPT-NeoX rotation: split the head dim in two halves (not interleaved pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """Non-interleaved rotary over the full head dim (host-pattern §3.4). `inv_freq` is persistent
    because public checkpoints store it (`rotary_emb.inv_freq`); recomputable, so it may be missing.

    Angles are always float32, and `inv_freq` stays float32 when the model is cast (`.to(bf16)`,
    Lightning's `bf16-true`): in bf16 (8 mantissa bits) integer positions above 256 round together
    (256 and 257 would share a position) and the frequencies lose 3 digits. Upstream's
    `type_as(inv_freq)` rounds them so in a bf16 model."""

    def __init__(self, head_dim: int, base: float = 10_000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=True)  # [hd/2]

    def _apply(self, fn, recurse: bool = True):
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:  # a dtype cast: keep the float32 values, follow the device
            self.inv_freq = inv_freq.to(device=self.inv_freq.device, dtype=torch.float32)
        return self

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin [S, hd] for int positions [S] (or [B, S, hd] for [B, S]), float32."""
        freqs = positions.float()[..., None] * self.inv_freq.float()  # [(B,) S, hd/2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [(B,) S, hd]
        return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate queries or keys x [B, S, H, hd]; cos, sin [S, hd] or [B, S, hd] are cast to x's
    dtype (as upstream)."""
    cos = cos.unsqueeze(-2).to(x.dtype)  # [(B,) S, 1, hd], broadcast over heads
    sin = sin.unsqueeze(-2).to(x.dtype)
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------------------------
# Building blocks


class LayerNorm(nn.Module):
    """LayerNorm in fp32 without bias, times a learned weight (upstream's custom LayerNorm), cast
    back to the input's dtype (bf16 stays bf16); in fp32 exactly upstream's `layer_norm(x) * weight`."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            normed = F.layer_norm(x.float(), [self.dim])
        return (normed * self.weight.float()).to(x.dtype)


def per_segment(fn: Callable, x: Tensor, *params: Tensor) -> Tensor:
    """fn(x, *params) for x [B, S, D] and adaLN outputs [B, G, D], G dividing S: segment g (S/G
    positions in a row) takes params[:, g]. G = 1 and G = S broadcast as they are; other G view
    x as [B, G, S/G, D], so no [B, S, D] copy of the parameters is made."""
    B, S, D = x.shape
    G = params[0].shape[1]
    if G in (1, S):
        return fn(x, *params)
    return fn(x.reshape(B, G, S // G, D), *(p[:, :, None] for p in params)).reshape(B, S, D)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation x·(1 + scale) + shift; shift, scale [B, G, D] (see `per_segment`)."""
    return per_segment(lambda x, shift, scale: x * (1 + scale) + shift, x, shift, scale)


def gated(x: Tensor, gate: Tensor, branch: Tensor) -> Tensor:
    """The residual update x + gate·branch; gate [B, G, D] (see `per_segment`)."""
    return x + per_segment(lambda branch, gate: gate * branch, branch, gate)


def adaln_chunks(modulation: Tensor, n: int) -> tuple[Tensor, ...]:
    """Split an adaLN output [B, n·D] (one σ per sequence) or [B, G, n·D] (per segment, G = S:
    per position) into n tensors [B, 1, D] or [B, G, D]."""
    if modulation.ndim == 2:
        modulation = modulation[:, None]  # [B, 1, n·D]
    return modulation.chunk(n, dim=-1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the noise level sigma (256 dims), then Linear-SiLU-Linear.

    The input is sigma as the algo defines it (MDLM/BD3-LM feed 0, Duo -log alpha_t), of any
    shape: [B] or [B, S] gives [B, C] or [B, S, C].
    """

    def __init__(self, cond_dim: int, frequency_dim: int = 256, max_period: float = 10_000.0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, cond_dim, bias=True), nn.SiLU(),
                                 nn.Linear(cond_dim, cond_dim, bias=True))
        self.frequency_dim = frequency_dim
        self.max_period = max_period

    def forward(self, sigma: Tensor) -> Tensor:
        half = self.frequency_dim // 2
        steps = torch.arange(half, dtype=torch.float32, device=sigma.device)
        freqs = torch.exp(-math.log(self.max_period) * steps / half)  # [half]
        args = sigma[..., None].float() * freqs  # [..., half]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [..., 256]
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # [..., C]


class EmbeddingLayer(nn.Module):
    """Token embedding [V, D] as a bare Parameter (public key `vocab_embed.embedding`). Takes ids
    [B, S] (row lookup) or probabilities [B, S, V] (their expectation probs @ W: soft tokens)."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype.is_floating_point:
            return x.to(self.embedding.dtype) @ self.embedding  # [B, S, V] @ [V, D] -> [B, S, D]
        return self.embedding[x]  # [B, S, D]


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN: attention then MLP, each gated by the time embedding."""

    def __init__(self, dim: int, n_heads: int, cond_dim: int, mlp_ratio: int = 4, dropout: float = 0.1):
        super().__init__()
        # Registration order = upstream parameter order, which public EMA lists depend on.
        self.n_heads = n_heads
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim, bias=True), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * dim, dim, bias=True))
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim, bias=True)
        # Dropout only on the two branch outputs; attention itself has none (as upstream).
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, c: Tensor, rotary: tuple[Tensor, Tensor], attend: Callable) -> Tensor:
        """x [B, S, D], c [B, C] or per segment [B, G, C] (`per_segment`); `attend` maps rotated
        q, k and v [B, S, H, hd] to [B, S, H, hd] (adding cached keys and values, if any)."""
        B, S, D = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = adaln_chunks(self.adaLN_modulation(c), 6)

        # 1. attention branch
        a = attend(*self.queries_keys_values(x, shift_msa, scale_msa, rotary)).reshape(B, S, D)
        x = gated(x, gate_msa, self.dropout(self.attn_out(a)))

        # 2. MLP branch
        h = modulate(self.norm2(x), shift_mlp, scale_mlp)
        x = gated(x, gate_mlp, self.dropout(self.mlp(h)))
        return x

    def queries_keys_values(self, x: Tensor, shift: Tensor, scale: Tensor,
                            rotary: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated queries and keys and the values, 3 x [B, S, H, hd], of the attention branch."""
        B, S, D = x.shape
        h = modulate(self.norm1(x), shift, scale)
        q, k, v = self.attn_qkv(h).view(B, S, 3, self.n_heads, D // self.n_heads).unbind(2)  # (three h d)
        cos, sin = rotary
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def keys_values(self, x: Tensor, c: Tensor, rotary: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Only what this block adds to a KV cache for x (keys rotated, values): a commit pass needs
        no more of the last block, whose attention output and MLP feed only the logits."""
        shift_msa, scale_msa = adaln_chunks(self.adaLN_modulation(c), 6)[:2]
        return self.queries_keys_values(x, shift_msa, scale_msa, rotary)[1:]


class FinalLayer(nn.Module):
    """adaLN-modulated norm, then the (untied) projection to vocabulary logits."""

    def __init__(self, dim: int, vocab_size: int, cond_dim: int):
        super().__init__()
        self.norm_final = LayerNorm(dim)
        self.linear = nn.Linear(dim, vocab_size, bias=True)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * dim, bias=True)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = adaln_chunks(self.adaLN_modulation(c), 2)  # 2 x [B, 1 or G, D]
        return self.linear(modulate(self.norm_final(x), shift, scale))  # [B, S, V]


# ----------------------------------------------------------------------------------------------
# Config


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class DiTConfig:
    """Size and wiring of a DiT; the `model.*` keys of the Hydra config."""

    vocab_size: int  # V, model vocabulary INCLUDING a mask token if the process has one
    length: int  # L, sequence length of the data (model.length); a call may pass another S
    hidden_dim: int = 768  # D
    cond_dim: int = 128  # C, width of the time embedding
    n_blocks: int = 12
    n_heads: int = 12
    dropout: float = 0.1  # on the attention and MLP branch outputs
    causal: bool = False  # causal attention (the `ar` algo)
    attn_backend: str = "auto"  # auto | sdpa | flash | flex
    noise_dim: int = 0  # >0: generator noise input (D-MMD §6.5)
    # [H, W] or [H, W, C] with H·W·C = length (tokens in (h, w, c) raster order): the noise
    # input is a pyramid over the image (`noise_input.py`)
    noise_grid: list[int] | None = None

    def validate(self) -> None:
        """Raise one UserError listing every bad field, each named as its `model.*` key."""
        problems = []
        for name in ("vocab_size", "length", "hidden_dim", "cond_dim", "n_blocks", "n_heads"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                problems.append(f"model.{name} must be a positive int, got {value!r}")
        if not _is_int(self.noise_dim) or self.noise_dim < 0:
            problems.append(f"model.noise_dim must be an int >= 0 (0 = no noise input), got {self.noise_dim!r}")
        if self.noise_grid is not None:
            grid = list(self.noise_grid)
            if len(grid) not in (2, 3) or not all(_is_int(n) and n > 0 for n in grid) or math.prod(grid) != self.length:
                problems.append(f"model.noise_grid must be [H, W] with H·W = model.length ({self.length}) or "
                                f"[H, W, C] with H·W·C = model.length, got {self.noise_grid!r}")
            elif not self.noise_dim:
                problems.append("model.noise_grid needs a noise input (model.noise_dim > 0)")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) or not 0 <= self.dropout < 1:
            problems.append(f"model.dropout must be a float in [0, 1), got {self.dropout!r}")
        if not isinstance(self.causal, bool):
            problems.append(f"model.causal must be true or false, got {self.causal!r}")
        if self.attn_backend not in ATTN_BACKENDS:
            problems.append(f"model.attn_backend must be one of {', '.join(ATTN_BACKENDS)}; got {self.attn_backend!r}")
        if _is_int(self.hidden_dim) and _is_int(self.n_heads) and self.hidden_dim > 0 and self.n_heads > 0:
            if self.hidden_dim % self.n_heads:
                problems.append(f"model.hidden_dim ({self.hidden_dim}) must be divisible by model.n_heads "
                                f"({self.n_heads})")
            elif (self.hidden_dim // self.n_heads) % 2:
                problems.append(f"model.hidden_dim / model.n_heads ({self.hidden_dim // self.n_heads}) "
                                "must be even for rotary")
        if problems:
            raise UserError("; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.n_heads

    @property
    def noise_levels(self) -> list[tuple[int, int]]:
        """(H, W) sizes of the noise pyramid, fine to coarse, halving (rounding up) down to 1×1."""
        return [] if self.noise_grid is None else noise_input.pyramid_levels(self.noise_grid[0], self.noise_grid[1])

    @property
    def noise_features(self) -> int:
        """Width of the noise input per token: noise_dim, times the pyramid's number of levels."""
        return self.noise_dim * max(len(self.noise_levels), 1)


# ----------------------------------------------------------------------------------------------
# The model


class DiT(nn.Module):
    """Tokens or probabilities + noise level sigma -> fp32 logits [B, S, V]."""

    # Recompute each block's activations in backward instead of storing them (a runtime switch,
    # `model.activation_checkpointing`; not part of the architecture or its checkpoints).
    activation_checkpointing: bool = False

    def __init__(self, config: DiTConfig):
        super().__init__()
        config.validate()
        if config.attn_backend == "flash" and not flash_attn_available():
            raise UserError("model.attn_backend=flash needs flash-attn (pip install 'mdlm-dmmd[flash]'); "
                            "use model.attn_backend=auto or sdpa")
        self.config = config
        D, C, V = config.hidden_dim, config.cond_dim, config.vocab_size
        # Registration order = upstream parameter order (public EMA `shadow_params` lists).
        self.vocab_embed = EmbeddingLayer(V, D)
        self.sigma_map = TimestepEmbedder(C)
        self.rotary_emb = Rotary(config.head_dim)
        self.blocks = nn.ModuleList(DiTBlock(D, config.n_heads, C, dropout=config.dropout)
                                    for _ in range(config.n_blocks))
        self.output_layer = FinalLayer(D, V, C)
        # Registered last so the parameters before it keep the public order; used right after
        # the embedding in forward.
        self.noise_proj = nn.Linear(config.noise_features, D, bias=False) if config.noise_dim > 0 else None
        self._init_weights()

    def _init_weights(self) -> None:
        """Upstream init: PyTorch defaults for Linear layers, ones for norms, and these."""
        nn.init.kaiming_uniform_(self.vocab_embed.embedding, a=math.sqrt(5))
        # adaLN-Zero (DiT): every block starts as the identity, whatever sigma is.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation.weight)
            nn.init.zeros_(block.adaLN_modulation.bias)
        nn.init.zeros_(self.output_layer.adaLN_modulation.weight)
        nn.init.zeros_(self.output_layer.adaLN_modulation.bias)
        # Zero logits at init: a uniform prediction (as upstream).
        nn.init.zeros_(self.output_layer.linear.weight)
        nn.init.zeros_(self.output_layer.linear.bias)
        if self.noise_proj is not None:
            # Zero so that a generator copied from the teacher equals the teacher at init.
            nn.init.zeros_(self.noise_proj.weight)

    def draw_noise(self, batch: int, length: int, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> Tensor | None:
        """Generator noise [B, L, noise_features] (white, or the pyramid over `noise_grid`; see
        `noise_input.py`), or None when the model takes none."""
        if self.noise_proj is None:
            return None
        if device is None:
            device = generator.device if generator is not None else self.vocab_embed.embedding.device
        return noise_input.draw_noise(batch, length, self.config.noise_dim, self.config.noise_grid, generator, device)

    def forward(self, x: Tensor, sigma: Tensor, noise: Tensor | None = None, *, attn_mask: Tensor | None = None,
                positions: Tensor | None = None, kv_cache: KVCache | None = None, logits: bool = True,
                logits_at: Tensor | None = None) -> Tensor | None:
        """Logits for every input position (or for the positions `logits_at`).

        x: token ids [B, S] (int) or probabilities [B, S, V] (float); S is free.
        sigma: noise level [B] (a scalar is broadcast), or per segment [B, G] with G dividing S:
            position i takes sigma[:, i // (S / G)] (G = S: per position; a block model's σ is
            constant inside each block, and its adaLN then runs per block, not per token).
        noise: [B, S, noise_features], required iff config.noise_dim > 0 (see `draw_noise`).
        attn_mask: optional bool [S, T + S] over (cached tokens, input), T = kv_cache.length (0
            without a cache); True = may attend; combined with `causal`. None = full (or causal)
            attention.
        positions: rotary positions, int [S] or [B, S]; default T, T + 1, ..., T + S − 1 (after a
            cache's sliding window dropped tokens: `kv_cache.end`, ...).
        kv_cache: a `KVCache` of T earlier tokens, which every query attends to as well; this
            call's keys and values become its pending entries (`kv_cache.commit()` keeps them).
        logits: False for a pass that only fills `kv_cache` (committing a finished block): the
            last block stops at its keys and values, the output head is skipped, None is returned.
        logits_at: bool [B, S]: the output head runs at these positions only and [N, V] logits
            come back, N = logits_at.sum(), in row-major order (a masked sampler needs x̂ only
            where a token is revealed: at V = 50k the head costs a third of a 768-wide DiT).
        Returns float32 logits [B, S, V] (or [N, V]), computed in the parameters' dtype.
        """
        if not logits and kv_cache is None:
            raise ValueError("DiT: logits=False only fills a KV cache; pass kv_cache")
        B, S = x.shape[:2]
        T = kv_cache.length if kv_cache is not None else 0
        V = self.config.vocab_size
        if x.dtype.is_floating_point and (x.ndim != 3 or x.shape[-1] != V):
            raise ValueError(f"DiT: soft input must be probabilities [B, S, {V}], got shape {tuple(x.shape)}")
        if not x.dtype.is_floating_point and x.ndim != 2:
            raise ValueError(f"DiT: token input must be ids [B, S], got shape {tuple(x.shape)}")
        sigma = self._sigma_shape(sigma, B, S)
        if attn_mask is not None and (attn_mask.dtype != torch.bool or attn_mask.shape != (S, T + S)):
            raise ValueError(f"DiT: attn_mask must be bool [S, T + S] = [{S}, {T + S}], got "
                             f"{attn_mask.dtype} {tuple(attn_mask.shape)}")
        if positions is not None and (positions.dtype.is_floating_point or positions.shape not in ((S,), (B, S))):
            raise ValueError(f"DiT: positions must be ints [S] or [B, S], got {positions.dtype} {tuple(positions.shape)}")
        if logits_at is not None and (logits_at.dtype != torch.bool or logits_at.shape != (B, S)):
            raise ValueError(f"DiT: logits_at must be bool [B, S] = [{B}, {S}], got {logits_at.dtype} "
                             f"{tuple(logits_at.shape)}")

        # 1. embed tokens (or their expectation under probs), plus the generator noise input
        h = self.vocab_embed(x)  # [B, S, D]
        if self.noise_proj is not None:
            if noise is None:
                raise ValueError(f"DiT has a noise input (noise_dim={self.config.noise_dim}) but got noise=None; "
                                 "a noise-conditioned generator must be given noise, e.g. model.draw_noise(B, L)")
            if noise.shape != (B, S, self.config.noise_features):
                raise ValueError(f"DiT: noise must have shape {(B, S, self.config.noise_features)}, "
                                 f"got {tuple(noise.shape)}")
            h = h + self.noise_proj(noise.to(h.dtype))  # [B, S, D]
        elif noise is not None:
            raise ValueError("DiT got noise but has no noise input (model.noise_dim=0)")

        # 2. time conditioning and positions
        c = F.silu(self.sigma_map(sigma))  # [B, C] or [B, G, C]
        if positions is None:
            start = kv_cache.end if kv_cache is not None else 0  # = T unless a sliding window dropped tokens
            positions = torch.arange(start, start + S, device=h.device)  # [S]
        rotary = self.rotary_emb(positions.to(h.device))  # 2 x [(B,) S, hd]

        # 3. attention backend and mask, fixed for all blocks of this call
        causal = self.config.causal
        backend = resolve_backend(self.config.attn_backend, h.device, has_mask=attn_mask is not None, same_length=T == 0)
        mask = attn_mask
        if backend == "flex":
            if h.device.type == "cpu" and h.requires_grad:
                raise UserError("model.attn_backend=flex cannot train on CPU (torch's flex attention has no "
                                "CPU backward); use model.attn_backend=auto or sdpa")
            mask = flex_block_mask(S, T + S, causal=causal, attn_mask=attn_mask, device=h.device)
            causal = False  # the block mask holds it

        def attend(q: Tensor, k: Tensor, v: Tensor, layer: int) -> Tensor:
            if kv_cache is not None:
                k, v = kv_cache.update(layer, k, v)  # [B, T + S, H, hd]
            return attention(q, k, v, mask, causal=causal, backend=backend)

        # 4. blocks and output head
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and kv_cache is None
        for i, block in enumerate(self.blocks):
            if not logits and i == len(self.blocks) - 1:
                kv_cache.update(i, *block.keys_values(h, c, rotary))
                return None
            if recompute:  # non-reentrant: the RNG (dropout) is replayed in the recomputation
                h = torch.utils.checkpoint.checkpoint(block, h, c, rotary, functools.partial(attend, layer=i),
                                                      use_reentrant=False)
            else:
                h = block(h, c, rotary, functools.partial(attend, layer=i))
        if logits_at is not None:
            c = c[:, None].expand(B, S, c.shape[-1]) if c.ndim == 2 else c.repeat_interleave(S // c.shape[1], dim=1)
            # squeeze, not [0]: its backward is a view, where [0]'s writes the gradient into a zero [1, N, V]
            return self.output_layer(h[logits_at][None], c[logits_at][None]).squeeze(0).float()  # [N, V]
        return self.output_layer(h, c).float()  # [B, S, V]

    @staticmethod
    def _sigma_shape(sigma: Tensor, B: int, S: int) -> Tensor:
        """sigma as [B] (one per sequence; a scalar is broadcast) or [B, G] (per segment, G
        dividing S; G = S: per position)."""
        if sigma.numel() == 1:
            return sigma.reshape(1).expand(B)
        if sigma.numel() == B and not (sigma.ndim == 2 and sigma.shape[0] == B):  # e.g. [1, B]: one per sequence
            return sigma.reshape(B)
        if sigma.ndim != 2 or sigma.shape[0] != B or sigma.shape[1] == 0 or S % sigma.shape[1]:
            raise ValueError(f"DiT: sigma must have shape [B] = [{B}], [B, S] = [{B}, {S}] or [B, G] with G dividing "
                             f"S (per segment), got {tuple(sigma.shape)}")
        return sigma
