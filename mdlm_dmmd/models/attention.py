"""Attention as one function of (q, k, v, mask), with the backends behind it.

`attention` computes softmax(q kᵀ / √hd) v with no attention dropout (as upstream MDLM/BD3-LM),
for queries [B, Sq, H, hd] over keys and values [B, Sk, H, hd]. Sk may exceed Sq: with a KV cache
the queries are the *last* Sq of the Sk positions (earlier ones are cached tokens), and `causal`
is aligned to that end (query i sees keys 0 .. Sk − Sq + i).

Backends, same numbers up to kernel summation order:
- `sdpa`: torch's fused scaled-dot-product attention; the default on CPU and for explicit masks.
- `flash`: flash-attn's varlen kernel (the call MDLM makes), CUDA only, optional extra `[flash]`,
  imported only when used. It takes no mask, so it runs only for unmasked calls with Sq = Sk;
  `resolve_backend` sends every other call to SDPA (as BD3-LM does).
- `flex`: torch's flex attention with a `BlockMask` (`flex_block_mask`), compiled on CUDA.

The DiT picks the backend once per forward pass (`resolve_backend`) and, for flex, builds the
BlockMask once (`flex_block_mask`) and hands it to every layer as the `mask`.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mdlm_dmmd.errors import UserError

ATTN_BACKENDS = ("auto", "sdpa", "flash", "flex")


@functools.cache
def flash_attn_available() -> bool:
    """Whether the optional `flash-attn` package imports (extra `[flash]`)."""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(requested: str, device: torch.device, *, has_mask: bool, same_length: bool) -> str:
    """The backend that runs a call: `auto` → flash on CUDA when installed, else sdpa.

    flash takes no mask and no cached keys (Sq ≠ Sk), so such calls fall back to SDPA for `auto`
    and `flash` alike.
    """
    flash_fits = not has_mask and same_length
    if requested == "auto":
        return "flash" if device.type == "cuda" and flash_attn_available() and flash_fits else "sdpa"
    if requested == "flash":
        if device.type != "cuda":
            raise UserError("model.attn_backend=flash runs on CUDA only; use model.attn_backend=auto or sdpa")
        return "flash" if flash_fits else "sdpa"
    return requested


def attention(q: Tensor, k: Tensor, v: Tensor, mask=None, *, causal: bool = False, backend: str = "sdpa") -> Tensor:
    """softmax(q kᵀ / √hd) v: q [B, Sq, H, hd], k, v [B, Sk, H, hd] (Sk ≥ Sq) -> [B, Sq, H, hd].

    mask: None (full or causal attention), a bool [Sq, Sk] (True = may attend; combined with
        `causal`), or for `backend="flex"` a BlockMask from `flex_block_mask`, which already
        holds causality (then `causal` must be False).
    causal: query i attends keys j <= Sk − Sq + i (queries are the last Sq positions).
    backend: `sdpa`, `flash` or `flex`, as chosen by `resolve_backend`.
    """
    if backend == "sdpa":
        return _sdpa(q, k, v, mask, causal)
    if backend == "flash":
        if mask is not None or q.shape[1] != k.shape[1]:
            raise ValueError("flash attention takes no mask and needs as many keys as queries; use sdpa")
        return _flash(q, k, v, causal)
    if backend == "flex":
        if isinstance(mask, Tensor) or (mask is None and causal):
            mask = flex_block_mask(q.shape[1], k.shape[1], causal=causal, attn_mask=mask, device=q.device)
        elif causal:
            raise ValueError("attention: a flex BlockMask already holds causality; pass causal=False")
        return _flex(q, k, v, mask)
    raise ValueError(f"unknown attention backend {backend!r}; expected sdpa, flash or flex")


def causal_mask(q_len: int, kv_len: int, device: torch.device) -> Tensor:
    """bool [Sq, Sk]: query i may attend key j iff j <= kv_len − q_len + i."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)


# ----------------------------------------------------------------------------------------------
# Backends


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # 3 x [B, H, S, hd]
    Sq, Sk = q.shape[2], k.shape[2]
    if causal and (mask is not None or Sq != Sk):
        # SDPA refuses attn_mask together with is_causal, and aligns is_causal to the first key
        # rather than the last; fold causality into the mask instead.
        tri = causal_mask(Sq, Sk, q.device)
        mask = tri if mask is None else mask & tri
        causal = False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    return out.transpose(1, 2)  # [B, Sq, H, hd]


def _flash(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """flash-attn varlen kernel on uniform-length sequences, the call MDLM makes (§3.5).

    flash-attn only takes fp16/bf16, so fp32 inputs run in bf16 and come back as fp32; results
    then agree with `sdpa` to bf16 precision, not to fp32.
    """
    from flash_attn.flash_attn_interface import flash_attn_varlen_func

    B, S, H, hd = q.shape
    dtype = q.dtype
    low = dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    q, k, v = (t.reshape(B * S, H, hd).to(low) for t in (q, k, v))  # 3 x [(B S), H, hd]
    cu_seqlens = torch.arange(0, (B + 1) * S, S, dtype=torch.int32, device=q.device)
    out = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, S, S, 0.0, causal=causal)
    return out.reshape(B, S, H, hd).to(dtype)  # [B, S, H, hd]


@functools.cache
def _compiled_flex_attention() -> Callable:
    # Uncompiled flex attention materialises the full score matrix; on CUDA it is only worth
    # using compiled (BD3-LM does the same). On CPU we run it eagerly: slower, same numbers.
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_block_mask(q_len: int, kv_len: int, *, causal: bool, attn_mask: Tensor | None, device: torch.device):
    """A flex `BlockMask` for causal and/or a bool mask [Sq, Sk]; None = full attention.

    Causality is aligned to the last key, as in `attention`. Build it once per forward pass and
    share it by every layer.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    if not causal and attn_mask is None:
        return None
    offset = kv_len - q_len

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = q_idx + offset >= kv_idx if causal else q_idx >= 0
        if attn_mask is not None:
            allowed = allowed & attn_mask[q_idx, kv_idx]
        return allowed

    return create_block_mask(mask_mod, None, None, q_len, kv_len, device=device)


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention as eager_flex

    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # 3 x [B, H, S, hd]
    if q.is_cuda:
        out = _compiled_flex_attention()(q, k, v, block_mask=block_mask)
    else:
        with warnings.catch_warnings():
            # Eager on CPU is deliberate (see `_compiled_flex_attention`); silence torch's advice.
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = eager_flex(q, k, v, block_mask=block_mask)
    return out.transpose(1, 2)  # [B, Sq, H, hd]
