"""The plain samplers' details against hand computations: temperature before the nucleus,
the nucleus rules at exact ties, the AR sampler's temperature and top-p, the float64 categorical
draw (a tail below float32, one uniform per row), the greedy last step (uniform: argmax
everywhere; masked: every token still masked), and the time grid j/k down to 0."""

import pytest
import torch

from mdlm_dmmd.diffusion.masked import MaskedProcess
from mdlm_dmmd.diffusion.sampling import adjust, sample, sample_autoregressive, sample_categorical, top_p_mask
from mdlm_dmmd.diffusion.schedules import LogLinear
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
