"""Uniform process: forward marginals, eq. (4) against Bayes' rule, Duo's closed form, the
generator vs ancestral one-step transition, and the NELBO against its discrete-time limit."""

import itertools

import pytest
import torch
from scipy.stats import chisquare

from mdlm_dmmd.diffusion.sampling import sample_categorical
from mdlm_dmmd.diffusion.schedules import DuoSchedule, LogLinear
from mdlm_dmmd.diffusion.uniform import UniformProcess

V = 5
process = UniformProcess(LogLinear(eps=1e-3), vocab_size=V)
sch = process.schedule


def alpha(t: float) -> float:
    return sch.alpha(torch.tensor(t, dtype=torch.float64)).item()


def onehot(x, n=V):
    return torch.nn.functional.one_hot(torch.as_tensor(x), n).double()


def assert_same_distribution(samples, probs, n_classes=V, p_min=1e-4):
    """Chi-square goodness of fit of integer samples to `probs` (fixed seeds: deterministic)."""
    counts = torch.bincount(samples.flatten(), minlength=n_classes).double()
    expected = probs.double() * counts.sum()
    assert chisquare(counts.numpy(), expected.numpy()).pvalue > p_min, (counts, expected)


# -- forward process and prior --------------------------------------------------------------
def test_corrupt_endpoints_and_rate():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (4000, 16), generator=g)
    assert torch.equal(process.corrupt(x, torch.zeros(4000), g), x)  # α_0 = 1
    z = process.corrupt(x, torch.full((4000,), 0.3), g)
    changed = (z != x).double().mean().item()
    assert abs(changed - (1 - alpha(0.3)) * (1 - 1 / V)) < 0.01  # a redraw may land on x
    z1 = process.corrupt(torch.zeros(20000, 4, dtype=torch.long), torch.ones(20000), g)
    q1 = torch.full((V,), (1 - alpha(1.0)) / V)
    q1[0] += alpha(1.0)  # α_1 = ε: nearly uniform
    assert_same_distribution(z1, q1)


def test_corrupt_per_token_times():
    x = torch.zeros(3000, 2, dtype=torch.long)
    t = torch.tensor([0.0, 1.0]).expand(3000, 2)
    z = process.corrupt(x, t, torch.Generator().manual_seed(1))
    assert torch.equal(z[:, 0], x[:, 0])
    assert abs((z[:, 1] == 0).double().mean().item() - 1 / V) < 0.03


def test_prior_is_uniform():
    z = process.prior((4000, 8), generator=torch.Generator().manual_seed(2))
    assert z.shape == (4000, 8) and z.dtype == torch.long
    assert_same_distribution(z, torch.full((V,), 1 / V))


# -- posterior, eq. (4) -------------------------------------------------------------------------
def q_t_given_s(z_t, z_s, a_ts):
    return a_ts * (z_t == z_s) + (1 - a_ts) / V


def q_given_x(z, x, a):
    return a * (z == x) + (1 - a) / V


def posterior(z_t, x_probs, t, s):
    return process.posterior_probs(torch.tensor([[z_t]]), x_probs[None, None], torch.tensor([t]), torch.tensor([s]))[0, 0]


@pytest.mark.parametrize("t,s", [(0.8, 0.5), (0.5, 0.0), (0.3, 0.29), (1.0, 0.75)])
def test_posterior_equals_bayes_for_hard_x(t, s):
    """q(z_s | z_t, x) = q(z_t | z_s) q(z_s | x) / q(z_t | x), enumerated over V = 5."""
    a_t, a_s = alpha(t), alpha(s)
    for x, z_t in itertools.product(range(V), range(V)):
        brute = torch.tensor([q_t_given_s(z_t, z_s, a_t / a_s) * q_given_x(z_s, x, a_s) / q_given_x(z_t, x, a_t)
                              for z_s in range(V)], dtype=torch.float64)
        got = posterior(z_t, onehot(x), t, s)
        assert got.dtype == torch.float64
        assert torch.allclose(got, brute, atol=1e-12), (x, z_t)
        assert abs(got.sum().item() - 1) < 1e-12


@pytest.mark.parametrize("t,s", [(0.8, 0.5), (0.5, 0.0), (0.9, 0.85)])
def test_posterior_soft_is_bayes_with_a_prior_and_not_the_mixture(t, s):
    """With x̂: q(z_t|z_s) Σ_x x̂(x) q(z_s|x) / Σ_x x̂(x) q(z_t|x) — not Σ_x x̂(x) q(z_s|z_t,x)."""
    a_t, a_s = alpha(t), alpha(s)
    x_hat = torch.tensor([0.05, 0.6, 0.15, 0.1, 0.1], dtype=torch.float64)
    for z_t in range(V):
        prior_form = torch.tensor([
            q_t_given_s(z_t, z_s, a_t / a_s) * sum(x_hat[x] * q_given_x(z_s, x, a_s) for x in range(V))
            / sum(x_hat[x] * q_given_x(z_t, x, a_t) for x in range(V))
            for z_s in range(V)], dtype=torch.float64)
        got = posterior(z_t, x_hat, t, s)
        assert torch.allclose(got, prior_form, atol=1e-12)
        assert abs(got.sum().item() - 1) < 1e-12


def test_soft_posterior_differs_from_the_mixture():
    """z_t = 0 with x̂ = (0.2, 0.8, 0, …): eq. (4) reads z_t as evidence for x = 0 and puts
    0.70 on z_s = 0; the mixture over hard x keeps 0.42. Even the mode differs."""
    x_hat = torch.tensor([0.2, 0.8, 0.0, 0.0, 0.0], dtype=torch.float64)
    soft = posterior(0, x_hat, 0.5, 0.2)
    mixture = sum(x_hat[x] * posterior(0, onehot(x), 0.5, 0.2) for x in range(V))
    assert abs(soft.sum().item() - 1) < 1e-12 and abs(mixture.sum().item() - 1) < 1e-12
    assert (soft - mixture).abs().max() > 0.25
    assert soft.argmax() == 0 and mixture.argmax() == 1


def duo_posterior(x, z_t, alpha_s, alpha_t):
    """Duo `DUO_BASE._compute_posterior`, transcribed (host-pattern §5.3)."""
    alpha_ts = alpha_t / alpha_s
    e = onehot(z_t)
    return (alpha_t * V * x * e + (alpha_ts - alpha_t) * e + (alpha_s - alpha_t) * x
            + (1 - alpha_ts) * (1 - alpha_s) / V) / (alpha_t * V * x.gather(-1, z_t[..., None]) + (1 - alpha_t))


def test_duo_closed_form_equals_eq4():
    g = torch.Generator().manual_seed(3)
    x_hat = torch.softmax(3 * torch.randn(4, 6, V, generator=g, dtype=torch.float64), -1)
    z_t = torch.randint(0, V, (4, 6), generator=g)
    t = torch.rand(4, generator=g, dtype=torch.float64)
    s = t * torch.rand(4, generator=g, dtype=torch.float64)
    a_t, a_s = sch.alpha(t)[:, None, None], sch.alpha(s)[:, None, None]
    assert torch.allclose(process.posterior_probs(z_t, x_hat, t, s), duo_posterior(x_hat, z_t, a_s, a_t), atol=1e-12)


def test_posterior_per_token_times():
    z_t = torch.tensor([[1, 3]])
    x_hat = torch.softmax(torch.randn(1, 2, V, dtype=torch.float64), -1)
    t, s = torch.tensor([[0.7, 0.4]]), torch.tensor([[0.2, 0.1]])
    got = process.posterior_probs(z_t, x_hat, t, s)
    for i in range(2):
        assert torch.allclose(got[0, i], posterior(z_t[0, i].item(), x_hat[0, i], t[0, i].item(), s[0, i].item()))


# -- sampling from the posterior ------------------------------------------------------------------
@pytest.mark.parametrize("z_t,x", [(2, 2), (2, 4)])
def test_sample_posterior_matches_eq4(z_t, x):
    n = 40000
    t, s = torch.full((n,), 0.6), torch.full((n,), 0.3)
    z_s = process.sample_posterior(torch.full((n, 1), z_t), torch.full((n, 1), x), t, s, torch.Generator().manual_seed(4))
    assert_same_distribution(z_s, posterior(z_t, onehot(x), 0.6, 0.3))


def test_generator_rule_is_the_mixture_not_the_soft_posterior():
    """Hard x ~ p then z_s ~ q(z_s|z_t,x) draws from Σ_x p(x) q(z_s|z_t,x) ≠ q(z_s|z_t,p)."""
    n, z_t, t, s = 50000, 0, 0.5, 0.2
    p = torch.tensor([0.2, 0.5, 0.1, 0.1, 0.1], dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    x = sample_categorical(p.expand(n, 1, V), g)  # [n, 1]
    z_s = process.sample_posterior(torch.full((n, 1), z_t), x, torch.full((n,), t), torch.full((n,), s), g)
    mixture = sum(p[c] * posterior(z_t, onehot(c), t, s) for c in range(V))
    assert_same_distribution(z_s, mixture)
    soft = posterior(z_t, p, t, s)
    counts = torch.bincount(z_s.flatten(), minlength=V).double()
    assert chisquare(counts.numpy(), (soft * n).numpy()).pvalue < 1e-12


@pytest.mark.parametrize("z_t", [0, 1])
def test_ancestral_step_draws_the_soft_posterior_without_building_it(z_t, monkeypatch):
    """`sampling.step`'s ancestral rule takes the process's `sample_soft_posterior` (keep z_t,
    else a draw from x̂, else uniform): the same distribution as q(z_s | z_t, x̂) of eq. (4) with
    x̂ as the prior, which it never builds; x̂ peaked at z_t and elsewhere."""
    from mdlm_dmmd.diffusion.sampling import step

    n, t, s = 60000, 0.7, 0.4
    p = torch.tensor([0.05, 0.6, 0.2, 0.1, 0.05], dtype=torch.float64)
    expected = posterior(z_t, p, t, s)
    monkeypatch.setattr(UniformProcess, "posterior_probs", lambda *a, **k: pytest.fail("built q [B, L, V]"))
    z_s = step(process, p.log().float().expand(n, 1, V), torch.full((n, 1), z_t), torch.full((n,), t),
               torch.full((n,), s), generator=torch.Generator().manual_seed(6))
    assert_same_distribution(z_s, expected)


# -- parameterisation and NELBO ---------------------------------------------------------------------
def test_log_probs_is_log_softmax():
    logits = torch.randn(2, 3, V, dtype=torch.float64)
    out = process.log_probs(logits, torch.zeros(2, 3, dtype=torch.long))
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.log_softmax(logits.float(), -1))


def all_pairs():
    """Every (x, z_t) pair of V = 5 tokens as one [1, 25] sequence."""
    return torch.arange(V).repeat_interleave(V)[None], torch.arange(V).repeat(V)[None]


@pytest.mark.parametrize("t", [0.2, 0.5, 0.9])
def test_nelbo_is_the_limit_of_the_discrete_kl(t):
    """KL(q(z_s|z_t,x) ‖ q(z_s|z_t,x̂)) / dt with s = t − dt → the continuous NELBO, O(dt)."""
    x, z_t = all_pairs()
    log_p = torch.log_softmax(2 * torch.randn(1, V * V, V, generator=torch.Generator().manual_seed(6), dtype=torch.float64), -1)
    tt = torch.tensor([t], dtype=torch.float64)
    continuous = process.nelbo(log_p, x, z_t, tt)
    assert continuous.shape == (1, V * V) and (continuous > 0).all()
    errors = []
    for dt in (1e-3, 1e-4, 1e-5):
        q = process.posterior_probs(z_t, onehot(x), tt, tt - dt)
        q_hat = process.posterior_probs(z_t, log_p.exp(), tt, tt - dt)
        kl = (q * (q.log() - q_hat.log())).sum(-1) / dt
        errors.append((kl - continuous).abs().max().item() / continuous.abs().max().item())
    assert errors[-1] < 1e-4 and errors[0] > errors[1] > errors[2]


def test_nelbo_is_zero_for_a_perfect_prediction():
    x, z_t = all_pairs()
    nelbo = process.nelbo(torch.log(onehot(x)), x, z_t, torch.tensor([0.4], dtype=torch.float64))
    assert nelbo.abs().max() < 1e-10


def test_nelbo_minimiser_is_not_the_posterior_mean():
    """argmin_x̂ E_{x~p} NELBO(x̂, x, z_t) = p(x)/q(z_t|x) normalised, not p (paper App. D)."""
    t, z_t = torch.tensor([0.5], dtype=torch.float64), torch.tensor([[0]])
    p = torch.tensor([0.1, 0.5, 0.2, 0.1, 0.1], dtype=torch.float64)
    logits = torch.zeros(1, 1, V, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([logits], lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)

    def expected_nelbo():
        opt.zero_grad()
        log_p = torch.log_softmax(logits, -1)
        loss = sum(p[c] * process.nelbo(log_p, torch.tensor([[c]]), z_t, t)[0, 0] for c in range(V))
        loss.backward()
        return loss

    opt.step(expected_nelbo)
    a_t = alpha(0.5)
    optimum = p / (a_t * (torch.arange(V) == 0) + (1 - a_t) / V)
    optimum = optimum / optimum.sum()
    found = torch.softmax(logits.detach(), -1)[0, 0]
    assert torch.allclose(found, optimum, atol=1e-5)
    assert (found - p).abs().max() > 0.05  # 0.018 vs 0.1 on the class z_t shows


def test_nelbo_per_token_times_and_float32():
    x, z_t = all_pairs()
    log_p = torch.log_softmax(torch.randn(1, V * V, V), -1)
    t = torch.linspace(0.1, 0.9, V * V)[None]
    out = process.nelbo(log_p, x, z_t, t)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    one = process.nelbo(log_p[:, 3:4], x[:, 3:4], z_t[:, 3:4], t[0, 3:4])
    assert torch.allclose(out[0, 3], one[0, 0], rtol=1e-5)


def test_latent_input_is_duos_soft_embedding():
    """softmax(latent/τ) @ W as Duo embeds its Gaussian latents; small τ → the argmax token."""
    from mdlm_dmmd.diffusion.uniform import latent_input
    from conftest import random_model
    from mdlm_dmmd.models.dit import DiTConfig

    g = torch.Generator().manual_seed(0)
    # every weight random: a zero-init head would make any two inputs agree
    model = random_model(DiTConfig(vocab_size=7, length=5, hidden_dim=16, cond_dim=8, n_blocks=1, n_heads=2, dropout=0.0))
    latent = torch.randn(2, 5, 7, generator=g)
    by_hand = torch.softmax(latent / 0.5, -1) @ model.vocab_embed.embedding
    assert torch.allclose(model.vocab_embed(latent_input(latent, 0.5)), by_hand, atol=1e-6)
    sigma = torch.zeros(2)
    hard = model(latent.argmax(-1), sigma)
    assert torch.allclose(model(latent_input(latent * 1000, 1.0), sigma), hard, atol=1e-4)
    assert not torch.allclose(model(latent_input(latent, 1.0), sigma), hard, atol=1e-2)
    with pytest.raises(ValueError, match="temperature"):
        latent_input(latent, 0.0)


@pytest.mark.parametrize("rule", ["ancestral", "generator"])
def test_the_last_step_returns_x_under_duos_schedule_whose_alpha_0_is_below_1(rule):
    """s = 0 is the data (α_s = 1, as Duo's sampler's last step): with a perfect denoiser every
    token ends as x. With Duo's α(0) < 1 the last step re-noised a share 1 − α(0) of them."""
    from mdlm_dmmd.diffusion.sampling import sample

    vocab = 1000
    schedule = DuoSchedule(vocab, gamma_min=-2.0, gamma_max=0.0)  # a noisier clean end than the defaults
    assert schedule.alpha(torch.zeros(1, dtype=torch.float64)).item() < 0.95
    process = UniformProcess(schedule, vocab)
    x = torch.randint(0, vocab, (4, 256), generator=torch.Generator().manual_seed(0))

    def perfect(z, t):
        return torch.full((*z.shape, vocab), -1e9).scatter_(-1, x[..., None], 0.0)

    out = sample(perfect, process, steps=4, shape=tuple(x.shape), generator=torch.Generator().manual_seed(1), rule=rule)
    assert torch.equal(out, x)


def test_a_posterior_step_to_time_0_is_the_schedules_own_step():
    """Losses (D-MMD's π from s to max(s − ds, 0)) keep the schedule's α(0): a step from s = 1e-5
    to 0 barely moves z under Duo's schedule (α(0) < 1 too), and only `final=True` jumps to the data."""
    vocab = 1000
    process = UniformProcess(DuoSchedule(vocab, gamma_min=-2.0, gamma_max=0.0), vocab)
    z = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    x_hat = torch.softmax(torch.randn(2, 8, vocab, generator=torch.Generator().manual_seed(1)), -1)
    s, zero = torch.full((2,), 1e-5), torch.zeros(2)
    stay = process.posterior_probs(z, x_hat, s, zero).gather(-1, z[..., None])
    assert stay.min().item() > 0.999
    to_data = process.posterior_probs(z, x_hat, s, zero, final=True)
    assert to_data.gather(-1, z[..., None]).max().item() < 0.9  # a real change: toward x̂


def test_corrupt_soft_temperature():
    """softmax(latent / τ) for the same latent: z_τ ∝ z_1^(1/τ) under one seed; τ must be > 0."""
    from mdlm_dmmd.errors import UserError

    duo = UniformProcess(DuoSchedule(V), vocab_size=V)
    x, t = torch.randint(0, V, (3, 4), generator=torch.Generator().manual_seed(0)), torch.full((3,), 0.5)
    z1 = duo.corrupt_soft(x, t, generator=torch.Generator().manual_seed(1)).double()
    z_half = duo.corrupt_soft(x, t, generator=torch.Generator().manual_seed(1), temperature=0.5).double()
    torch.testing.assert_close(z_half, z1**2 / (z1**2).sum(-1, keepdim=True), rtol=1e-4, atol=1e-6)
    for bad in (0.0, -1.0):
        with pytest.raises(UserError, match="temperature must be > 0"):
            duo.corrupt_soft(x, t, temperature=bad)
