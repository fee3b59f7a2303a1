"""Uniform D-MMD (paper App. D): posterior-space losses, teacher-dependent defaults, errors."""


import pytest
import torch
import torch.utils.checkpoint

from mdlm_dmmd import cli
from mdlm_dmmd.algos.dmmd import DMMD, aux_loss, generator_loss
from mdlm_dmmd.checkpoints import load_backbone, save_backbone
from mdlm_dmmd.diffusion.schedules import LogLinear
from mdlm_dmmd.diffusion.uniform import UniformProcess
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.models.dit import DiT, DiTConfig

from conftest import random_model
from test_dmmd import LENGTH, VOCAB, batch, dmmd_config


def make_uniform_teacher(directory, *, loss="elbo", vocab=VOCAB):
    torch.manual_seed(1)
    model = DiT(DiTConfig(vocab_size=vocab, length=LENGTH, hidden_dim=32, cond_dim=16, n_blocks=1, n_heads=2, dropout=0.0))
    with torch.no_grad():
        model.output_layer.linear.weight.normal_(0, 0.5)
        model.output_layer.adaLN_modulation.weight.normal_(0, 0.2)
    meta = {"process": "uniform", "vocab_size": vocab, "schedule": "loglinear", "schedule_eps": 1e-3,
            "time_conditioning": True, "loss": loss}
    return save_backbone(directory, model, meta)


@pytest.fixture(scope="module")
def uniform_teacher(tmp_path_factory):
    return make_uniform_teacher(tmp_path_factory.mktemp("uniform_teacher"))


def test_defaults_follow_the_teacher(uniform_teacher):
    algo = DMMD(dmmd_config(uniform_teacher))
    assert algo.settings.loss_space == "posterior"  # ELBO-trained uniform teacher (App. D)
    assert algo.settings.aux_target == "hard"  # §3.2: uniform aux always trains on hard samples
    assert algo.settings.noise_input is False and algo.generator.config.noise_dim == 0  # §6.5
    assert algo.process.name == "uniform"


def test_generator_loss_and_gradient_are_zero_at_init(uniform_teacher):
    algo = DMMD(dmmd_config(uniform_teacher))
    loss, _ = algo.phase_loss(batch(), "gen")
    assert abs(loss.item()) < 1e-9
    loss.backward()
    grads = [p.grad for p in algo.generator.parameters() if p.grad is not None]
    assert grads and max(g.abs().max().item() for g in grads) < 1e-9


V = 5


def brute_posterior(x_probs, z, s, s_prev, schedule):
    """q(z_prev | z_s = z, x̂) by Bayes over explicit transition matrices (x̂ [V] as a prior over
    x): x ~ x̂, z_prev | x, z_s | z_prev."""
    vocab = x_probs.shape[-1]
    a = lambda u: schedule.alpha(torch.tensor(u, dtype=torch.float64))
    a_s, a_p = a(s), a(s_prev)
    eye = torch.eye(vocab, dtype=torch.float64)
    q_prev_given_x = a_p * eye + (1 - a_p) / vocab  # [x, z_prev]
    a_sp = a_s / a_p
    q_s_given_prev = a_sp * eye + (1 - a_sp) / vocab  # [z_prev, z_s]
    joint = (x_probs.double() @ q_prev_given_x) * q_s_given_prev[:, z]
    return joint / joint.sum()


def test_posterior_space_generator_loss_matches_brute_force_with_gradient():
    process = UniformProcess(LogLinear(), vocab_size=V)
    gen = torch.tensor([0.1, 0.5, 0.2, 0.15, 0.05], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([0.3, 0.3, 0.2, 0.1, 0.1], dtype=torch.float64)
    aux = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2], dtype=torch.float64)
    z, s, ds = 2, 0.6, 0.05
    t_s, t_p = torch.tensor([s], dtype=torch.float64), torch.tensor([s - ds], dtype=torch.float64)
    z_s = torch.tensor([[z]])
    pi = lambda p: process.posterior_probs(z_s, p[None, None], t_s, t_p)
    ours = generator_loss(pi(gen), torch.log(pi(teacher)), torch.log(pi(aux)), torch.tensor([[1 / ds]]))[0, 0]
    (grad_ours,) = torch.autograd.grad(ours, gen)

    gen2 = gen.detach().clone().requires_grad_(True)
    sch = LogLinear()
    bp = lambda p: brute_posterior(p, z, s, s - ds, sch)
    brute = (bp(gen2) * (torch.log(bp(aux)) - torch.log(bp(teacher)))).sum() / ds  # eq. 24
    (grad_brute,) = torch.autograd.grad(brute, gen2)
    assert ours.item() == pytest.approx(brute.item(), rel=1e-9)
    # The two expressions agree on the simplex but extend differently off it (eq. 4 divides by
    # α_t x̂[z_t] + (1−α_t)/V, which assumes Σ x̂ = 1), so the gradients may differ by c·1. Only
    # the tangent part reaches the generator: the softmax Jacobian maps 1 to 0.
    tangent = lambda g: g - g.mean()
    assert torch.allclose(tangent(grad_ours), tangent(grad_brute), rtol=1e-9, atol=1e-12)
    assert tangent(grad_ours).abs().sum() > 0


def test_posterior_space_aux_loss_is_cross_entropy_of_posteriors():
    """Eq. 26: CE(π(x)|π(φ)) + CE(π(θ)|π(φ)), checked against the brute-force posterior."""
    process = UniformProcess(LogLinear(), vocab_size=V)
    teacher = torch.tensor([0.3, 0.3, 0.2, 0.1, 0.1], dtype=torch.float64)
    aux = torch.tensor([0.1, 0.4, 0.2, 0.2, 0.1], dtype=torch.float64)
    x = torch.nn.functional.one_hot(torch.tensor(3), V).double()
    z, s, ds = 1, 0.4, 0.1
    pi = lambda p: process.posterior_probs(torch.tensor([[z]]), p[None, None], torch.tensor([s], dtype=torch.float64), torch.tensor([s - ds], dtype=torch.float64))
    ours = aux_loss(pi(x), pi(teacher), torch.log(pi(aux)), torch.tensor([[1.0]]))[0, 0]
    bp = lambda p: brute_posterior(p, z, s, s - ds, LogLinear())
    expected = -((bp(x) + bp(teacher)) * torch.log(bp(aux))).sum()
    assert ours.item() == pytest.approx(expected.item(), rel=1e-9)


@pytest.mark.parametrize("phase", ["gen", "aux"])
def test_posterior_space_loss_in_checkpointed_chunks_equals_one_pass(uniform_teacher, monkeypatch, phase):
    """The float64 posterior-space loss runs over row chunks under activation checkpointing (its
    memory bound at V = 50k); loss and gradients equal one pass over [B, L, V] without it."""
    def run():
        algo = DMMD(dmmd_config(uniform_teacher))
        for seed, network in enumerate((algo.generator, algo.aux), start=1):  # a non-zero loss
            network.load_state_dict(random_model(network.config, seed=seed).state_dict())
        torch.manual_seed(3)
        loss, _ = algo.phase_loss(batch(4), phase)
        loss.backward()
        trained = algo.generator if phase == "gen" else algo.aux
        return loss.item(), [p.grad for p in trained.parameters() if p.grad is not None]

    monkeypatch.setattr("mdlm_dmmd.algos.dmmd.POSTERIOR_CHUNK", 7 * VOCAB)  # 7 of the 256 rows per chunk
    chunked = run()
    monkeypatch.setattr("mdlm_dmmd.algos.dmmd.POSTERIOR_CHUNK", 1 << 30)
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda f, *args, use_reentrant: f(*args))
    one_pass = run()
    assert abs(one_pass[0]) > 1e-6 and chunked[0] == pytest.approx(one_pass[0], rel=1e-6)
    assert len(chunked[1]) == len(one_pass[1]) > 0
    for a, b in zip(chunked[1], one_pass[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bad_combinations_with_a_uniform_teacher(uniform_teacher, tmp_path):
    with pytest.raises(UserError, match="loss_space=x0 needs a masked teacher"):
        DMMD(dmmd_config(uniform_teacher, loss_space="x0"))
    with pytest.raises(UserError, match="aux_target=soft is only valid for masked"):
        DMMD(dmmd_config(uniform_teacher, aux_target="soft"))
    ce_teacher = make_uniform_teacher(tmp_path / "ce", loss="ce")
    assert DMMD(dmmd_config(ce_teacher, loss_space="x0")).settings.loss_space == "x0"  # CE teacher: eqs. 11-12 valid
    assert DMMD(dmmd_config(ce_teacher)).settings.loss_space == "x0"
    with_mask_slot = make_uniform_teacher(tmp_path / "v18", vocab=VOCAB + 1)
    with pytest.raises(UserError, match="vocab_size 18 does not match the data"):
        DMMD(dmmd_config(with_mask_slot))


def test_cli_distils_a_uniform_teacher(tmp_path, uniform_teacher):
    run_dir = tmp_path / "student"
    code = cli.main(["algo=dmmd", f"algo.teacher={uniform_teacher}", "data=digits", "debug=cpu", "model.length=64",
                     f"run_dir={run_dir}", "trainer.max_steps=4", "eval.metrics=[entropy]"])
    assert code == 0
    student = load_backbone(run_dir / "checkpoints" / "final.ckpt")
    assert student.meta.process == "uniform" and student.meta.sampling_rule == "generator"
    samples = torch.load(run_dir / "samples.pt", weights_only=True)
    assert samples.shape[1] == LENGTH and samples.max() < VOCAB


def test_elbo_weighting_is_refused_for_a_uniform_teacher(uniform_teacher):
    # Fix b: the uniform process has no scalar ELBO weight; this used to crash on the first step.
    with pytest.raises(UserError, match="algo.weighting=elbo needs a masked teacher"):
        DMMD(dmmd_config(uniform_teacher, weighting="elbo"))


def test_posterior_weight_uses_the_step_actually_taken():
    # Fix d: for s < ds the step is clamped to s_prev = 0, so the weight is 1/s, not 1/ds.
    from mdlm_dmmd.algos.dmmd import posterior_step_weight

    s = torch.tensor([0.5, 1e-3, 4e-4, 1e-4])
    weight = posterior_step_weight(s, 1e-3)[:, 0]
    expected = torch.tensor([1 / 1e-3, 1 / 1e-3, 1 / 4e-4, 1 / 1e-4])
    torch.testing.assert_close(weight, expected, rtol=1e-6, atol=0)
