"""attention(q, k, v, mask): every backend vs softmax(Q K^T / sqrt(d)) V written out, with and
without a mask, causal, and with more keys than queries (a KV cache); backend choice."""

import math

import pytest
import torch

from mdlm_dmmd.errors import UserError
from mdlm_dmmd.models.attention import attention, causal_mask, flex_block_mask, resolve_backend


def plain_attention(q, k, v, causal: bool, mask: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Sq, H, hd], k, v [B, Sk, H, hd] -> [B, Sq, H, hd]; queries are the last Sq positions."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    Sq, Sk = q.shape[1], k.shape[1]
    allowed = torch.ones(Sq, Sk, dtype=torch.bool)
    if causal:
        for i in range(Sq):
            allowed[i, Sk - Sq + i + 1:] = False
    if mask is not None:
        allowed = allowed & mask
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def random_mask(Sq: int, Sk: int) -> torch.Tensor:
    mask = torch.rand(Sq, Sk, generator=torch.Generator().manual_seed(3)) > 0.5
    mask[:, -1] = True  # every query keeps at least one key, also when causal
    mask[torch.arange(Sq), torch.arange(Sk - Sq, Sk)] = True
    return mask


def qkv(Sq: int, Sk: int):
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, Sq, 4, 8, generator=g), torch.randn(2, Sk, 4, 8, generator=g), torch.randn(2, Sk, 4, 8, generator=g)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("backend", ["sdpa", "flex", "flex-blockmask"])
@pytest.mark.parametrize("Sq, Sk", [(12, 12), (5, 12)])
def test_attention_backends_match_plain_softmax(causal, with_mask, backend, Sq, Sk):
    q, k, v = qkv(Sq, Sk)
    mask = random_mask(Sq, Sk) if with_mask else None
    if backend == "flex-blockmask":  # what the DiT does: one BlockMask, causality inside it
        block_mask = flex_block_mask(Sq, Sk, causal=causal, attn_mask=mask, device=q.device)
        out = attention(q, k, v, block_mask, backend="flex")
    else:
        out = attention(q, k, v, mask, causal=causal, backend=backend)
    torch.testing.assert_close(out, plain_attention(q, k, v, causal, mask), atol=1e-5, rtol=1e-5)


def test_causal_mask_is_aligned_to_the_last_key():
    assert torch.equal(causal_mask(3, 3, torch.device("cpu")), torch.ones(3, 3, dtype=torch.bool).tril())
    assert causal_mask(2, 4, torch.device("cpu")).tolist() == [[True, True, True, False], [True, True, True, True]]


def test_flash_call_shape_is_checked_before_importing_flash_attn():
    q, k, v = qkv(5, 12)
    with pytest.raises(ValueError, match="flash attention takes no mask"):
        attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, backend="xformers")


def test_resolve_backend():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu, has_mask=False, same_length=True) == "sdpa"
    assert resolve_backend("flex", cpu, has_mask=True, same_length=False) == "flex"
    # flash takes neither a mask nor cached keys: such calls run on SDPA
    assert resolve_backend("flash", cuda, has_mask=True, same_length=True) == "sdpa"
    assert resolve_backend("flash", cuda, has_mask=False, same_length=False) == "sdpa"
    assert resolve_backend("auto", cuda, has_mask=True, same_length=True) == "sdpa"
    with pytest.raises(UserError, match="CUDA only"):
        resolve_backend("flash", cpu, has_mask=False, same_length=True)


def test_auto_picks_flash_only_for_unmasked_uncached_cuda_calls(monkeypatch):
    """With flash-attn installed (faked: this machine has neither it nor CUDA)."""
    from mdlm_dmmd.models import attention as module

    monkeypatch.setattr(module, "flash_attn_available", lambda: True)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cuda, has_mask=False, same_length=True) == "flash"
    assert resolve_backend("auto", cuda, has_mask=True, same_length=True) == "sdpa"
    assert resolve_backend("auto", cuda, has_mask=False, same_length=False) == "sdpa"
    assert resolve_backend("auto", cpu, has_mask=False, same_length=True) == "sdpa"


def test_compiled_flex_runs_the_block_diffusion_masks_as_sdpa_does():
    """The compiled flex path (used on CUDA) traced and compiled by inductor's CPU backend: the
    BD3-LM training mask over [x_t, x_0] and the block-causal sampling mask with a KV-cache
    offset, against the boolean-mask SDPA path (fp32 rounding: measured ≤ 1e-6)."""
    from mdlm_dmmd.diffusion import block
    from mdlm_dmmd.models.attention import _compiled_flex_attention

    length, size = 32, 8
    g = torch.Generator().manual_seed(0)
    training = block.training_mask(length, size, "cpu")  # [2L, 2L]
    cached = block.block_causal_mask(length, size, "cpu")[-size:]  # the last block's queries over every key
    for mask in (training, cached):
        Sq, Sk = mask.shape
        q, k, v = torch.randn(2, Sq, 2, 16, generator=g), torch.randn(2, Sk, 2, 16, generator=g), torch.randn(2, Sk, 2, 16, generator=g)
        block_mask = flex_block_mask(Sq, Sk, causal=False, attn_mask=mask, device=q.device)
        compiled = _compiled_flex_attention()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               block_mask=block_mask).transpose(1, 2)
        torch.testing.assert_close(compiled, attention(q, k, v, mask, backend="sdpa"), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(compiled, plain_attention(q, k, v, False, mask), atol=1e-5, rtol=1e-5)
