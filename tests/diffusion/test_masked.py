"""Masked process: forward marginals, posterior against Bayes' rule, SUBS, NELBO weight."""

import itertools

import pytest
import torch

from mdlm_dmmd.diffusion.masked import NEG_INF, MaskedProcess
from mdlm_dmmd.diffusion.schedules import LogLinear

V = 4  # three real tokens + mask
MASK = 3
process = MaskedProcess(LogLinear(eps=1e-3), mask_id=MASK)


def test_corrupt_endpoints_and_rate():
    x = torch.randint(0, 3, (2000, 16))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(process.corrupt(x, torch.zeros(2000), g), x)  # α_0 = 1: nothing masked
    z = process.corrupt(x, torch.full((2000,), 0.3), g)
    rate = (z == MASK).double().mean().item()
    assert abs(rate - (1 - process.schedule.alpha(torch.tensor(0.3)).item())) < 0.01
    assert torch.equal(z[z != MASK], x[z != MASK])  # unmasked tokens are the data


def test_corrupt_per_token_times():
    x = torch.randint(0, 3, (500, 2))
    t = torch.tensor([0.0, 1.0]).expand(500, 2)
    z = process.corrupt(x, t, torch.Generator().manual_seed(1))
    assert torch.equal(z[:, 0], x[:, 0])
    assert (z[:, 1] == MASK).double().mean() > 0.99  # α_1 = 1e-3


def _q_t_given_x(z, x, alpha):
    """Forward marginal of one token, written out by hand."""
    if z == MASK:
        return 1 - alpha
    return alpha if z == x else 0.0


@pytest.mark.parametrize("t,s", [(0.8, 0.5), (0.5, 0.0), (0.3, 0.29)])
def test_posterior_equals_bayes(t, s):
    """q(z_s | z_t, x) = q(z_t | z_s) q(z_s | x) / q(z_t | x), enumerated over a 4-token vocab."""
    sch = process.schedule
    a_t, a_s = sch.alpha(torch.tensor(t)).item(), sch.alpha(torch.tensor(s)).item()
    a_ts = a_t / a_s  # q(z_t | z_s) keeps a clean token with prob α_t/α_s; mask stays mask
    for x, z_t in itertools.product(range(3), range(V)):
        if _q_t_given_x(z_t, x, a_t) == 0:
            continue
        brute = []
        for z_s in range(V):
            q_ts = (1.0 if z_t == MASK else 0.0) if z_s == MASK else (a_ts if z_t == z_s else (1 - a_ts if z_t == MASK else 0.0))
            brute.append(q_ts * _q_t_given_x(z_s, x, a_s) / _q_t_given_x(z_t, x, a_t))
        got = process.posterior_probs(
            torch.tensor([[z_t]]), torch.nn.functional.one_hot(torch.tensor([[x]]), V).double(),
            torch.tensor([t]), torch.tensor([s]),
        )[0, 0]
        assert torch.allclose(got, torch.tensor(brute, dtype=torch.float64), atol=1e-9), (x, z_t)
        assert abs(got.sum().item() - 1) < 1e-12


def test_posterior_soft_is_mixture_of_hard():
    probs = torch.tensor([[[0.2, 0.5, 0.3, 0.0]]], dtype=torch.float64)
    z_t, t, s = torch.tensor([[MASK]]), torch.tensor([0.7]), torch.tensor([0.4])
    soft = process.posterior_probs(z_t, probs, t, s)
    eye = torch.eye(V, dtype=torch.float64)
    mixture = sum(probs[0, 0, c] * process.posterior_probs(z_t, eye[c][None, None], t, s) for c in range(3))
    assert torch.allclose(soft, mixture)


def test_sample_posterior_keeps_unmasked_and_matches_rate():
    g = torch.Generator().manual_seed(0)
    z_t = torch.tensor([[0, MASK, 2, MASK]]).repeat(4000, 1)
    x = torch.tensor([[1, 1, 0, 0]]).repeat(4000, 1)  # x differs from z_t at the clean positions 0 and 2
    t, s = torch.full((4000,), 0.8), torch.full((4000,), 0.2)
    z_s = process.sample_posterior(z_t, x, t, s, g)
    assert torch.equal(z_s[:, [0, 2]], z_t[:, [0, 2]])
    revealed = z_s[:, [1, 3]] != MASK
    assert torch.equal(z_s[:, [1, 3]][revealed], x[:, [1, 3]][revealed])
    expected = process.reveal_probability(z_t[:1], t[:1], s[:1])[0, 1].item()
    assert abs(revealed.double().mean().item() - expected) < 0.02
    assert (process.sample_posterior(z_t, x, t, torch.zeros(4000), g) != MASK).all()  # s = 0 reveals all


def test_subs_parameterisation():
    logits = torch.randn(1, 2, V)
    log_p = process.log_probs(logits, torch.tensor([[MASK, 1]]))
    assert log_p[0, 0, MASK] < -1e5 and abs(log_p[0, 0].exp().sum().item() - 1) < 1e-5
    assert log_p[0, 1, 1] == 0 and (log_p[0, 1, [0, 2, 3]] == NEG_INF).all()


def test_nelbo_weight_is_one_over_t_for_loglinear():
    t = torch.tensor([0.1, 0.5, 1.0])
    assert torch.allclose(process.elbo_weight(t), 1 / t, rtol=1e-6)
    log_p = torch.log(torch.full((1, 2, V), 0.25))
    loss = process.nelbo(log_p, torch.tensor([[0, 1]]), torch.tensor([[MASK, 1]]), torch.tensor([0.5]))
    assert torch.allclose(loss, torch.tensor([[2 * torch.log(torch.tensor(4.0)), 0.0]]))


def test_reveal_probability_is_exact_at_small_times():
    """(α_s − α_t)/(1 − α_t) = (t − s)/t for log-linear, also where 1 − α_t is ~1e-4 (a
    1000-step sampler's last step): s = 0 reveals every masked token."""
    z_t = torch.full((1, 3), MASK)
    t = torch.tensor([[1e-4, 2e-4, 0.5]], dtype=torch.float64)
    s = torch.tensor([[0.0, 1e-4, 0.25]], dtype=torch.float64)
    torch.testing.assert_close(process.reveal_probability(z_t, t, s),
                               torch.tensor([[1.0, 0.5, 0.5]], dtype=torch.float64), rtol=1e-9, atol=1e-12)
    z_s = process.sample_posterior(torch.full((1000, 1), MASK), torch.ones(1000, 1, dtype=torch.long),
                                   torch.full((1000,), 1e-4, dtype=torch.float64), torch.zeros(1000, dtype=torch.float64),
                                   torch.Generator().manual_seed(0))
    assert (z_s == 1).all()


def test_denoising_positions_of_a_soft_z_are_those_with_any_mask_mass():
    z = torch.tensor([[[0.7, 0.0, 0.0, 0.3], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.9, 0.0, 0.1]]])
    assert process.denoising_positions(z).tolist() == [[True, False, True, True]]


def test_marginal_keeps_the_mask_absorbing():
    """q(z_t | m) = m: a mask stays a mask; rows of any x in the simplex sum to 1."""
    t = torch.tensor([0.4], dtype=torch.float64)
    got = process.marginal_probs(torch.tensor([[MASK, 1]]), t)[0]
    a = 1 - 0.999 * 0.4
    torch.testing.assert_close(got, torch.tensor([[0, 0, 0, 1.0], [0, a, 0, 1 - a]], dtype=torch.float64))
    soft = process.marginal_probs(torch.tensor([[[0.2, 0.3, 0.1, 0.4]]], dtype=torch.float64), t)[0, 0]
    torch.testing.assert_close(soft, torch.tensor([0.2 * a, 0.3 * a, 0.1 * a, 0.4 * a + 1 - a], dtype=torch.float64))


def test_soft_nelbo_with_per_token_times():
    """w(t) = 1/t per token (block diffusion's times) times −Σ_c x̂_c log p_c on masked tokens:
    a uniform x̂_θ over the three real tokens gives log 3 / t."""
    log_p = torch.log(torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0])).clamp_min(NEG_INF).expand(1, 3, V)
    x_hat = torch.tensor([0.5, 0.25, 0.25, 0.0]).expand(1, 3, V)
    z_t = torch.tensor([[MASK, 1, MASK]])
    t = torch.tensor([[0.2, 0.4, 0.8]])
    expected = torch.tensor([[torch.log(torch.tensor(3.0)) / 0.2, 0.0, torch.log(torch.tensor(3.0)) / 0.8]])
    torch.testing.assert_close(process.nelbo_soft(log_p, x_hat, z_t, t), expected, rtol=1e-5, atol=1e-6)
