"""The plain samplers' details against hand computations: temperature before the nucleus,
the nucleus rules at exact ties, the AR sampler's temperature and top-p, the float64 categorical
draw (a tail below float32, one uniform per row), the greedy last step (uniform: argmax
everywhere; masked: every token still masked), Duo's greedy tail (k steps to t = 1e-5, then the
argmax of one more call), and the time grid j/k down to 0."""

import math

import pytest
import torch

from mdlm_dmmd.diffusion import sampling
from mdlm_dmmd.diffusion.masked import MaskedProcess
from mdlm_dmmd.diffusion.sampling import adjust, sample, sample_autoregressive, sample_categorical, top_p_mask
from mdlm_dmmd.diffusion.schedules import DuoSchedule, LogLinear
from mdlm_dmmd.diffusion.uniform import UniformProcess

P4 = [0.5, 0.3, 0.15, 0.05]


def test_adjust_tempers_first_then_takes_the_nucleus_of_the_tempered_law():
    log_p = torch.log(torch.tensor([P4]))
    p = torch.tensor(P4, dtype=torch.float64)
    sq = p**2 / (p**2).sum()  # T = 0.5: p^2 normalised = 0.685, 0.247, 0.062, 0.007
    torch.testing.assert_close(adjust(log_p, temperature=0.5)[0], sq, atol=1e-6, rtol=0)
    torch.testing.assert_close(adjust(log_p, temperature=2.0)[0], p.sqrt() / p.sqrt().sum(), atol=1e-6, rtol=0)
    # top-p 0.9 of the tempered law keeps 2 tokens (0.685 < 0.9, 0.685 + 0.247 crosses); of the
    # untempered law it would keep 3 (0.5, 0.8 < 0.9)
    want = torch.tensor([0.25, 0.09, 0.0, 0.0], dtype=torch.float64) / 0.34
    torch.testing.assert_close(adjust(log_p, temperature=0.5, top_p=0.9)[0], want, atol=1e-6, rtol=0)


def test_drop_nucleus_keeps_a_token_whose_cumulative_mass_lands_exactly_on_p():
    """BD3-LM `_nucleus_sample`: keep = cumsum <= p (plus the top-1); 0.5 + 0.25 = 0.75 <= 0.75."""
    log_p = torch.log(torch.tensor([0.125, 0.5, 0.125, 0.25], dtype=torch.float64))
    assert top_p_mask(log_p, 0.75, "drop").tolist() == [False, True, False, True]
    assert top_p_mask(log_p, 0.7, "drop").tolist() == [False, True, False, False]


def test_keep_nucleus_at_an_exact_tie_is_duos():
    """Duo's `top_k_top_p_filtering` removes a token when the mass before it exceeds p: with
    [0.5, 0.25, 0.25] and p = 0.5 the second token is kept (its mass before, 0.5, is not > 0.5)."""
    log_p = torch.log(torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64))
    assert top_p_mask(log_p, 0.5).tolist() == [True, True, False]
    assert top_p_mask(log_p, 0.49).tolist() == [True, False, False]


def test_autoregressive_sampler_applies_temperature_and_top_p():
    def next_log_probs(inputs):
        return torch.log(torch.tensor(P4)).expand(*inputs.shape, 4)

    n = 6000
    out = sample_autoregressive(next_log_probs, shape=(n, 3), start_id=4, top_p=0.7,
                                generator=torch.Generator().manual_seed(0))
    assert out.max() <= 1  # nucleus {0.5, 0.3}
    assert abs((out == 0).double().mean().item() - 0.625) < 0.02
    out = sample_autoregressive(next_log_probs, shape=(n, 3), start_id=4, temperature=0.5,
                                generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(out.flatten(), minlength=4).double() / out.numel()
    p = torch.tensor(P4, dtype=torch.float64)
    assert (freq - p**2 / (p**2).sum()).abs().max() < 0.02


# -- the float64 categorical draw -----------------------------------------------------------------
def test_sample_categorical_resolves_a_tail_below_float32(monkeypatch):
    """Mass 1e-12 next to 1 vanishes from a float32 CDF (1 + 1e-12 == 1); the float64 CDF keeps it."""
    probs = torch.tensor([[1.0, 1e-12], [1.0, 1e-12]], dtype=torch.float64)
    u = torch.tensor([[1 - 1e-13], [0.5]], dtype=torch.float64)
    monkeypatch.setattr(torch, "rand", lambda *a, **k: u)
    assert sample_categorical(probs).tolist() == [1, 0]


def test_sample_categorical_draws_one_float64_uniform_per_row_from_the_generator():
    """Replay: x = first index whose CDF exceeds u · total, u ~ torch.rand(rows, 1, float64)."""
    probs = torch.rand(50, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = sample_categorical(probs, torch.Generator().manual_seed(3))
    u = torch.rand(50, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cdf = probs.cumsum(-1)
    want = (cdf <= u * cdf[:, -1:]).sum(-1)
    assert torch.equal(got, want)


# -- greedy noise removal and the time grid -----------------------------------------------------------
def _fixed_log_probs(shape, V, seed, mask_id=None):
    """Log-probs per position with a clear argmax (0.4 vs ≤ 0.2), never the mask."""
    g = torch.Generator().manual_seed(seed)
    top = torch.randint(0, V if mask_id is None else mask_id, shape, generator=g)
    classes = V if mask_id is None else mask_id
    probs = torch.full((*shape, V), 0.6 / (classes - 1), dtype=torch.float32)
    if mask_id is not None:
        probs[..., mask_id] = 0.0
    probs.scatter_(-1, top[..., None], 0.4)
    return probs.log(), top


@pytest.mark.parametrize("rule", ["ancestral", "generator"])
def test_greedy_last_step_of_a_uniform_sampler_is_the_argmax_everywhere(rule):
    V, shape = 5, (40, 12)
    log_p, top = _fixed_log_probs(shape, V, 0)
    process = UniformProcess(LogLinear(), vocab_size=V)
    out = sample(lambda z, t: log_p, process, steps=3, shape=shape, rule=rule, noise_removal="greedy",
                 generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, top)
    sampled = sample(lambda z, t: log_p, process, steps=3, shape=shape, rule=rule,
                     generator=torch.Generator().manual_seed(1))
    assert (sampled != top).any()  # without greedy the last step draws


@pytest.mark.parametrize("sparse", [False, True])
def test_one_greedy_masked_step_decodes_every_token_by_argmax(sparse):
    mask, shape = 5, (40, 12)
    log_p, top = _fixed_log_probs(shape, mask + 1, 2, mask_id=mask)
    process = MaskedProcess(LogLinear(), mask_id=mask)

    def dense(z, t):
        return log_p

    def at_positions(z, t, at=None):
        return log_p[:z.shape[0]][at] if at is not None else log_p

    out = sample(at_positions if sparse else dense, process, steps=1, shape=shape, noise_removal="greedy",
                 generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, top)


def test_time_grid_is_j_over_k_down_to_zero(monkeypatch):
    """t_j = j/k from 1; the last step's s is 0 (the data)."""
    process = MaskedProcess(LogLinear(), mask_id=5)
    seen_t, seen_s = [], []
    original = MaskedProcess.draw_updated_positions

    def record(self, z_t, t, s, generator=None):
        seen_s.append(s[0].item())
        return original(self, z_t, t, s, generator)

    monkeypatch.setattr(MaskedProcess, "draw_updated_positions", record)

    def uniform(z, t):
        seen_t.append(t[0].item())
        return process.log_probs(torch.zeros(*z.shape, 6), z)

    out = sample(uniform, process, steps=4, shape=(3, 8), generator=torch.Generator().manual_seed(0))
    assert (out != 5).all()
    assert seen_t == [1.0, 0.75, 0.5, 0.25] and seen_s == [0.75, 0.5, 0.25, 0.0]


# -- Duo's greedy tail ----------------------------------------------------------------------------------
def test_greedy_tail_is_k_steps_down_to_1e_5_then_the_argmax_of_one_more_call():
    """Duo's `generate_samples` with `noise_removal=greedy`: t on linspace(1, 1e-5, k + 1), k
    ordinary steps with the schedule's own α_s (no jump to the data), then
    `forward(x, σ(1e-5)).argmax(-1)`: k + 1 calls. Under a Duo schedule with α(0) ≈ 0.9 the tail's
    input keeps the last step's noise and a perfect denoiser's argmax removes it."""
    vocab, k = 1000, 4
    schedule = DuoSchedule(vocab, gamma_min=-2.0, gamma_max=0.0)
    alpha_tail = schedule.alpha(torch.tensor([1e-5], dtype=torch.float64)).item()
    assert alpha_tail < 0.95
    process = UniformProcess(schedule, vocab)
    x = torch.randint(0, vocab, (8, 256), generator=torch.Generator().manual_seed(0))
    seen_t, inputs = [], []

    def perfect(z, t):
        seen_t.append(t[0].item())
        inputs.append(z.clone())
        return torch.full((*z.shape, vocab), -1e9).scatter_(-1, x[..., None], 0.0)

    out = sample(perfect, process, steps=k, shape=tuple(x.shape), noise_removal="greedy_tail",
                 generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, x)
    grid = [1 - j * (1 - 1e-5) / k for j in range(k)] + [1e-5]
    assert seen_t == pytest.approx(grid, abs=1e-7)
    # the k-th step drew z_{1e-5} ~ q(· | z_t, x) at α(1e-5): a share ≈ (1 − α)(1 − 1/V) is noise
    # (its marginal is q(z_s | x) up to the prior's mismatch with q(z_1 | x), which the posterior
    # from t = 1/4 has almost forgotten)
    noisy = (inputs[-1] != x).double().mean().item()
    expected = (1 - alpha_tail) * (1 - 1 / vocab)
    assert abs(noisy - expected) < 5 * math.sqrt(expected * (1 - expected) / x.numel()) + 0.005, (noisy, expected)


@pytest.mark.parametrize("rule", ["ancestral", "generator"])
def test_greedy_tail_takes_the_argmax_of_its_own_call_everywhere_for_uniform_models(rule):
    """The tail's argmax is that of the last call's x̂, at every position of a uniform model."""
    V, shape, k = 5, (40, 12), 3
    log_p, top = _fixed_log_probs(shape, V, 4)
    calls = []

    def fixed_then_other(z, t):
        calls.append(t[0].item())
        return log_p if len(calls) <= k else log_p.flip(-1)  # the tail's call says something else

    out = sample(fixed_then_other, UniformProcess(LogLinear(), vocab_size=V), steps=k, shape=shape, rule=rule,
                 noise_removal="greedy_tail", generator=torch.Generator().manual_seed(2))
    assert len(calls) == k + 1 and calls[-1] == pytest.approx(1e-5)
    assert torch.equal(out, log_p.flip(-1).argmax(-1))


def test_greedy_tail_of_a_masked_model_decodes_the_masks_left_and_nothing_else(monkeypatch):
    """With the tail at t = 0.1 (patched, so that masks are left: α = 0.9) the tail's call sees
    exactly the still-masked tokens of the sequences that have any; the clean ones stay; the
    sparse and the dense path give the same tokens; no mask is left."""
    monkeypatch.setattr(sampling, "TAIL_T", 0.1)
    mask, (B, L), k = 5, (40, 12), 2
    log_p, top = _fixed_log_probs((1, L), mask + 1, 6, mask_id=mask)  # the same x̂ for every sequence
    process = MaskedProcess(LogLinear(), mask_id=mask)
    dense_inputs, sparse_calls = [], []

    def dense(z, t):
        dense_inputs.append(z.clone())
        return log_p.expand(z.shape[0], L, -1)

    def sparse(z, t, at=None):
        sparse_calls.append((z.clone(), t.clone(), at.clone()))
        return log_p.expand(z.shape[0], L, -1)[at]

    out = sample(dense, process, steps=k, shape=(B, L), noise_removal="greedy_tail",
                 generator=torch.Generator().manual_seed(7))
    assert len(dense_inputs) == k + 1
    before_tail = dense_inputs[-1]
    left = before_tail == mask
    assert 0.05 < left.double().mean().item() < 0.18  # ≈ 1 − α(0.1) = 0.1
    assert left.any(dim=1).sum() < B  # some sequences have no mask left
    assert torch.equal(out[~left], before_tail[~left])  # clean tokens stay
    assert torch.equal(out[left], top.expand(B, L)[left])  # the masks left: argmax x̂
    out_sparse = sample(sparse, process, steps=k, shape=(B, L), noise_removal="greedy_tail",
                        generator=torch.Generator().manual_seed(7))
    assert torch.equal(out_sparse, out)
    z, t, at = sparse_calls[-1]  # the tail: the sequences with a mask left, at their masks, t = 0.1
    assert torch.equal(z, before_tail[left.any(dim=1)]) and torch.equal(at, z == mask)
    assert torch.allclose(t, torch.full_like(t, 0.1))


def test_greedy_tail_makes_no_call_when_no_mask_is_left():
    """Masked, k steps down to t = 1e-5 almost never leave a mask among 96 tokens: no tail call."""
    mask, shape = 5, (8, 12)
    log_p, _ = _fixed_log_probs(shape, mask + 1, 8, mask_id=mask)
    calls = []

    def dense(z, t):
        calls.append(t[0].item())
        return log_p

    out = sample(dense, MaskedProcess(LogLinear(), mask_id=mask), steps=3, shape=shape, noise_removal="greedy_tail",
                 generator=torch.Generator().manual_seed(9))
    assert (out != mask).all() and len(calls) == 3


def test_network_calls_count_the_greedy_tail():
    assert [sampling.network_calls(8, r) for r in ("ancestral", "greedy", "greedy_tail")] == [8, 8, 9]
