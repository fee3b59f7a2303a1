"""The public BD3-LM DiT (kuleshov-group/bd3lms, `cross_attn=True`) reproduced by our DiT with
`positions`, `attn_mask` and `kv_cache`: training on [x_t, x_0], sampling without and with a KV cache.

Fixture: tests/fixtures/bd3lm-dit/ (copied from shared/fixtures/bd3lm-dit/; the meta json says how
it was made, with which commit, and what each tensor is). BD3-LM's own forward slices the x_t half
of the training output and keeps its KV cache inside the blocks; here the caller slices, and the
cache is a `KVCache` committed after each finished block (BD3-LM's `store_kv=True`).
"""

import pytest
import torch
from safetensors.torch import load_file

from mdlm_dmmd.models.dit import DiT, DiTConfig
from mdlm_dmmd.models.kv_cache import KVCache

from conftest import fixture_path

FIXTURE = fixture_path("bd3lm-dit")
L, BLOCK = 16, 4
TOL = 1e-5


@pytest.fixture(scope="module")
def io():
    return load_file(str(FIXTURE / "bd3lm_tiny_io.safetensors"))


def model(backend: str) -> DiT:
    config = DiTConfig(vocab_size=101, length=L, hidden_dim=64, cond_dim=32, n_blocks=2, n_heads=4, dropout=0.0,
                       attn_backend=backend)
    network = DiT(config).eval()
    network.load_state_dict(load_file(str(FIXTURE / "bd3lm_tiny_state_dict.safetensors")), strict=True)
    return network


def training_mask(length: int, block: int) -> torch.Tensor:
    """bool [2L, 2L] over [x_t, x_0], enumerated from the rules in the fixture's meta json."""
    mask = torch.zeros(2 * length, 2 * length, dtype=torch.bool)
    for i in range(2 * length):
        for j in range(2 * length):
            bi, bj = (i % length) // block, (j % length) // block
            clean_i, clean_j = i >= length, j >= length
            if not clean_i and not clean_j:
                mask[i, j] = bi == bj  # x_t -> x_t: its own block, bidirectional
            elif not clean_i:
                mask[i, j] = bj < bi  # x_t -> x_0: strictly earlier clean blocks
            else:
                mask[i, j] = clean_j and bj <= bi  # x_0 -> x_0: block-causal; never x_t
    return mask


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_training_masks_match_the_public_mask_function(io):
    assert torch.equal(training_mask(16, 4), io["mask_L16_b4"])
    assert torch.equal(training_mask(8, 2), io["mask_L8_b2"])
    assert torch.equal(io["mask_L16_b4"][L:L + 12, L:L + 12], io["sample_mask_S12"])


@pytest.mark.parametrize("backend", ["sdpa", "flex", "auto"])
@pytest.mark.parametrize("sigma_key, logits_key", [("train_sigma", "train_logits"), (None, "train_logits_sigma0")])
def test_training_forward_on_xt_x0(io, backend, sigma_key, logits_key):
    """[x_t, x_0] (2L tokens), positions 0..L-1 for each half, the block-diffusion mask; the
    caller keeps the x_t half."""
    sigma = io[sigma_key] if sigma_key else torch.zeros(3)
    assert torch.equal(io["train_x"], torch.cat([io["train_xt"], io["train_x0"]], dim=1))
    with torch.no_grad():
        out = model(backend)(io["train_x"], sigma, attn_mask=training_mask(L, BLOCK), positions=torch.arange(L).repeat(2))
    assert out.shape == (3, 2 * L, 101)
    assert max_err(out[:, :L], io[logits_key]) <= TOL


def test_training_forward_with_sigma_per_position(io):
    """The same call with σ given per position ([B, 2L], every entry the sequence's σ)."""
    sigma = io["train_sigma"][:, None].expand(3, 2 * L)
    with torch.no_grad():
        out = model("sdpa")(io["train_x"], sigma, attn_mask=training_mask(L, BLOCK), positions=torch.arange(L).repeat(2))
    assert max_err(out[:, :L], io["train_logits"]) <= TOL


@pytest.mark.parametrize("backend", ["sdpa", "flex", "auto"])
def test_sampling_forward_without_cache(io, backend):
    """Two clean blocks and a noisy one, block-causal mask, positions 0..11."""
    with torch.no_grad():
        out = model(backend)(io["sample_x"], io["sample_sigma"], attn_mask=io["sample_mask_S12"])
    assert max_err(out, io["sample_logits_nocache"]) <= TOL


@pytest.mark.parametrize("backend", ["sdpa", "flex", "auto"])
def test_sampling_block_by_block_through_the_kv_cache(io, backend):
    """BD3-LM's calls: block 0 and block 1 stored (store_kv=True), then the noisy block 2 (not)."""
    network, cache = model(backend), KVCache()
    x, sigma = io["sample_x"], io["sample_sigma"]
    with torch.no_grad():
        for index, key in enumerate(["sample_logits_kvcache_block0", "sample_logits_kvcache_block1"]):
            out = network(x[:, index * BLOCK:(index + 1) * BLOCK], sigma, kv_cache=cache)
            cache.commit()
            assert max_err(out, io[key]) <= TOL
        out = network(x[:, 2 * BLOCK:3 * BLOCK], sigma, kv_cache=cache)
    assert cache.length == 2 * BLOCK
    assert max_err(out, io["sample_logits_kvcache"]) <= TOL
    assert max_err(out, io["sample_logits_nocache"][:, 2 * BLOCK:]) <= TOL
