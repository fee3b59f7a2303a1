"""DiT inputs for block diffusion: rotary positions, sigma per position, a KV cache of finished
blocks, input lengths other than config.length, and soft inputs on each of these paths.

Expected values come from the plain forward pass (same model, full sequence, explicit mask), never
from the path under test."""

import pytest
import torch
import torch.nn.functional as F

from mdlm_dmmd.models.dit import DiT, DiTConfig
from mdlm_dmmd.models.kv_cache import KVCache

from conftest import random_model

B, L, K = 2, 12, 4  # batch, length, block size


def tiny_config(**overrides) -> DiTConfig:
    fields = dict(vocab_size=13, length=L, hidden_dim=32, cond_dim=16, n_blocks=2, n_heads=4, dropout=0.0)
    fields.update(overrides)
    return DiTConfig(**fields)


def tokens(length: int = L, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 13, (B, length), generator=torch.Generator().manual_seed(seed))


def block_causal(length: int, block: int) -> torch.Tensor:
    """bool [L, L]: query i may attend key j iff block(j) <= block(i), enumerated."""
    return torch.tensor([[j // block <= i // block for j in range(length)] for i in range(length)])


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Positions


def test_default_positions_equal_explicit_arange():
    model = random_model(tiny_config())
    x, sigma = tokens(), torch.tensor([0.2, 2.0])
    with torch.no_grad():
        plain = model(x, sigma)
        assert torch.equal(model(x, sigma, positions=torch.arange(L)), plain)
        assert torch.equal(model(x, sigma, positions=torch.arange(L).expand(B, L)), plain)  # [B, S]


def test_positions_enter_only_through_differences():
    """Rotary is relative: shifting every position by a constant leaves the logits unchanged (up
    to rounding), while reordering positions changes them."""
    model = random_model(tiny_config())
    x, sigma = tokens(), torch.tensor([0.2, 2.0])
    with torch.no_grad():
        plain = model(x, sigma)
        close(model(x, sigma, positions=torch.arange(L) + 7), plain)
        assert not torch.allclose(model(x, sigma, positions=torch.arange(L).flip(0)), plain, atol=1e-3)


def test_positions_per_sequence():
    model = random_model(tiny_config())
    x, sigma = tokens(), torch.tensor([0.2, 2.0])
    positions = torch.stack([torch.arange(L), torch.arange(L).flip(0)])  # [B, S]
    with torch.no_grad():
        both = model(x, sigma, positions=positions)
        for b in range(B):
            close(both[b], model(x[b:b + 1], sigma[b:b + 1], positions=positions[b])[0])


def test_input_length_may_differ_from_config_length():
    """BD3-LM feeds [x_t, x_0] (2L tokens), with positions 0..L-1 repeated for each half."""
    model = random_model(tiny_config())
    x = tokens(2 * L)
    with torch.no_grad():
        out = model(x, torch.zeros(B), positions=torch.arange(L).repeat(2))
        assert out.shape == (B, 2 * L, 13)
        # two equal halves at equal positions: each token of one half has a twin in the other,
        # with the same query over the same keys, so the same logits
        same = model(torch.cat([x[:, :L], x[:, :L]], 1), torch.zeros(B), positions=torch.arange(L).repeat(2))
        close(same[:, :L], same[:, L:])


def test_bad_positions_and_mask_raise():
    model = random_model(tiny_config())
    with pytest.raises(ValueError, match="positions must be ints"):
        model(tokens(), torch.zeros(B), positions=torch.arange(L).float())
    with pytest.raises(ValueError, match="positions must be ints"):
        model(tokens(), torch.zeros(B), positions=torch.arange(L + 1))
    with pytest.raises(ValueError, match=r"attn_mask must be bool \[S, T \+ S\] = \[12, 12\]"):
        model(tokens(), torch.zeros(B), attn_mask=torch.ones(L, L + 1, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# Time conditioning per position


def test_sigma_per_position_with_equal_entries_equals_sigma_per_sequence():
    model = random_model(tiny_config())
    x, sigma = tokens(), torch.tensor([0.2, 2.0])
    with torch.no_grad():
        close(model(x, sigma[:, None].expand(B, L)), model(x, sigma))
        close(model(x, sigma[:, None]), model(x, sigma))  # [B, 1]: one segment
        close(model(x, sigma[None]), model(x, sigma))  # [1, B]: one per sequence, as before segments


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_sigma_per_position_conditions_each_position(backend):
    """With attention restricted to itself, position i depends only on its own sigma: each
    position of a [B, S] call equals the [B] call with that position's sigma."""
    model = random_model(tiny_config(attn_backend=backend))
    x = tokens()
    sigma = torch.rand(B, L, generator=torch.Generator().manual_seed(4)) * 3  # [B, S]
    own = torch.eye(L, dtype=torch.bool)
    with torch.no_grad():
        out = model(x, sigma, attn_mask=own)
        for i in range(L):
            close(out[:, i], model(x, sigma[:, i], attn_mask=own)[:, i])


def test_sigma_per_position_in_a_causal_model():
    """Causal: positions before j never see sigma at j or later."""
    model = random_model(tiny_config(causal=True))
    x, j = tokens(), 5
    sigma = torch.cat([torch.full((B, j), 0.5), torch.full((B, L - j), 3.0)], dim=1)
    with torch.no_grad():
        mixed = model(x, sigma)
        close(mixed[:, :j], model(x, torch.full((B,), 0.5))[:, :j])
        assert not torch.allclose(mixed[:, j:], model(x, torch.full((B,), 0.5))[:, j:])


def test_bad_sigma_shape_raises():
    model = random_model(tiny_config())
    for bad in (torch.zeros(B, L + 1), torch.zeros(B, 5), torch.zeros(B, 0), torch.zeros(B + 1, L), torch.zeros(B, 2, 6)):
        with pytest.raises(ValueError, match=r"sigma must have shape \[B\] = \[2\], \[B, S\] = \[2, 12\] or "
                                             r"\[B, G\] with G dividing S"):
            model(tokens(), bad)


@pytest.mark.parametrize("path", ["full", "logits_at", "checkpointed", "kv_cache"])
def test_sigma_per_segment_equals_the_sigma_per_position_it_spells_out(path):
    """σ [B, G] with G dividing S (a block model's σ per block: the adaLN runs per segment, and
    no [B, S, D] copy of its output is made) gives the logits of the [B, S] σ that repeats each
    entry S/G times, on every path of the forward, and the gradient reaching each entry is the
    sum over its segment."""
    model = random_model(tiny_config())
    x = tokens()
    per_block = torch.tensor([[0.4, 1.5, 0.0], [2.5, 0.1, 3.0]])  # [B, G = 3]: segments of K = 4
    spelled = per_block.repeat_interleave(K, dim=1)  # [B, S]
    if path == "kv_cache":  # one segment per cached call, and two blocks of the same call
        with torch.no_grad():
            cache = KVCache()
            first = model(x[:, :2 * K], per_block[:, :2], kv_cache=cache)
            cache.commit()
            last = model(x[:, 2 * K:], per_block[:, 2], kv_cache=cache)
            two_calls = torch.ones(L, L, dtype=torch.bool)
            two_calls[: 2 * K, 2 * K:] = False  # the first call never sees the last block
            close(torch.cat([first, last], dim=1), model(x, spelled, attn_mask=two_calls))
        return
    mask = block_causal(L, K)
    if path == "logits_at":
        where = torch.rand(B, L, generator=torch.Generator().manual_seed(3)) < 0.5
        with torch.no_grad():
            close(model(x, per_block, attn_mask=mask, logits_at=where), model(x, spelled, attn_mask=mask)[where])
        return
    model.activation_checkpointing = path == "checkpointed"
    per_block.requires_grad_(True)
    out = model(x, per_block, attn_mask=mask)
    out.square().mean().backward()
    reference = spelled.detach().requires_grad_(True)
    expected = model(x, reference, attn_mask=mask)
    expected.square().mean().backward()
    close(out, expected)
    close(per_block.grad, reference.grad.view(B, 3, K).sum(-1))


# ---------------------------------------------------------------------------------------------
# KV cache


def blockwise(model: DiT, x, sigma, noise=None) -> torch.Tensor:
    """Forward block by block through a KV cache, committing each block; logits [B, L, V]."""
    cache, outs = KVCache(), []
    for start in range(0, x.shape[1], K):
        part = slice(start, start + K)
        sig = sigma[:, part] if sigma.ndim == 2 else sigma
        outs.append(model(x[:, part], sig, None if noise is None else noise[:, part], kv_cache=cache))
        cache.commit()
        assert cache.length == start + K
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("per_position_sigma", [False, True])
def test_kv_cache_blockwise_equals_one_forward_with_block_causal_mask(backend, per_position_sigma):
    model = random_model(tiny_config(attn_backend=backend))
    x = tokens()
    g = torch.Generator().manual_seed(2)
    sigma = torch.rand(B, L, generator=g) if per_position_sigma else torch.rand(B, generator=g)
    with torch.no_grad():
        close(blockwise(model, x, sigma), model(x, sigma, attn_mask=block_causal(L, K)))


def test_kv_cache_in_a_causal_model_equals_causal_forward():
    model = random_model(tiny_config(causal=True))
    x, sigma = tokens(), torch.tensor([0.3, 1.5])
    with torch.no_grad():
        close(blockwise(model, x, sigma), model(x, sigma))


def test_kv_cache_with_noise_input():
    model = random_model(tiny_config(noise_dim=3))
    x, sigma = tokens(), torch.tensor([0.3, 1.5])
    noise = model.draw_noise(B, L, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        close(blockwise(model, x, sigma, noise), model(x, sigma, noise, attn_mask=block_causal(L, K)))


def test_kv_cache_uncommitted_calls_leave_the_cache_unchanged():
    """Denoising steps on a noisy block read the cache; only `commit` after the clean block keeps
    keys/values, so the noisy calls leave no trace."""
    model = random_model(tiny_config())
    x, sigma = tokens(), torch.tensor([0.3, 1.5])
    noisy = tokens(seed=9)
    with torch.no_grad():
        cache = KVCache()
        model(x[:, :K], sigma, kv_cache=cache)
        cache.commit()
        for step in range(3):  # noisy steps on block 1, never committed
            model(noisy[:, K:2 * K], sigma + step, kv_cache=cache)
        assert cache.length == K
        model(x[:, K:2 * K], sigma, kv_cache=cache)
        cache.commit()
        last = model(x[:, 2 * K:], sigma, kv_cache=cache)
    close(last, model(x, sigma, attn_mask=block_causal(L, K))[:, 2 * K:])


def test_kv_cache_with_mask_and_explicit_positions():
    """A call over (cache, input) with its own mask [S, T + S] and positions equals the
    corresponding rows of one forward pass."""
    model = random_model(tiny_config())
    x, sigma = tokens(), torch.tensor([0.3, 1.5])
    mask = block_causal(L, K)
    mask[K:, K:] = torch.ones(L - K, L - K, dtype=torch.bool).tril()  # causal after the first block
    with torch.no_grad():
        full = model(x, sigma, attn_mask=mask)
        cache = KVCache()
        model(x[:, :K], sigma, kv_cache=cache)
        cache.commit()
        rest = model(x[:, K:], sigma, attn_mask=mask[K:], positions=torch.arange(K, L), kv_cache=cache)
    close(rest, full[:, K:])


def test_drop_first_twice_counts_every_dropped_token():
    """`dropped` accumulates, so `end` (where the next call's positions start) stays the number
    of tokens committed in all; dropping every cached token is allowed (context = one block)."""
    model, cache = random_model(tiny_config()), KVCache()
    with torch.no_grad():
        for start in range(0, 3 * K, K):
            model(tokens()[:, start:start + K], torch.zeros(B), kv_cache=cache)
            cache.commit()
    cache.drop_first(K)
    cache.drop_first(K)
    assert (cache.dropped, cache.length, cache.end) == (2 * K, K, 3 * K)
    cache.drop_first(K)
    assert (cache.length, cache.end) == (0, 3 * K)


def test_a_commit_is_used_up():
    model, cache = random_model(tiny_config()), KVCache()
    with torch.no_grad():
        model(tokens()[:, :K], torch.zeros(B), kv_cache=cache)
    cache.commit()
    with pytest.raises(ValueError, match="no complete forward call"):
        cache.commit()  # not the same block appended twice
    assert cache.length == K


def test_checkpointed_training_through_a_kv_cache():
    """Activation checkpointing is off where a cache is fed (it would replay the cache's layer
    order): the gradient through a cached call is the one without checkpointing."""
    model, x = random_model(tiny_config()), tokens(2 * K)
    grads = []
    for recompute in (False, True):
        model.zero_grad()
        model.activation_checkpointing = recompute
        cache = KVCache()
        with torch.no_grad():
            model(x[:, :K], torch.zeros(B), kv_cache=cache)
            cache.commit()
        model(x[:, K:], torch.zeros(B), kv_cache=cache).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_kv_cache_errors():
    model = random_model(tiny_config())
    with pytest.raises(ValueError, match="no complete forward call"):
        KVCache().commit()
    cache = KVCache()
    with torch.no_grad():
        model(tokens()[:, :K], torch.zeros(B), kv_cache=cache)
        cache.commit()
        with pytest.raises(ValueError, match="do not fit cached keys"):
            model(tokens()[:1, :K], torch.zeros(1), kv_cache=cache)
        with pytest.raises(ValueError, match=r"attn_mask must be bool \[S, T \+ S\] = \[4, 8\]"):
            model(tokens()[:, :K], torch.zeros(B), attn_mask=torch.ones(K, K, dtype=torch.bool), kv_cache=cache)


# ---------------------------------------------------------------------------------------------
# Soft inputs on every path


def soft(x: torch.Tensor) -> torch.Tensor:
    return F.one_hot(x, 13).float()  # [B, S, V]


@pytest.mark.parametrize("path", ["mask", "positions", "sigma_per_position", "length_2L", "flex"])
def test_one_hot_soft_input_equals_ids(path):
    model = random_model(tiny_config(attn_backend="flex" if path == "flex" else "auto"))
    x, sigma, kwargs = tokens(), torch.tensor([0.3, 1.5]), {}
    if path in ("mask", "flex"):
        kwargs["attn_mask"] = block_causal(L, K)
    elif path == "positions":
        kwargs["positions"] = torch.arange(L).flip(0)
    elif path == "sigma_per_position":
        sigma = torch.rand(B, L, generator=torch.Generator().manual_seed(3))
    else:
        x, kwargs["positions"] = tokens(2 * L), torch.arange(L).repeat(2)
    with torch.no_grad():
        assert torch.equal(model(soft(x), sigma, **kwargs), model(x, sigma, **kwargs))


def test_one_hot_soft_input_equals_ids_through_the_kv_cache():
    model = random_model(tiny_config())
    x, sigma = tokens(), torch.tensor([0.3, 1.5])
    with torch.no_grad():
        assert torch.equal(blockwise(model, soft(x), sigma), blockwise(model, x, sigma))


def test_soft_input_through_the_kv_cache_is_differentiable():
    model = random_model(tiny_config())
    x, sigma = tokens(), torch.tensor([0.3, 1.5])
    cache = KVCache()
    with torch.no_grad():
        model(x[:, :K], sigma, kv_cache=cache)
        cache.commit()
    logits = torch.randn(B, K, 13, requires_grad=True)
    model(logits.softmax(-1), sigma, kv_cache=cache).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_a_cache_only_pass_stores_what_a_full_pass_stores():
    """logits=False (committing a finished block) stops at the last block's keys and values: the
    cache equals the one a full forward leaves, and the next block's logits are unchanged."""
    model = random_model(tiny_config())
    x, sigma = tokens(), torch.zeros(B)
    full, cache_only = KVCache(), KVCache()
    with torch.no_grad():
        assert model(x[:, :K], sigma, kv_cache=full) is not None
        assert model(x[:, :K], sigma, kv_cache=cache_only, logits=False) is None
        full.commit()
        cache_only.commit()
        for layer in range(2):
            assert torch.equal(full._keys[layer], cache_only._keys[layer])
            assert torch.equal(full._values[layer], cache_only._values[layer])
        after_full = model(x[:, K:2 * K], sigma, kv_cache=full)
        after_cache_only = model(x[:, K:2 * K], sigma, kv_cache=cache_only)
    assert torch.equal(after_full, after_cache_only)
    with pytest.raises(ValueError, match="logits=False only fills a KV cache"):
        model(x, sigma, logits=False)
