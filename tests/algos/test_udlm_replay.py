"""UDLM's training loss against Duo's `nll_per_token` written out by hand (and the plain CE),
with random weights and padding, on the algo's replayed draws: the zero-initialised head of
the other tests gives every token −log V, where gathering at the wrong index or swapping x and
z_t changes nothing."""

import math

import pytest
import torch

from mdlm_dmmd.algos.udlm import UDLM


# -- UDLM loss by hand -------------------------------------------------------------------------
def _udlm_config(loss):
    return {
        "algo": {"name": "udlm", "time_conditioning": True, "loss": loss},
        "model": {"length": 16, "hidden_dim": 32, "cond_dim": 16, "n_blocks": 1, "n_heads": 2, "dropout": 0.0},
        "training": {"ema": 0.0, "antithetic_sampling": True, "sampling_eps": 1e-3},
        "optim": {"lr": 3e-3, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "warmup_steps": 0},
        "noise": {"type": "loglinear", "eps": 1e-3},
        "vocab": {"size": 7},
        "data": {"name": "digits"},
    }


def _duo_nll_per_token(log_p, x, z, alpha, dalpha, V):
    """Duo `DUO_BASE.nll_per_token` for one token, float64 (host-pattern §5.3), written out."""
    xbar_theta = [V * alpha * math.exp(lp) + 1 - alpha for lp in log_p]
    eq = 1.0 if x == z else 0.0
    term1 = V * (1 / ((1 - alpha) + V * alpha * eq) - 1 / xbar_theta[z])
    const = (1 - alpha) / (V * alpha + 1 - alpha)
    term2 = (-(eq * const + (1 - eq)) * (sum(math.log(v) for v in xbar_theta) - V * math.log(xbar_theta[z]))
             - V * alpha / (1 - alpha) * (math.log(xbar_theta[x]) - math.log(xbar_theta[z])) * (1 - eq)
             + ((V - 1) * const * eq - (1 - eq) / const) * math.log(const))
    return dalpha / (V * alpha) * (term1 - term2)


@pytest.mark.parametrize("loss", ["elbo", "ce"])
def test_udlm_loss_equals_the_replayed_duo_nelbo_or_cross_entropy(loss):
    """Random weights (the zero-initialised head makes every token's log-prob −log V, so any
    gathered index passes), padding, replayed t and z_t: Σ valid · Duo's nll_per_token(x, z_t)
    for elbo, Σ valid · −log x̂(x | z_t) for ce."""
    V, B, L, eps = 7, 4, 16, 1e-3
    algo = UDLM(_udlm_config(loss))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in algo.backbone.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    x = torch.randint(0, V, (B, L), generator=g)
    valid = torch.ones_like(x)
    valid[1, 10:] = 0

    torch.manual_seed(7)
    total, count = algo.loss({"input_ids": x, "attention_mask": valid})

    torch.manual_seed(7)  # draws: one time uniform per sequence (stratified), one keep-uniform and one noise id per token
    u = torch.rand(B, 1)
    r = torch.rand(B, L)
    noise = torch.randint(0, V, (B, L))
    expected = 0.0
    with torch.no_grad():
        for b in range(B):
            t = eps + (1 - eps) * ((b + u[b, 0].item()) / B)
            alpha, dalpha = 1 - (1 - eps) * t, -(1 - eps)
            z = torch.where(r[b] < alpha, x[b], noise[b])
            sigma = torch.tensor([-math.log(alpha)])
            log_p = torch.log_softmax(algo.backbone(z[None], sigma)[0].double(), -1)  # [L, V]
            for i in range(L):
                if not valid[b, i]:
                    continue
                if loss == "ce":
                    expected += -log_p[i, x[b, i]].item()
                else:
                    expected += _duo_nll_per_token(log_p[i].tolist(), x[b, i].item(), z[i].item(), alpha, dalpha, V)
    assert count == valid.sum()
    assert total.item() == pytest.approx(expected, rel=2e-4)


# -- temperature and top-p ------------------------------------------------------------------------
