"""Block diffusion: masks against brute force and the public BD3-LM masks, positions, per-block
times; the block denoiser against the public BD3-LM forward (fixture), training vs sampling
layouts, and cached vs uncached sampling (same numbers, same tokens under one seed)."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mdlm_dmmd.denoiser import BlockDenoiser
from mdlm_dmmd.diffusion import block
from mdlm_dmmd.diffusion.block_sampling import BlockSampler, nfe, sample_blocks
from mdlm_dmmd.diffusion.masked import NEG_INF, MaskedProcess
from mdlm_dmmd.diffusion.schedules import LogLinear
from mdlm_dmmd.diffusion.uniform import UniformProcess
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.models.dit import DiT, DiTConfig

from conftest import fixture_path, random_model

FIXTURE = fixture_path("bd3lm-dit")


def brute_force_training_mask(length: int, size: int) -> torch.Tensor:
    """The rules of the issue, one (query, key) pair at a time."""
    mask = torch.zeros(2 * length, 2 * length, dtype=torch.bool)
    for q in range(2 * length):
        for k in range(2 * length):
            q_clean, k_clean = q >= length, k >= length
            bq, bk = (q % length) // size, (k % length) // size
            if not q_clean and not k_clean:
                mask[q, k] = bq == bk
            elif not q_clean and k_clean:
                mask[q, k] = bk < bq
            elif q_clean and k_clean:
                mask[q, k] = bk <= bq
    return mask


@pytest.mark.parametrize("length, size", [(8, 2), (16, 4), (12, 12), (6, 1)])
def test_training_mask_equals_brute_force(length, size):
    assert torch.equal(block.training_mask(length, size), brute_force_training_mask(length, size))


def test_masks_equal_the_public_bd3lm_masks():
    io = load_file(str(FIXTURE / "bd3lm_tiny_io.safetensors"))
    assert torch.equal(block.training_mask(8, 2), io["mask_L8_b2"])
    assert torch.equal(block.training_mask(16, 4), io["mask_L16_b4"])
    assert torch.equal(block.block_causal_mask(12, 4), io["sample_mask_S12"])


@pytest.mark.parametrize("size", [8, 12, 16])
def test_sampling_mask_is_the_clean_quadrant_of_the_training_mask(size):
    assert torch.equal(block.block_causal_mask(size, 4), block.training_mask(16, 4)[16:16 + size, 16:16 + size])


def test_positions_repeat_and_times_are_constant_inside_a_block():
    assert block.training_positions(4).tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    t = block.per_token(torch.tensor([[0.1, 0.7], [0.3, 0.9]]), 3)
    assert torch.equal(t, torch.tensor([[0.1] * 3 + [0.7] * 3, [0.3] * 3 + [0.9] * 3]))


@pytest.mark.parametrize("value", [0, -4, 5, 32, 2.0, True, "4"])
def test_bad_block_sizes_are_one_line_errors(value):
    with pytest.raises(UserError, match=r"^block_size must be a positive int that divides model.length \(16\), got "):
        block.check_block_size(value, 16)
    assert block.check_block_size(4, 16) == 4 and block.check_block_size(16, 16) == 16


# -- the denoiser against the public BD3-LM forward ---------------------------------------------
def fixture_denoiser() -> tuple[BlockDenoiser, dict]:
    io = load_file(str(FIXTURE / "bd3lm_tiny_io.safetensors"))
    network = DiT(DiTConfig(vocab_size=101, length=16, hidden_dim=64, cond_dim=32, n_blocks=2, n_heads=4,
                            dropout=0.0, attn_backend="sdpa")).eval()
    network.load_state_dict(load_file(str(FIXTURE / "bd3lm_tiny_state_dict.safetensors")))
    process = MaskedProcess(LogLinear(), mask_id=100)
    return BlockDenoiser(network, process, time_conditioning=False, block_size=4), io


def test_training_layout_reproduces_bd3lm_subs_log_probs():
    """[x_t, x_0] through BlockDenoiser (σ = 0: BD3-LM is not time-conditioned) then SUBS equals
    upstream's `_subs_parameterization` of its training forward. Upstream subtracts 1e6 from the
    mask logit where we set it to −1e6, so the mask column of masked rows differs by that logit
    (both ≈ −1e6); every other entry is compared."""
    denoiser, io = fixture_denoiser()
    with torch.no_grad():
        log_p = denoiser(io["train_xt"], torch.full((3,), 0.5), clean=io["train_x0"])
    expected = io["train_logprobs_subs"]
    masked = io["train_xt"] == 100
    keep = torch.ones_like(expected, dtype=torch.bool)
    keep[..., 100] = ~masked
    assert (log_p - expected)[keep].abs().max() <= 1e-5
    assert (log_p[..., 100][masked] < NEG_INF / 2).all() and (expected[..., 100][masked] < NEG_INF / 2).all()


def test_sampling_layouts_without_and_with_cache_equal_the_block_causal_forward():
    """Two clean blocks and a noisy one: as a prefix (block-causal mask over 12 tokens) and as a
    KV cache (two commits) the noisy block's log-probs equal the plain network call on the whole
    input with the public sampling mask. (The fixture's own sampling logits use one σ ≠ 0 for
    every token, which a BD3-LM checkpoint never sees; `tests/models/test_bd3lm_fixture.py`
    checks the network against them.)"""
    denoiser, io = fixture_denoiser()
    x = io["sample_x"]
    with torch.no_grad():
        uncached = denoiser.block_log_probs(x[:, 8:], torch.full((3,), 0.5), prefix=x[:, :8])
        cache = denoiser.new_cache()
        denoiser.commit(x[:, :4], cache)
        denoiser.commit(x[:, 4:8], cache)
        cached = denoiser.block_log_probs(x[:, 8:], torch.full((3,), 0.5), kv_cache=cache)
        plain = denoiser.network(x, torch.zeros(3), attn_mask=io["sample_mask_S12"])[:, 8:]
    reference = denoiser.process.log_probs(plain, x[:, 8:])
    assert (uncached - reference).abs().max() <= 1e-5 and (cached - reference).abs().max() <= 1e-5


# -- training vs sampling layouts, cache vs no cache, on a time-conditioned random model ---------
L, K, V = 16, 4, 11


def uniform_denoiser(noise_dim: int = 0, seed: int = 0) -> BlockDenoiser:
    network = random_model(DiTConfig(vocab_size=V, length=L, hidden_dim=32, cond_dim=16, n_blocks=2, n_heads=4,
                                     dropout=0.0, noise_dim=noise_dim), seed=seed)
    return BlockDenoiser(network, UniformProcess(LogLinear(), vocab_size=V), time_conditioning=True, block_size=K)


def masked_denoiser(seed: int = 0) -> BlockDenoiser:
    network = random_model(DiTConfig(vocab_size=V + 1, length=L, hidden_dim=32, cond_dim=16, n_blocks=2, n_heads=4,
                                     dropout=0.0), seed=seed)
    return BlockDenoiser(network, MaskedProcess(LogLinear(), mask_id=V), time_conditioning=True, block_size=K)


def saying(logits: torch.Tensor) -> BlockDenoiser:
    """A masked denoiser whose output head gives `logits` [V + 1] at every position, whatever the input."""
    denoiser = masked_denoiser()
    with torch.no_grad():
        denoiser.network.output_layer.linear.weight.zero_()
        denoiser.network.output_layer.linear.bias.copy_(logits)
    return denoiser


ALWAYS_2 = torch.where(torch.arange(V + 1) == 2, 50.0, 0.0)  # a degenerate model: every token 2


@pytest.mark.parametrize("time_conditioning", [True, False])
def test_noisy_tokens_are_conditioned_on_their_blocks_sigma_and_clean_ones_on_zero(time_conditioning):
    """The denoiser hands the network σ as levels (`sigma_at`); spelled out per token, σ(t_j)
    on block j of z_t and 0 on x_0 (0 everywhere without time conditioning), the network gives
    the same log-probs, in training and in uncached and cached sampling."""
    denoiser = uniform_denoiser()
    denoiser.time_conditioning = time_conditioning
    g = torch.Generator().manual_seed(5)
    x0 = torch.randint(0, V, (2, L), generator=g)
    t_blocks = torch.rand(2, L // K, generator=g)
    t = block.per_token(t_blocks, K)
    z = denoiser.process.corrupt(x0, t, generator=g)
    sigma = LogLinear().sigma(t) if time_conditioning else torch.zeros(2, L)
    with torch.no_grad():
        logits = denoiser.network(torch.cat([z, x0], dim=1), torch.cat([sigma, torch.zeros(2, L)], dim=1),
                                  attn_mask=block.training_mask(L, K, "cpu"), positions=block.training_positions(L, "cpu"))
        torch.testing.assert_close(denoiser(z, t, clean=x0), denoiser.to_log_probs(logits[:, :L], z), atol=1e-5, rtol=1e-5)
        j = 2  # block j after the clean blocks before it
        part = slice(j * K, (j + 1) * K)
        tokens = torch.cat([x0[:, : j * K], z[:, part]], dim=1)
        spelled = torch.cat([torch.zeros(2, j * K), sigma[:, part]], dim=1)
        logits = denoiser.network(tokens, spelled, attn_mask=block.block_causal_mask((j + 1) * K, K, "cpu"))[:, j * K:]
        expected = denoiser.to_log_probs(logits, z[:, part])
        torch.testing.assert_close(denoiser.block_log_probs(z[:, part], t_blocks[:, j], prefix=x0[:, : j * K]), expected,
                                   atol=1e-5, rtol=1e-5)
        cache = denoiser.new_cache()
        for i in range(j):
            denoiser.commit(x0[:, i * K: (i + 1) * K], cache)
        torch.testing.assert_close(denoiser.block_log_probs(z[:, part], t_blocks[:, j], kv_cache=cache), expected,
                                   atol=1e-5, rtol=1e-5)


def test_a_part_of_a_block_gets_sigma_per_token():
    """Not whole blocks (2 noisy tokens after 2 clean blocks, no caller of the package does this):
    σ falls back to per token, σ(t) on the noisy tokens and 0 on the prefix."""
    denoiser = uniform_denoiser()
    g = torch.Generator().manual_seed(6)
    prefix, z = torch.randint(0, V, (2, 2 * K), generator=g), torch.randint(0, V, (2, 2), generator=g)
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        sigma = torch.cat([torch.zeros(2, 2 * K), LogLinear().sigma(t)[:, None].expand(2, 2)], dim=1)
        logits = denoiser.network(torch.cat([prefix, z], dim=1), sigma,
                                  attn_mask=block.block_causal_mask(2 * K + 2, K, "cpu"))[:, 2 * K:]
        torch.testing.assert_close(denoiser.block_log_probs(z, t, prefix=prefix), denoiser.to_log_probs(logits, z),
                                   atol=1e-5, rtol=1e-5)


def test_training_on_block_j_equals_sampling_on_the_clean_prefix():
    """Block j of the [x_t, x_0] forward = the sampling forward on [x_0 blocks < j, x_t block j],
    with σ(t_j) on the noisy block and σ = 0 on clean tokens in both."""
    denoiser = uniform_denoiser()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, V, (2, L), generator=g)
    t_blocks = torch.rand(2, L // K, generator=g)
    z = denoiser.process.corrupt(x0, block.per_token(t_blocks, K), generator=g)
    with torch.no_grad():
        train = denoiser(z, block.per_token(t_blocks, K), clean=x0)
        for j in range(L // K):
            part = slice(j * K, (j + 1) * K)
            sample = denoiser.block_log_probs(z[:, part], t_blocks[:, j], prefix=x0[:, : j * K] if j else None)
            # Block 0 has no clean prefix, so its σ goes in as [B] and the time embedding runs on
            # one row per sequence instead of K: other matmul shapes, fp32 rounding (the issue's
            # bound where CPU kernels differ: 5e-6 of the largest value; measured 6e-7 of it).
            assert (train[:, part] - sample).abs().max() <= 5e-6 * sample.abs().max(), j


@pytest.mark.parametrize("make", [masked_denoiser, uniform_denoiser], ids=["masked", "uniform"])
def test_cached_and_uncached_sampling_give_the_same_tokens(make):
    denoiser = make()
    tokens = {}
    for cached in (True, False):
        sampler = BlockSampler(denoiser.process, K, kv_cache=cached)
        tokens[cached] = sampler(denoiser, steps=3, shape=(4, L), generator=torch.Generator().manual_seed(5))
    assert tokens[True].shape == (4, L)
    assert torch.equal(tokens[True], tokens[False])
    other = BlockSampler(denoiser.process, K)(denoiser, steps=3, shape=(4, L), generator=torch.Generator().manual_seed(6))
    assert not torch.equal(other, tokens[True])  # the seed matters: the test can fail


def test_the_cache_feeds_one_block_per_step(monkeypatch):
    denoiser = masked_denoiser()
    lengths = []
    forward = denoiser.network.forward
    monkeypatch.setattr(denoiser.network, "forward", lambda x, *a, **k: lengths.append(x.shape[1]) or forward(x, *a, **k))
    sample_blocks(denoiser, denoiser.process, block_size=K, steps=2, shape=(2, L), kv_cache=True,
                  generator=torch.Generator().manual_seed(0))
    assert lengths == [K] * (2 * 4 + 3)  # 2 steps per block + a commit after each block but the last
    lengths.clear()
    sample_blocks(denoiser, denoiser.process, block_size=K, steps=2, shape=(2, L), kv_cache=False,
                  generator=torch.Generator().manual_seed(0))
    assert lengths == [K, K, 2 * K, 2 * K, 3 * K, 3 * K, 4 * K, 4 * K]  # the prefix is re-read
    assert nfe(L, K, 2, True) == {"per_block": 2, "denoising": 8, "commit": 3, "total": 11}


@pytest.mark.parametrize("cached", [True, False])
def test_log_probs_at_some_positions_are_those_rows_of_the_full_block(cached):
    denoiser = masked_denoiser()
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, V, (3, 2 * K), generator=g)
    z = torch.where(torch.rand(3, K, generator=g) < 0.6, V, torch.randint(0, V, (3, K), generator=g))
    at = (z == V) & (torch.rand(3, K, generator=g) < 0.7)
    t = torch.tensor([0.9, 0.5, 0.3])
    with torch.no_grad():
        cache = None
        if cached:
            cache = denoiser.new_cache()
            for j in range(2):
                denoiser.commit(prefix[:, j * K:(j + 1) * K], cache)
        kwargs = dict(kv_cache=cache) if cached else dict(prefix=prefix)
        full = denoiser.block_log_probs(z, t, **kwargs)  # a cached call's keys stay pending: the next replaces them
        some = denoiser.block_log_probs(z, t, at=at, **kwargs)
    assert 0 < at.sum() < at.numel() and some.shape == (int(at.sum()), V + 1)
    torch.testing.assert_close(some, full[at], atol=1e-5, rtol=0)


def test_the_output_head_runs_at_the_revealed_tokens_only_and_a_step_revealing_none_calls_nothing(monkeypatch):
    """Masked process: per step, logits at exactly the tokens that step reveals; a block the
    prompt fills completely takes no network call."""
    denoiser = masked_denoiser()
    rows = []  # per call: logits rows, or "commit"
    forward = denoiser.network.forward

    def recording(x, *a, logits_at=None, **k):
        out = forward(x, *a, logits_at=logits_at, **k)
        rows.append("commit" if out is None else out.shape[0] if logits_at is not None else "all")
        return out

    monkeypatch.setattr(denoiser.network, "forward", recording)
    prompt = torch.randint(0, V, (2, K), generator=torch.Generator().manual_seed(1))
    out = sample_blocks(denoiser, denoiser.process, block_size=K, steps=3, shape=(2, L), prompt=prompt,
                        generator=torch.Generator().manual_seed(2))
    assert torch.equal(out[:, :K], prompt) and (out != V).all()
    assert rows[0] == "commit"  # the first block (all prompt) made no denoising call
    assert rows.count("commit") == L // K - 1 and "all" not in rows
    revealed = [n for n in rows if n != "commit"]
    assert sum(revealed) == 2 * (L - K) and min(revealed) >= 1  # each revealed token's logits computed once


def test_prompt_tokens_are_kept_across_blocks():
    denoiser = uniform_denoiser()
    prompt = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(1))
    out = BlockSampler(denoiser.process, K)(denoiser, steps=2, shape=(2, L), prompt=prompt,
                                            generator=torch.Generator().manual_seed(2))
    assert torch.equal(out[:, :6], prompt)


def test_noise_input_goes_to_noisy_tokens_only_and_cache_stays_exact():
    denoiser = uniform_denoiser(noise_dim=4)
    with torch.no_grad():
        denoiser.network.noise_proj.weight.normal_()  # a noise input that matters
    tokens = [BlockSampler(denoiser.process, K, kv_cache=cached)(denoiser, steps=2, shape=(3, L),
                                                                 generator=torch.Generator().manual_seed(3))
              for cached in (True, False)]
    assert torch.equal(tokens[0], tokens[1])


# -- BD3-LM's sampler options ---------------------------------------------------------------------
def test_first_hitting_reveals_one_token_per_step_and_the_cache_stays_exact(monkeypatch):
    denoiser = masked_denoiser()
    calls = []
    block_log_probs = denoiser.block_log_probs

    def recording(z, t, **kw):
        calls.append((int(denoiser.process.denoising_positions(z).sum(1).max()), t.clone()))
        return block_log_probs(z, t, **kw)

    monkeypatch.setattr(denoiser, "block_log_probs", recording)
    out = {cached: BlockSampler(denoiser.process, K, kv_cache=cached)(
        denoiser, steps=99, shape=(3, L), first_hitting=True, generator=torch.Generator().manual_seed(4))
        for cached in (True, False)}
    assert torch.equal(out[True], out[False]) and (out[True] != V).all()  # every mask revealed
    masks_seen = [m for m, _ in calls[: len(calls) // 2]]
    assert masks_seen == [4, 3, 2, 1] * (L // K)  # one reveal per step: block_size steps per block
    times = torch.stack([t for _, t in calls[:4]])
    assert (times[1:] < times[:-1]).all() and (times < 1).all()  # t falls as t · u^(1/n)
    assert BlockSampler(denoiser.process, K).nfe(L, 99, first_hitting=True)["denoising"] == L
    with pytest.raises(UserError, match="first_hitting .* needs a masked-process model"):
        d = uniform_denoiser()
        BlockSampler(d.process, K)(d, steps=2, shape=(1, L), first_hitting=True)


def test_the_two_nucleus_rules():
    from mdlm_dmmd.diffusion.sampling import top_p_mask

    log_p = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert top_p_mask(log_p, 0.7).tolist() == [True, True, False, False]  # keep: 0.5 + 0.3 crosses 0.7
    assert top_p_mask(log_p, 0.7, "drop").tolist() == [True, False, False, False]  # drop: only 0.5 ≤ 0.7
    assert top_p_mask(log_p, 0.3, "drop").tolist() == [True, False, False, False]  # the top-1 stays
    assert top_p_mask(log_p, 0.81, "drop").tolist() == [True, True, False, False]  # 0.8 ≤ 0.81: kept


def test_stop_at_eos_ends_each_sequence_and_stops_when_all_have_ended(monkeypatch):
    from mdlm_dmmd.diffusion.block_sampling import _end_at

    x = torch.tensor([[3, 5, 3, 7, 3], [3, 1, 2, 4, 6]])
    assert _end_at(x, 3).tolist() == [[3, 5, 3, 3, 3], [3, 1, 2, 4, 6]]  # position 0 (BOS = EOS) does not end it
    denoiser = saying(ALWAYS_2)  # every sequence ends in its first block
    calls = []
    block_log_probs = denoiser.block_log_probs
    monkeypatch.setattr(denoiser, "block_log_probs", lambda *a, **k: calls.append(1) or block_log_probs(*a, **k))
    # seeded: unseeded, both steps of the first block revealed nothing or everything once in ~200 runs
    out = sample_blocks(denoiser, denoiser.process, block_size=K, steps=2, shape=(2, L), stop_at=2,
                        generator=torch.Generator().manual_seed(0))
    assert (out == 2).all() and len(calls) == 2  # one block of 2 steps, then stopped


def test_a_sliding_window_generates_past_the_model_length(monkeypatch):
    """3L tokens with a model of length L: a block sees at most L − K tokens before it (cached or
    re-read), new tokens continue at their own positions, and the first L tokens are what a
    sequence of length L gets under the same seed."""
    denoiser = masked_denoiser()
    seen = []
    forward = denoiser.network.forward
    monkeypatch.setattr(denoiser.network, "forward", lambda x, *a, kv_cache=None, **k: seen.append(
        (x.shape[1], kv_cache.length if kv_cache is not None else 0, kv_cache.end if kv_cache is not None else 0))
        or forward(x, *a, kv_cache=kv_cache, **k))
    long = {}
    for cached in (True, False):
        seen.clear()
        long[cached] = sample_blocks(denoiser, denoiser.process, block_size=K, steps=2, shape=(2, 3 * L), context=L,
                                     kv_cache=cached, generator=torch.Generator().manual_seed(7))
        assert long[cached].shape == (2, 3 * L) and (long[cached] != V).all()
        assert max(fed + cached_tokens for fed, cached_tokens, _ in seen) <= L  # never more than the context
    assert seen[-1][0] == L  # uncached: the window of L − K tokens and the block
    short = sample_blocks(denoiser, denoiser.process, block_size=K, steps=2, shape=(2, L), context=L,
                          generator=torch.Generator().manual_seed(7))
    assert torch.equal(long[True][:, :L], short) and torch.equal(long[False][:, :L], short)
    with pytest.raises(UserError, match="context 6 must be a positive multiple of block_size 4"):
        sample_blocks(denoiser, denoiser.process, block_size=K, steps=2, shape=(1, L), context=6)


def test_the_cache_drops_its_oldest_tokens_and_keeps_positions():
    from mdlm_dmmd.models.kv_cache import KVCache

    cache = KVCache()
    net = masked_denoiser().network
    with torch.no_grad():
        for i in range(3):
            net(torch.zeros(1, K, dtype=torch.long), torch.zeros(1), kv_cache=cache)
            cache.commit()
    cache.drop_first(K)
    assert cache.length == 2 * K and cache.dropped == K and cache.end == 3 * K
    with pytest.raises(ValueError, match="drop_first"):
        cache.drop_first(3 * K)


def test_entropy_redraw_is_off_by_default_and_counts_what_it_redraws():
    from mdlm_dmmd.diffusion.block_sampling import low_entropy

    repeating = torch.zeros(2, 512, dtype=torch.long)
    varied = torch.arange(512).remainder(300)[None]
    assert low_entropy(torch.cat([repeating, varied]), 64).tolist() == [True, True, False]
    assert not low_entropy(repeating[:, :256], 64).any()  # BD3-LM checks only past 256 tokens
    denoiser = saying(ALWAYS_2)  # every sample has entropy 0
    sampler, stats = BlockSampler(denoiser.process, K), {}
    sampler(denoiser, steps=1, shape=(2, 2 * L), context=L, entropy_redraw=True, stats=stats)
    assert stats == {}  # 32 tokens: never checked (BD3-LM looks past 256)
    sampler(denoiser, steps=1, shape=(2, 320), context=L, stats=stats)
    assert stats == {}  # off by default
    out = sampler(denoiser, steps=1, shape=(2, 320), context=L, entropy_redraw=True, stats=stats)
    assert (out == 2).all() and stats == {"entropy_redraws": 2 * 10}  # both rows, every one of the 10 tries


def test_stop_at_eos_keeps_cached_and_uncached_sampling_equal():
    denoiser = uniform_denoiser()
    plain = sample_blocks(denoiser, denoiser.process, block_size=K, steps=2, shape=(6, L),
                          generator=torch.Generator().manual_seed(11))
    eos = int(plain[:, K:2 * K].flatten().mode().values)  # a token the second blocks use: sequences end early
    out = [sample_blocks(denoiser, denoiser.process, block_size=K, steps=2, shape=(6, L), stop_at=eos, kv_cache=cached,
                         generator=torch.Generator().manual_seed(11)) for cached in (True, False)]
    assert torch.equal(out[0], out[1])
    ended_early = (out[0][:, 1:2 * K] == eos).any(dim=1)
    assert ended_early.any()  # some sequences ended in their first blocks: the stop path ran


def test_entropy_is_in_nats_and_a_redraw_keeps_the_first_token():
    """ln 32 = 3.47 nats (5 bits) is below BD3-LM's 4, ln 64 = 4.16 is not; a re-drawn row still
    starts with the BOS a model trained with ignore_bos never saw noisy."""
    from mdlm_dmmd.diffusion.block_sampling import low_entropy

    windows = torch.stack([torch.arange(512).remainder(n) for n in (32, 64)])
    assert low_entropy(windows, 256).tolist() == [True, False]
    denoiser = saying(ALWAYS_2)  # every row is re-drawn, 10 times
    stats = {}
    out = BlockSampler(denoiser.process, K, first_token=5)(denoiser, steps=1, shape=(2, 320), context=L,
                                                           entropy_redraw=True, stats=stats)
    assert stats["entropy_redraws"] == 20 and (out[:, 0] == 5).all() and (out[:, 1:] == 2).all()


def test_stop_at_eos_waits_for_every_sequence():
    """Row 0's prompt ends it at once (EOS = 3 at position 1); row 1 never meets EOS (the model
    never says 3), so it is what the same seed gives without stop_at, every block of it."""
    denoiser = masked_denoiser()
    with torch.no_grad():
        denoiser.network.output_layer.linear.bias.copy_(torch.where(torch.arange(V + 1) == 3, -50.0, 0.0))
    prompt = torch.tensor([[1, 3], [1, 2]])
    run = lambda **kw: sample_blocks(denoiser, denoiser.process, block_size=K, steps=2, shape=(2, L), prompt=prompt,  # noqa: E731
                                     generator=torch.Generator().manual_seed(5), **kw)
    plain, stopped = run(), run(stop_at=3)
    assert (stopped[0, 1:] == 3).all() and not (plain[1] == 3).any()
    assert torch.equal(stopped[1], plain[1])


@pytest.mark.parametrize("first_hitting", [False, True])
def test_the_block_sampler_applies_the_nucleus_rule_it_is_given(first_hitting):
    """x̂ = [0.5, 0.3, 0.15, 0.05] everywhere, top-p 0.7: keep draws tokens 0 and 1, drop token 0 only."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05] + [1e-9] * (V - 4) + [1.0])  # the mask's column: SUBS
    denoiser = saying(probs.log())
    drawn = {rule: sample_blocks(denoiser, denoiser.process, block_size=K, steps=2, shape=(16, L), top_p=0.7,
                                 nucleus=rule, first_hitting=first_hitting, generator=torch.Generator().manual_seed(6))
             for rule in ("keep", "drop")}
    assert set(drawn["keep"].unique().tolist()) == {0, 1} and set(drawn["drop"].unique().tolist()) == {0}


def test_a_cache_that_dropped_a_block_gives_the_numbers_of_the_re_read_window():
    """Three committed blocks, the oldest dropped: the next block's log-probs equal those with the
    last two blocks as a prefix (positions continue from the cache's end; rotary sees only
    differences), also for a noise-input model, whose commits feed zero noise like a prefix.
    One layer: deeper cached keys and values also carry what the dropped block told them (as in
    any sliding-window cache), so with more layers the two differ by design."""
    network = random_model(DiTConfig(vocab_size=V, length=L, hidden_dim=32, cond_dim=16, n_blocks=1, n_heads=4,
                                     dropout=0.0, noise_dim=4), seed=0)
    denoiser = BlockDenoiser(network, UniformProcess(LogLinear(), vocab_size=V), time_conditioning=True, block_size=K)
    with torch.no_grad():
        denoiser.network.noise_proj.weight.normal_()  # a noise input that matters
    clean = torch.randint(0, V, (2, 3 * K), generator=torch.Generator().manual_seed(8))
    z = torch.randint(0, V, (2, K), generator=torch.Generator().manual_seed(9))
    t = torch.full((2,), 0.6)
    cache = denoiser.new_cache()
    with torch.no_grad():
        for j in range(3):
            denoiser.commit(clean[:, j * K:(j + 1) * K], cache)
        cache.drop_first(K)
        noise = denoiser.network.draw_noise(2, K, generator=torch.Generator().manual_seed(10), device="cpu")
        denoiser.network.draw_noise = lambda *a, **k: noise  # the same noise on the block in both calls
        cached = denoiser.block_log_probs(z, t, kv_cache=cache)
        reread = denoiser.block_log_probs(z, t, prefix=clean[:, K:])
    torch.testing.assert_close(cached, reread, rtol=1e-5, atol=1e-5)


def test_first_hitting_times_and_positions_are_bd3lms_replayed(monkeypatch):
    """Per step, with n masks left: t ← t · u^(1/n) (u one uniform per row), the revealed position
    the argmax of uniform weights over the masked ones (a uniform masked position); replayed from
    the seed in the sampler's draw order (u, the weights, then the token's uniform)."""
    denoiser = masked_denoiser()
    seen = []
    block_log_probs = denoiser.block_log_probs
    monkeypatch.setattr(denoiser, "block_log_probs", lambda z, t, **kw: seen.append((z.clone(), t.clone(), kw["at"]))
                        or block_log_probs(z, t, **kw))
    sample_blocks(denoiser, denoiser.process, block_size=K, steps=1, shape=(2, K), first_hitting=True,
                  generator=torch.Generator().manual_seed(3))
    g, t, rows = torch.Generator().manual_seed(3), torch.ones(2, dtype=torch.float64), torch.arange(2)
    assert len(seen) == K
    for z, t_seen, at in seen:
        masked = z == V
        t = t * torch.rand(2, dtype=torch.float64, generator=g) ** (1 / masked.sum(1))
        position = (torch.rand(2, K, dtype=torch.float64, generator=g) * masked).argmax(1)
        torch.rand(2, 1, dtype=torch.float64, generator=g)  # the revealed token's draw
        assert torch.equal(t_seen, t.float()) and at.sum() == 2 and at[rows, position].all()


@pytest.mark.parametrize("make", [masked_denoiser, uniform_denoiser], ids=["masked", "uniform"])
def test_greedy_tail_per_block_keeps_cached_and_uncached_sampling_equal(make, monkeypatch):
    """Duo's greedy tail in every block: k steps down to TAIL_T, then one more call (the masks
    left, or every token of a uniform block) whose argmax ends the block; cached = uncached. With
    the tail at t = 0.1 (patched) masked blocks have masks left for it to decode."""
    from mdlm_dmmd.diffusion import sampling
    monkeypatch.setattr(sampling, "TAIL_T", 0.1)
    denoiser = make()
    lengths = []
    forward = denoiser.network.forward
    monkeypatch.setattr(denoiser.network, "forward", lambda x, *a, **k: lengths.append(x.shape[1]) or forward(x, *a, **k))
    tokens = {}
    for cached in (True, False):
        lengths.clear()
        tokens[cached] = sample_blocks(denoiser, denoiser.process, block_size=K, steps=2, shape=(4, L), kv_cache=cached,
                                       noise_removal="greedy_tail", generator=torch.Generator().manual_seed(5))
        if make is uniform_denoiser:  # 2 steps + the tail per block, and the commits
            assert lengths == ([K] * (3 * 4 + 3) if cached else [n * K for n in (1, 2, 3, 4) for _ in range(3)])
    assert torch.equal(tokens[True], tokens[False]) and (tokens[True] < V).all()
    plain = sample_blocks(denoiser, denoiser.process, block_size=K, steps=2, shape=(4, L),
                          generator=torch.Generator().manual_seed(5))
    assert not torch.equal(plain, tokens[True])  # the tail changes the samples: the test can fail
    assert nfe(L, K, 2, True, "greedy_tail") == {"per_block": 3, "denoising": 12, "commit": 3, "total": 15}
    assert BlockSampler(denoiser.process, 256).nfe(1024, 16, noise_removal="greedy_tail")["total"] == 17 * 4 + 3


def test_greedy_tail_blocks_end_their_k_steps_at_the_schedules_alpha():
    """Under a Duo schedule (α(1e-5) ≈ 0.9) each block's k-th step stops at the schedule's α, so
    the tail's call sees noise, and the argmax of a perfect denoiser removes it (as in Duo)."""
    from mdlm_dmmd.diffusion.schedules import DuoSchedule
    vocab, size, blocks = 1000, 64, 2
    process = UniformProcess(DuoSchedule(vocab, gamma_min=-2.0, gamma_max=0.0), vocab)
    alpha_tail = process.schedule.alpha(torch.tensor([1e-5], dtype=torch.float64)).item()
    x = torch.randint(0, vocab, (8, size), generator=torch.Generator().manual_seed(0))  # every block's data
    tail_inputs = []

    class Perfect:
        def block_log_probs(self, z, t, prefix=None, kv_cache=None, generator=None, at=None):
            if t[0].item() == pytest.approx(1e-5):
                tail_inputs.append(z.clone())
            log_p = torch.full((*z.shape, vocab), -1e9).scatter_(-1, x[..., None], 0.0)
            return log_p if at is None else log_p[at]

    out = sample_blocks(Perfect(), process, block_size=size, steps=3, shape=(8, size * blocks), kv_cache=False,
                        noise_removal="greedy_tail", generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, x.repeat(1, blocks)) and len(tail_inputs) == blocks
    for z in tail_inputs:
        noisy = (z != x).double().mean().item()
        assert abs(noisy - (1 - alpha_tail)) < 0.04, (noisy, alpha_tail)


def test_one_hot_soft_input_equals_ids_in_the_training_layout():
    """Soft z_t (D-MMD's generator input) in the [z_t, x_0] layout: x_0 stays the clean ids."""
    denoiser = uniform_denoiser()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, V, (2, L), generator=g)
    t = block.per_token(torch.rand(2, L // K, generator=g), K)
    z = denoiser.process.corrupt(x0, t, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(denoiser(F.one_hot(z, V).float(), t, clean=x0), denoiser(z, t, clean=x0),
                                   atol=1e-5, rtol=1e-5)


def test_the_sliding_window_keeps_exactly_context_minus_one_block(monkeypatch):
    """3L tokens with a context of L: every block starts at its own position (the cache's end),
    and the cache holds min(end, L − K) tokens once it can."""
    denoiser = masked_denoiser()
    seen = []
    forward = denoiser.network.forward
    monkeypatch.setattr(denoiser.network, "forward", lambda x, *a, kv_cache=None, **k: seen.append(
        (kv_cache.length, kv_cache.end)) or forward(x, *a, kv_cache=kv_cache, **k))
    sample_blocks(denoiser, denoiser.process, block_size=K, steps=2, shape=(2, 3 * L), context=L, kv_cache=True,
                  generator=torch.Generator().manual_seed(7))
    assert sorted({end for _, end in seen}) == list(range(0, 3 * L - K + 1, K))
    assert all(length == min(end, L - K) for length, end in seen)


def test_a_context_of_one_block_samples_cached_as_uncached():
    """context = block_size: every block sees no prefix, so the cache drops all it holds."""
    denoiser = masked_denoiser()
    out = [sample_blocks(denoiser, denoiser.process, block_size=K, steps=2, shape=(2, 2 * L), context=K,
                         kv_cache=cached, generator=torch.Generator().manual_seed(3)) for cached in (True, False)]
    assert torch.equal(out[0], out[1])
