"""The DiT backbone shared by every model in the package: teachers, students, generators, aux.

A diffusion transformer with adaLN time conditioning, as in MDLM, Duo and BD3-LM. Its module
names and forward pass match the public `models/dit.py:DIT` of those repos exactly, so their
checkpoints load without a conversion table (`research/host-pattern.md` §3; loading lives in
`mdlm_dmmd/checkpoints.py`). Read top to bottom: small pieces first (rotary, attention
backends, time embedding, adaLN block, final layer), then `DiTConfig`, then `DiT`.

Additions over the public DiT, none of which change its numbers:
- soft input: probabilities [B, L, V] instead of token ids (embedding = probs @ W);
- `causal=True` for the `ar` baseline (same keys; the public AR variant drops adaLN, we keep it);
- `noise_dim > 0`: a zero-initialised projection of Gaussian noise added to the residual stream,
  the generator noise input of D-MMD (paper §6.5): white noise per token, or with `noise_grid`
  = (H, W) a 2D Gaussian noise pyramid over the image's token grid (the paper's choice for
  images: coarse levels give every token a shared source of randomness);
- attention backends `sdpa` / `flash` / `flex`, and an `attn_mask` hook for block diffusion.

Processes, losses and what sigma means for a given algo live elsewhere (`diffusion/`, `algos/`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdlm_dmmd.errors import UserError

ATTN_BACKENDS = ("auto", "sdpa", "flash", "flex")

# ----------------------------------------------------------------------------------------------
# Rotary position embedding


def rotate_half(x: Tensor) -> Tensor:
    """GPT-NeoX rotation: split the head dim in two halves (not interleaved pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """Non-interleaved rotary over the full head dim, positions 0..L-1 (host-pattern §3.4).

    `inv_freq` is a persistent buffer because the public checkpoints store it
    (`rotary_emb.inv_freq`); it is recomputable, so a checkpoint may also omit it.
    """

    def __init__(self, head_dim: int, base: float = 10_000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=True)  # [hd/2]

    def forward(self, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin of shape [L, hd], in float32 like the upstream cache."""
        positions = torch.arange(seq_len, device=device, dtype=self.inv_freq.dtype)
        freqs = torch.outer(positions, self.inv_freq)  # [L, hd/2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [L, hd]
        return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate queries or keys x [B, L, H, hd]; cos, sin [L, hd] are cast to x's dtype (as upstream)."""
    cos = cos[None, :, None, :].to(x.dtype)  # [1, L, 1, hd]
    sin = sin[None, :, None, :].to(x.dtype)
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------------------------
# Attention backends. Each maps packed qkv [B, L, 3, H, hd] (rotary applied) to [B, L, H, hd].
# All compute softmax(Q K^T / sqrt(hd)) V with no attention dropout, as upstream.


def sdpa_attention(qkv: Tensor, *, causal: bool, attn_mask: Tensor | None = None) -> Tensor:
    """torch's fused scaled-dot-product attention; the default on CPU and for explicit masks.

    attn_mask: optional bool [L, L], True = may attend (SDPA's convention).
    """
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, L, hd]
    if attn_mask is not None and causal:
        # SDPA refuses attn_mask together with is_causal, so fold causality into the mask.
        L = qkv.shape[1]
        attn_mask = attn_mask & torch.ones(L, L, dtype=torch.bool, device=qkv.device).tril()
        causal = False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)
    return out.transpose(1, 2)  # [B, L, H, hd]


@functools.cache
def flash_attn_available() -> bool:
    """Whether the optional `flash-attn` package imports (extra `[flash]`)."""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def flash_attention(qkv: Tensor, *, causal: bool) -> Tensor:
    """flash-attn varlen kernel on uniform-length sequences, the call MDLM makes (§3.5).

    flash-attn only takes fp16/bf16, so fp32 inputs run in bf16 and come back as fp32; results
    then agree with `sdpa` to bf16 precision, not to fp32.
    """
    from flash_attn.flash_attn_interface import flash_attn_varlen_qkvpacked_func

    B, L, _, H, hd = qkv.shape
    dtype = qkv.dtype
    packed = qkv.reshape(B * L, 3, H, hd)  # [(B L), 3, H, hd]
    if dtype not in (torch.float16, torch.bfloat16):
        packed = packed.to(torch.bfloat16)
    cu_seqlens = torch.arange(0, (B + 1) * L, L, dtype=torch.int32, device=qkv.device)
    out = flash_attn_varlen_qkvpacked_func(packed, cu_seqlens, L, 0.0, causal=causal)
    return out.reshape(B, L, H, hd).to(dtype)  # [B, L, H, hd]


@functools.cache
def _compiled_flex_attention() -> Callable:
    # Uncompiled flex attention materialises the full score matrix; on CUDA it is only worth
    # using compiled (BD3-LM does the same). On CPU we run it eagerly: slower, same numbers.
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_block_mask(seq_len: int, *, causal: bool, attn_mask: Tensor | None, device: torch.device):
    """A flex `BlockMask` for causal and/or an explicit bool mask [L, L]; None = full attention.

    Built once per forward pass and shared by every block.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    if not causal and attn_mask is None:
        return None

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = q_idx >= kv_idx if causal else q_idx >= 0
        if attn_mask is not None:
            allowed = allowed & attn_mask[q_idx, kv_idx]
        return allowed

    return create_block_mask(mask_mod, None, None, seq_len, seq_len, device=device)


def flex_attention(qkv: Tensor, *, block_mask) -> Tensor:
    """torch's flex attention with a precomputed `BlockMask` (or None for full attention)."""
    from torch.nn.attention.flex_attention import flex_attention as eager_flex

    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, L, hd]
    if qkv.is_cuda:
        out = _compiled_flex_attention()(q, k, v, block_mask=block_mask)
    else:
        with warnings.catch_warnings():
            # Eager on CPU is deliberate (see `_compiled_flex_attention`); silence torch's advice.
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = eager_flex(q, k, v, block_mask=block_mask)
    return out.transpose(1, 2)  # [B, L, H, hd]


# ----------------------------------------------------------------------------------------------
# Building blocks


class LayerNorm(nn.Module):
    """LayerNorm in fp32 without bias, times a learned weight (upstream's custom LayerNorm).

    The product is cast back to the input's dtype so that bf16 parameters stay bf16 downstream;
    in fp32 this is exactly upstream's `F.layer_norm(x.float(), [D]) * weight`.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            normed = F.layer_norm(x.float(), [self.dim])
        return (normed * self.weight.float()).to(x.dtype)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation; shift, scale [B, 1, D] broadcast over positions."""
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the noise level sigma (256 dims), then Linear-SiLU-Linear.

    The input is sigma as the algo defines it (MDLM/BD3-LM feed 0, Duo -log alpha_t).
    """

    def __init__(self, cond_dim: int, frequency_dim: int = 256, max_period: float = 10_000.0):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, cond_dim, bias=True),
            nn.SiLU(),
            nn.Linear(cond_dim, cond_dim, bias=True),
        )
        self.frequency_dim = frequency_dim
        self.max_period = max_period

    def forward(self, sigma: Tensor) -> Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(
            -math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half
        )  # [half]
        args = sigma[:, None].float() * freqs[None]  # [B, half]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, 256]
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # [B, C]


class EmbeddingLayer(nn.Module):
    """Token embedding `embedding` [V, D] as a bare Parameter (the public key `vocab_embed.embedding`).

    Accepts ids [B, L] (row lookup) or probabilities [B, L, V] (their expectation, probs @ W), so
    a model can be fed soft tokens, e.g. a generator's output distribution.
    """

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype.is_floating_point:
            return x.to(self.embedding.dtype) @ self.embedding  # [B, L, V] @ [V, D] -> [B, L, D]
        return self.embedding[x]  # [B, L, D]


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
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim, bias=True),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_ratio * dim, dim, bias=True),
        )
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim, bias=True)
        # Dropout only on the two branch outputs; attention itself has none (as upstream).
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, c: Tensor, rotary: tuple[Tensor, Tensor], attend: Callable) -> Tensor:
        """x [B, L, D], c [B, C]; `attend` maps qkv [B, L, 3, H, hd] to [B, L, H, hd]."""
        B, L, D = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c)[:, None].chunk(6, dim=2)  # 6 x [B, 1, D]
        )

        # 1. attention branch
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        qkv = self.attn_qkv(h).view(B, L, 3, self.n_heads, D // self.n_heads)  # [B, L, 3, H, hd]: (three h d)
        cos, sin = rotary
        q, k, v = qkv.unbind(2)
        qkv = torch.stack((apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v), dim=2)
        a = attend(qkv).reshape(B, L, D)  # [B, L, H, hd] -> [B, L, D]
        x = x + gate_msa * self.dropout(self.attn_out(a))

        # 2. MLP branch
        h = modulate(self.norm2(x), shift_mlp, scale_mlp)
        x = x + gate_mlp * self.dropout(self.mlp(h))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated norm, then the (untied) projection to vocabulary logits."""

    def __init__(self, dim: int, vocab_size: int, cond_dim: int):
        super().__init__()
        self.norm_final = LayerNorm(dim)
        self.linear = nn.Linear(dim, vocab_size, bias=True)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * dim, bias=True)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)  # 2 x [B, 1, D]
        return self.linear(modulate(self.norm_final(x), shift, scale))  # [B, L, V]


# ----------------------------------------------------------------------------------------------
# Config


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Public config.json names (MDLMConfig, DUOConfig, BD3LMConfig) -> DiTConfig fields. Upstream's
# Hydra names (`hidden_size`, `length`) are accepted too, for configs stored in Lightning ckpts.
_HF_FIELDS = {
    "vocab_size": "vocab_size",
    "model_length": "length",
    "length": "length",
    "hidden_dim": "hidden_dim",
    "hidden_size": "hidden_dim",
    "cond_dim": "cond_dim",
    "n_blocks": "n_blocks",
    "n_heads": "n_heads",
    "dropout": "dropout",
    "causal": "causal",
    "attn_backend": "attn_backend",
    "noise_dim": "noise_dim",
    "noise_grid": "noise_grid",
}
_HF_REQUIRED = ("vocab_size", "length", "hidden_dim", "cond_dim", "n_blocks", "n_heads")
# BD3-LM spells its flash backend `flash_attn`.
_BACKEND_ALIASES = {"flash_attn": "flash"}


@dataclass
class DiTConfig:
    """Size and wiring of a DiT; the `model.*` keys of the Hydra config."""

    vocab_size: int  # V, model vocabulary INCLUDING a mask token if the process has one
    length: int  # L, max sequence length (model.length)
    hidden_dim: int = 768  # D
    cond_dim: int = 128  # C, width of the time embedding
    n_blocks: int = 12
    n_heads: int = 12
    dropout: float = 0.1  # on the attention and MLP branch outputs
    causal: bool = False  # causal attention (the `ar` algo)
    attn_backend: str = "auto"  # auto | sdpa | flash | flex
    noise_dim: int = 0  # >0: generator noise input (D-MMD §6.5)
    noise_grid: list[int] | None = None  # (H, W), H·W = length: the noise input is a 2D pyramid

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
            if len(grid) != 2 or not all(_is_int(n) and n > 0 for n in grid) or grid[0] * grid[1] != self.length:
                problems.append(f"model.noise_grid must be [H, W] with H·W = model.length ({self.length}), got {self.noise_grid!r}")
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
                problems.append(
                    f"model.hidden_dim ({self.hidden_dim}) must be divisible by model.n_heads ({self.n_heads})"
                )
            elif (self.hidden_dim // self.n_heads) % 2:
                problems.append(
                    f"model.hidden_dim / model.n_heads ({self.hidden_dim // self.n_heads}) must be even for rotary"
                )
        if problems:
            raise UserError("; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.n_heads

    @property
    def noise_levels(self) -> list[tuple[int, int]]:
        """Grid sizes of the noise pyramid, fine to coarse, halving (rounding up) down to 1×1."""
        if self.noise_grid is None:
            return []
        h, w = self.noise_grid
        levels = [(h, w)]
        while levels[-1] != (1, 1):
            h, w = -(-h // 2), -(-w // 2)
            levels.append((h, w))
        return levels

    @property
    def noise_features(self) -> int:
        """Width of the noise input per token: noise_dim, times the pyramid's number of levels."""
        return self.noise_dim * max(len(self.noise_levels), 1)

    def to_hf_dict(self) -> dict:
        """Fields under the public config.json names (`model_length`, not `length`)."""
        d = dataclasses.asdict(self)
        d["model_length"] = d.pop("length")
        return d

    @classmethod
    def from_hf_dict(cls, d: dict) -> "DiTConfig":
        """Read a public MDLM/Duo/BD3-LM config.json (or our own); unknown fields are ignored.

        `cond_dim` is required although MDLMConfig defaults it to 129: every public checkpoint
        stores it (128, or 64 for BD3-LM tiny), and guessing would fail on shapes later anyway.
        """
        if d.get("adaln", True) is False:
            raise UserError("config has adaln=false; only adaLN DiTs (the public default) are supported")
        fields = {}
        for key, value in d.items():
            if key in _HF_FIELDS:
                fields[_HF_FIELDS[key]] = value
        missing = [name for name in _HF_REQUIRED if name not in fields]
        if missing:
            public = {v: k for k, v in reversed(list(_HF_FIELDS.items()))}
            raise UserError(f"config is missing required field(s): {', '.join(public[m] for m in missing)}")
        if "attn_backend" in fields:
            fields["attn_backend"] = _BACKEND_ALIASES.get(fields["attn_backend"], fields["attn_backend"])
        config = cls(**fields)
        config.validate()
        return config


# ----------------------------------------------------------------------------------------------
# The model


class DiT(nn.Module):
    """Tokens or probabilities + noise level sigma -> fp32 logits [B, L, V]."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        config.validate()
        if config.attn_backend == "flash" and not flash_attn_available():
            raise UserError(
                "model.attn_backend=flash needs flash-attn (pip install 'mdlm-dmmd[flash]'); "
                "use model.attn_backend=auto or sdpa"
            )
        self.config = config
        D, C, V = config.hidden_dim, config.cond_dim, config.vocab_size
        # Registration order = upstream parameter order (public EMA `shadow_params` lists).
        self.vocab_embed = EmbeddingLayer(V, D)
        self.sigma_map = TimestepEmbedder(C)
        self.rotary_emb = Rotary(config.head_dim)
        self.blocks = nn.ModuleList(
            DiTBlock(D, config.n_heads, C, dropout=config.dropout) for _ in range(config.n_blocks)
        )
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

    def draw_noise(
        self,
        batch: int,
        length: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor | None:
        """Generator noise [B, L, noise_features], or None when the model takes none.

        White: standard normal per token. Pyramid (`noise_grid`): standard normal on every level,
        each coarse cell copied to the tokens it covers (nearest upsampling), levels stacked
        along the features, tokens in raster order.
        """
        if self.noise_proj is None:
            return None
        if device is None:
            device = generator.device if generator is not None else self.vocab_embed.embedding.device
        dim = self.config.noise_dim
        if self.config.noise_grid is None:
            return torch.randn(batch, length, dim, generator=generator, device=device)
        h, w = self.config.noise_grid
        if h * w != length:
            raise ValueError(f"DiT: a noise pyramid over {h}x{w} tokens needs length {h * w}, got {length}")
        levels = [torch.randn(batch, dim, *size, generator=generator, device=device) for size in self.config.noise_levels]
        upsampled = [F.interpolate(level, size=(h, w), mode="nearest") for level in levels]
        return torch.cat(upsampled, dim=1).flatten(2).transpose(1, 2)  # [B, H·W, dim · levels]

    def _attention_backend(self, device: torch.device, has_mask: bool) -> str:
        backend = self.config.attn_backend
        if backend == "auto":
            use_flash = device.type == "cuda" and flash_attn_available() and not has_mask
            return "flash" if use_flash else "sdpa"
        if backend == "flash":
            if device.type != "cuda":
                raise UserError("model.attn_backend=flash runs on CUDA only; use model.attn_backend=auto or sdpa")
            # flash varlen takes no arbitrary mask; like BD3-LM, masked calls go through SDPA.
            return "sdpa" if has_mask else "flash"
        return backend

    def forward(
        self,
        x: Tensor,
        sigma: Tensor,
        noise: Tensor | None = None,
        *,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """Logits for every position.

        x: token ids [B, L] (int) or probabilities [B, L, V] (float).
        sigma: noise level [B] (a scalar is broadcast), as the algo defines it.
        noise: [B, L, noise_features], required iff config.noise_dim > 0 (see `draw_noise`).
        attn_mask: optional bool [L, L], True = may attend; combined with `causal`. A hook for
            block diffusion; None means full (or causal) attention.
        Returns float32 logits [B, L, V], computed in the parameters' dtype.
        """
        B, L = x.shape[:2]
        V = self.config.vocab_size
        if x.dtype.is_floating_point and (x.ndim != 3 or x.shape[-1] != V):
            raise ValueError(f"DiT: soft input must be probabilities [B, L, {V}], got shape {tuple(x.shape)}")
        if not x.dtype.is_floating_point and x.ndim != 2:
            raise ValueError(f"DiT: token input must be ids [B, L], got shape {tuple(x.shape)}")
        if sigma.numel() == 1:
            sigma = sigma.reshape(1).expand(B)
        if sigma.numel() != B:
            raise ValueError(f"DiT: sigma must have shape [B] = [{B}], got {tuple(sigma.shape)}")
        sigma = sigma.reshape(B)

        # 1. embed tokens (or their expectation under probs), plus the generator noise input
        h = self.vocab_embed(x)  # [B, L, D]
        if self.noise_proj is not None:
            if noise is None:
                raise ValueError(
                    f"DiT has a noise input (noise_dim={self.config.noise_dim}) but got noise=None; "
                    "a noise-conditioned generator must be given noise, e.g. model.draw_noise(B, L)"
                )
            if noise.shape != (B, L, self.config.noise_features):
                raise ValueError(
                    f"DiT: noise must have shape {(B, L, self.config.noise_features)}, got {tuple(noise.shape)}"
                )
            h = h + self.noise_proj(noise.to(h.dtype))  # [B, L, D]
        elif noise is not None:
            raise ValueError("DiT got noise but has no noise input (model.noise_dim=0)")

        # 2. time conditioning and positions
        c = F.silu(self.sigma_map(sigma))  # [B, C]
        rotary = self.rotary_emb(L, h.device)  # 2 x [L, hd]

        # 3. attention backend, fixed for all blocks of this call
        causal = self.config.causal
        backend = self._attention_backend(h.device, attn_mask is not None)
        if backend == "sdpa":
            attend = functools.partial(sdpa_attention, causal=causal, attn_mask=attn_mask)
        elif backend == "flash":
            attend = functools.partial(flash_attention, causal=causal)
        else:
            if h.device.type == "cpu" and h.requires_grad:
                raise UserError("model.attn_backend=flex cannot train on CPU (torch's flex attention has no "
                                "CPU backward); use model.attn_backend=auto or sdpa")
            block_mask = flex_block_mask(L, causal=causal, attn_mask=attn_mask, device=h.device)
            attend = functools.partial(flex_attention, block_mask=block_mask)

        # 4. blocks and output head
        for block in self.blocks:
            h = block(h, c, rotary, attend)
        return self.output_layer(h, c).float()  # [B, L, V]
