"""Shared sampler: oracle denoisers, chi-square on a uniform denoiser, top-p/temperature rules."""

import pytest
import torch

from mdlm_dmmd.denoiser import Denoiser
from mdlm_dmmd.diffusion.masked import MaskedProcess
from mdlm_dmmd.diffusion.sampling import adjust, sample, sample_autoregressive, sample_categorical, step, top_p_mask
from mdlm_dmmd.diffusion.schedules import LogLinear
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.models.dit import DiTConfig

from conftest import random_model

MASK = 5
process = MaskedProcess(LogLinear(), mask_id=MASK)


def oracle(x):
    """Denoiser that always predicts the fixed sequence x (SUBS-consistent)."""
    def denoise(z_t, t):
        return process.log_probs(torch.nn.functional.one_hot(x, MASK + 1).float() * 50, z_t)
    return denoise


@pytest.mark.parametrize("steps", [1, 3, 16])
@pytest.mark.parametrize("rule", ["ancestral", "generator"])
def test_oracle_denoiser_reproduces_x(steps, rule):
    x = torch.randint(0, MASK, (3, 12), generator=torch.Generator().manual_seed(steps))
    out = sample(oracle(x), process, steps=steps, shape=(3, 12), generator=torch.Generator().manual_seed(0), rule=rule)
    assert torch.equal(out, x)


def test_uniform_denoiser_frequencies_chi_square():
    def uniform(z_t, t):
        return process.log_probs(torch.zeros(*z_t.shape, MASK + 1), z_t)
    out = sample(uniform, process, steps=4, shape=(400, 25), generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(out.flatten(), minlength=MASK + 1).double()
    assert counts[MASK] == 0
    expected = out.numel() / MASK
    chi2 = ((counts[:MASK] - expected) ** 2 / expected).sum().item()
    assert chi2 < 18.47  # 99.9% quantile of chi-square with 4 degrees of freedom


@pytest.mark.parametrize("noise_removal", ["ancestral", "greedy"])
def test_masked_sampling_at_the_revealed_tokens_only_draws_the_dense_tokens(noise_removal):
    """A `Denoiser` (takes `at=`) is called on the sequences with a revealed token, with logits
    at those tokens only, and not at all in a step that reveals none; a plain function gets
    every sequence at every step. With no noise input the draws are the same, so the tokens are."""
    process = MaskedProcess(LogLinear(), mask_id=7)
    network = random_model(DiTConfig(vocab_size=8, length=6, hidden_dim=16, cond_dim=8, n_blocks=1, n_heads=2,
                                     dropout=0.0))
    denoiser = Denoiser(network, process, time_conditioning=True)
    rows, calls = [], []

    def sparse(z, t, at=None):
        rows.append(z.shape[0])
        out = denoiser(z, t, at=at)
        assert out.shape == (int(at.sum()), 8)
        return out

    def dense(z, t):
        calls.append(z.shape[0])
        return denoiser(z, t)

    options = dict(steps=40, shape=(5, 6), top_p=0.9, noise_removal=noise_removal)
    got = sample(sparse, process, generator=torch.Generator().manual_seed(3), **options)
    want = sample(dense, process, generator=torch.Generator().manual_seed(3), **options)
    assert torch.equal(got, want) and (got != 7).all()
    assert calls == [5] * 40 and len(rows) < 40 and sum(rows) < 5 * 40  # fewer sequences through the network


def test_sample_categorical_frequencies():
    p = torch.tensor([0.1, 0.6, 0.3]).expand(30000, 3)
    draws = sample_categorical(p, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=3).double() / 30000
    assert torch.allclose(freq, torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64), atol=0.01)


def test_sample_categorical_inverts_the_cdf_and_never_draws_a_zero_probability_index(monkeypatch):
    """One uniform u per row, scaled by the row's mass; the draw is the first index whose CDF
    exceeds u. Even u just below 1 (and rounding of u · total) cannot reach a trailing
    zero-probability index such as the mask id."""
    probs = torch.tensor([[0.0, 2.0, 0.0, 1.0, 1.0, 0.0]] * 4)  # unnormalised, CDF 0, 2, 2, 3, 4, 4
    u = torch.tensor([[0.0], [0.49], [0.5], [1 - 2.0 ** -53]], dtype=torch.float64)  # u · 4 = 0, 1.96, 2, ~4
    monkeypatch.setattr(torch, "rand", lambda *a, **k: u)
    assert sample_categorical(probs).tolist() == [1, 1, 3, 4]


def test_sample_categorical_draws_the_same_in_chunks(monkeypatch):
    probs = torch.rand(3, 7, 50, generator=torch.Generator().manual_seed(0))
    whole = sample_categorical(probs, torch.Generator().manual_seed(1))
    monkeypatch.setattr("mdlm_dmmd.diffusion.sampling.CATEGORICAL_CHUNK", 120)  # 2 rows of 50 per chunk
    assert torch.equal(sample_categorical(probs, torch.Generator().manual_seed(1)), whole)
    assert whole.shape == (3, 7) and sample_categorical(probs[:0]).shape == (0, 7)


def test_top_p_one_is_identity_and_nucleus_keeps_crossing_token():
    log_p = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.allclose(adjust(log_p, top_p=1.0), log_p.exp().double())
    assert top_p_mask(log_p, 0.7).tolist() == [[True, True, False, False]]  # 0.5 < 0.7, crosses at 0.8
    assert top_p_mask(log_p, 0.45).tolist() == [[True, False, False, False]]
    assert torch.allclose(adjust(log_p, top_p=0.7), torch.tensor([[0.625, 0.375, 0, 0]], dtype=torch.float64))


def test_temperature_zero_is_argmax_and_small_temperature_approaches_it():
    gen = torch.Generator().manual_seed(0)
    logits = torch.stack([torch.randperm(9, generator=gen) for _ in range(28)]).view(4, 7, 9) * 0.1  # gaps >= 0.1
    log_p = torch.log_softmax(logits.float(), -1)
    greedy = adjust(log_p, temperature=0)
    assert torch.equal(greedy.argmax(-1), log_p.argmax(-1)) and torch.all(greedy.max(-1).values == 1)
    assert torch.allclose(adjust(log_p, temperature=1e-3), greedy, atol=1e-6)


def test_bad_sampling_arguments():
    for kwargs, key in [({"steps": 0}, "sampling.steps"), ({"steps": 2, "top_p": 0.0}, "sampling.top_p"),
                        ({"steps": 2, "temperature": -1}, "sampling.temperature"), ({"steps": 2, "rule": "x"}, "sampling.rule")]:
        with pytest.raises(UserError, match=key):
            sample(oracle(torch.zeros(1, 2, dtype=torch.long)), process, shape=(1, 2), **kwargs)


def test_autoregressive_sampler_follows_the_chain():
    """A causal 'model' that always predicts previous token + 1 (mod 5) yields that chain."""
    def next_log_probs(inputs):
        prev = inputs.clone()
        prev[prev == 5] = 4  # start id behaves like token 4, so the first token is 0
        return torch.log(torch.nn.functional.one_hot((prev + 1) % 5, 5).float() + 1e-12)
    out = sample_autoregressive(next_log_probs, shape=(2, 7), start_id=5, generator=torch.Generator().manual_seed(0))
    assert out[0].tolist() == [0, 1, 2, 3, 4, 0, 1]


@pytest.mark.parametrize("rule", ["ancestral", "generator"])
def test_masked_step_draws_the_exact_posterior(rule):
    """The masked fast path (reveal first, draw x only there) has q(z_s | z_t, adjust(x̂)) as its
    one-step law: chi-square per position against the posterior built densely."""
    n = 20000
    gen = torch.Generator().manual_seed(3)
    z_t = torch.tensor([[MASK, MASK, 2, MASK]]).expand(n, 4)
    logits = torch.randn(1, 4, MASK + 1, generator=gen).expand(n, 4, MASK + 1)
    log_p = process.log_probs(logits, z_t)
    t, s = torch.full((n,), 0.8), torch.full((n,), 0.5)
    z_s = step(process, log_p, z_t, t, s, rule=rule, temperature=0.7, top_p=0.9, generator=gen)
    exact = process.posterior_probs(z_t[:1], adjust(log_p[:1], 0.7, 0.9), t[:1], s[:1])[0]  # [4, V]
    assert torch.equal(z_s[:, 2], z_t[:, 2])  # clean tokens are carried over
    for i in (0, 1, 3):
        counts = torch.bincount(z_s[:, i], minlength=MASK + 1).double()
        support = exact[i] > 0
        assert counts[~support].sum() == 0
        expected = n * exact[i][support]
        chi2 = ((counts[support] - expected) ** 2 / expected).sum().item()
        assert chi2 < 22.5, (i, chi2)  # 99.9% quantile, <= 6 degrees of freedom


@pytest.mark.parametrize("rule", ["ancestral", "generator"])
def test_prompt_is_kept_and_the_rest_is_sampled(rule):
    from mdlm_dmmd.diffusion.uniform import UniformProcess

    prompt = torch.tensor([[1, 2, 3], [4, 0, 4]])
    def uniform_masked(z_t, t):
        return process.log_probs(torch.zeros(*z_t.shape, MASK + 1), z_t)
    out = sample(uniform_masked, process, steps=3, shape=(2, 8), prompt=prompt, rule=rule,
                 generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :3], prompt) and (out < MASK).all()
    uni = UniformProcess(LogLinear(), vocab_size=5)
    def uniform_uniform(z_t, t):
        return torch.zeros(*z_t.shape, 5)
    out = sample(uniform_uniform, uni, steps=4, shape=(2, 8), prompt=prompt, rule=rule, noise_removal="greedy",
                 generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :3], prompt)  # uniform diffusion would re-noise it; the sampler keeps it


def test_autoregressive_prompt_starts_sampling_after_it():
    seen = []
    def next_log_probs(inputs):
        seen.append(inputs.clone())
        return torch.log_softmax(torch.zeros(*inputs.shape, 5), -1)
    prompt = torch.tensor([[1, 2], [3, 4]])
    out = sample_autoregressive(next_log_probs, shape=(2, 6), start_id=5, prompt=prompt,
                                generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :2], prompt) and len(seen) == 4  # positions 2..5 only
    assert torch.equal(seen[0][:, 1:3], prompt)  # the model sees [start, prompt, ...]


@pytest.mark.parametrize("prompt", [torch.zeros(2, 8, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long),
                                    torch.zeros(2, 2), torch.zeros(2, 0, dtype=torch.long)])
def test_bad_prompts(prompt):
    with pytest.raises(UserError, match=r"a prompt must be token ids \[B=2, P\] with 0 < P < L=8"):
        sample(oracle(torch.zeros(2, 8, dtype=torch.long)), process, steps=2, shape=(2, 8), prompt=prompt)
