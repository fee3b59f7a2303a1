"""Uniform D-MMD's two phase losses against a replay written from the paper, plain and per block.

The replay redraws the algo's randomness in its order (s and δ of Algorithm 1, z_t, the hard
x ~ Cat(x̂_η) by inverting a float64 CDF, z_s ~ q(z_s | z_t, x)), evaluates the networks itself
(block models block by block, the clean data prefix as context) and writes each loss per
position from the paper with every posterior built by Bayes over explicit transition matrices:

- posterior space (ELBO-trained teacher, App. D): generator Σ π(x̂_η)(log π(x̂_φ) − log π(x̂_θ))
  (eq. 24), auxiliary −Σ (π(x) + π(x̂_θ)) log π(x̂_φ) with the hard x (§3.2: a uniform auxiliary
  always trains on hard samples), both × 1/(s − s_prev) (L_t = KL · dt⁻¹), π = q(z_{s−ds} | z_s, ·);
- x0 space (CE-trained teacher): −Σ x̂_η (log x̂_θ − log x̂_φ) (eq. 11) and −Σ (x + x̂_θ) log x̂_φ
  (eq. 12, hard x);
- the teacher as §3.3 modifies it: temperature, then the tokens outside the nucleus (the one
  crossing top-p kept) lowered by Δ, renormalised.

These fail for a swapped sign, a dropped teacher term, a soft auxiliary target, networks at t
instead of s, no posterior draw or a missing 1/ds (each checked by mutating the code).
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mdlm_dmmd.algos.dmmd import DMMD, distillation_times
from mdlm_dmmd.denoiser import BlockDenoiser, Denoiser

from conftest import random_model
from test_dmmd import LENGTH, VOCAB, dmmd_config
from test_dmmd_block import BLOCK, block_teacher
from test_dmmd_block import config as block_config
from test_dmmd_uniform import brute_posterior, make_uniform_teacher

TOP_P, TEMPERATURE = 0.8, 0.9


def with_three_networks(algo):
    for seed, network in enumerate((algo.generator, algo.aux), start=1):  # teacher, generator, aux all differ
        network.load_state_dict(random_model(network.config, seed=seed).state_dict())
    return algo


def modified_teacher_by_hand(log_p, top_p, temperature, delta=2.0):
    scores = torch.log_softmax(log_p.double() / temperature, -1)
    keep, mass = torch.zeros(VOCAB, dtype=torch.bool), 0.0
    for token in scores.exp().argsort(descending=True).tolist():
        keep[token], mass = True, mass + scores[token].exp().item()
        if mass >= top_p:
            break
    return torch.log_softmax(scores - (~keep).double() * delta, -1)


def hard_draw(probs):
    """x ~ Cat(probs) per position from one float64 uniform each, by the inverse CDF."""
    u = torch.rand(probs.shape[:-1], dtype=torch.float64)
    cdf = probs.double().cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[..., -1])[..., None].contiguous(), right=True)[..., 0]


def replay_loss(algo, phase, s, p_gen, x, z_s, teacher_log_p, aux_log_p, *, top_p=1.0, temperature=1.0):
    """Mean over the B·L positions of the phase's loss, written per position (see the module docstring)."""
    schedule, ds = algo.process.schedule, algo.settings.posterior_ds
    posterior = algo.settings.loss_space == "posterior"
    total = 0.0
    for b, i in itertools.product(range(x.shape[0]), range(x.shape[1])):
        teacher = modified_teacher_by_hand(teacher_log_p[b, i], top_p, temperature)
        aux = aux_log_p[b, i].double()
        clean = F.one_hot(x[b, i], VOCAB).double()
        if posterior:
            s_now = s[b, i].item()
            s_prev = max(s_now - ds, 0.0)
            pi = lambda probs: brute_posterior(probs, z_s[b, i].item(), s_now, s_prev, schedule)
            log_pi_aux, log_pi_teacher = pi(aux.exp()).log(), pi(teacher.exp()).log()
            if phase == "gen":
                value = (pi(p_gen[b, i]) * (log_pi_aux - log_pi_teacher)).sum()
            else:
                value = -((pi(clean) + pi(teacher.exp())) * log_pi_aux).sum()
            total += value.item() / (s_now - s_prev)
        elif phase == "gen":
            total += -(p_gen[b, i].double() * (teacher - aux)).sum().item()
        else:
            total += -((clean + teacher.exp()) * aux).sum().item()
    return total / x.numel()


@pytest.mark.parametrize("teacher_loss, space", [("elbo", "posterior"), ("ce", "x0")])
@pytest.mark.parametrize("phase", ["gen", "aux"])
def test_plain_uniform_phase_losses_equal_the_papers_replayed(tmp_path, teacher_loss, space, phase):
    teacher = make_uniform_teacher(tmp_path / "teacher", loss=teacher_loss)
    algo = with_three_networks(DMMD(dmmd_config(teacher, teacher_top_p=TOP_P, teacher_temperature=TEMPERATURE)))
    assert algo.settings.loss_space == space and algo.settings.aux_target == "hard"
    x_data = torch.randint(0, VOCAB, (4, LENGTH), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    loss, _ = algo.phase_loss({"input_ids": x_data}, phase)

    torch.manual_seed(5)
    s, t = distillation_times(4, algo.settings.sampling_steps, "cpu")
    z_t = algo.process.corrupt(x_data, t)
    with torch.no_grad():
        p_gen = Denoiser(algo.generator, algo.process, True)(z_t, t).exp()
        x = hard_draw(p_gen)
        z_s = algo.process.sample_posterior(z_t, x, t, s)
        teacher_log_p = Denoiser(algo.teacher, algo.process, True)(z_s, s)
        aux_log_p = Denoiser(algo.aux, algo.process, True)(z_s, s)
    s_tokens = s[:, None].expand(x.shape)
    expected = replay_loss(algo, phase, s_tokens, p_gen, x, z_s, teacher_log_p, aux_log_p, top_p=TOP_P,
                           temperature=TEMPERATURE)
    assert loss.item() == pytest.approx(expected, rel=1e-6)  # the loss comes back in float32
    assert abs(expected) > 1e-3 and math.isfinite(expected)


@pytest.mark.parametrize("phase", ["gen", "aux"])
def test_block_uniform_phase_losses_equal_the_papers_replayed_block_by_block(tmp_path, phase):
    """One (s, t) per (sequence, block); each network on [z, x_0] sees the clean data's earlier
    blocks, so the replay runs it block by block with that prefix (the sampling layout)."""
    teacher = block_teacher(tmp_path / "teacher", uniform=True)
    algo = with_three_networks(DMMD(block_config(teacher)))
    assert algo.settings.loss_space == "posterior" and algo.block == BLOCK
    n = LENGTH // BLOCK
    x_data = torch.randint(0, VOCAB, (3, LENGTH), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(11)
    loss, _ = algo.phase_loss({"input_ids": x_data}, phase)

    torch.manual_seed(11)
    s, t = (u.view(3, n).repeat_interleave(BLOCK, 1) for u in distillation_times(3 * n, 4, "cpu"))
    z_t = algo.process.corrupt(x_data, t)

    def by_blocks(network, z, times):
        denoiser = BlockDenoiser(network, algo.process, True, block_size=BLOCK)
        return torch.cat([denoiser.block_log_probs(z[:, j * BLOCK:(j + 1) * BLOCK], times[:, j * BLOCK],
                                                   prefix=x_data[:, :j * BLOCK] if j else None) for j in range(n)], 1)

    with torch.no_grad():
        p_gen = by_blocks(algo.generator, z_t, t).exp()
        x = hard_draw(p_gen)
        z_s = algo.process.sample_posterior(z_t, x, t, s)
        teacher_log_p, aux_log_p = by_blocks(algo.teacher, z_s, s), by_blocks(algo.aux, z_s, s)
    expected = replay_loss(algo, phase, s, p_gen, x, z_s, teacher_log_p, aux_log_p)  # the config's top-p 1
    assert loss.item() == pytest.approx(expected, rel=1e-6)  # the loss comes back in float32
    assert abs(expected) > 1e-3

