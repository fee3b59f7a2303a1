"""Noise schedules: Duo's Gaussian-argmax schedule against Monte Carlo and its limits, derivatives
by finite differences, LogLinear's closed forms, checkpoint metadata round trips, and a tiny
`algo=udlm noise=duo` run whose checkpoint samples, resumes and distils only with its schedule."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from mdlm_dmmd import cli, registry
from mdlm_dmmd.cli import compose
from mdlm_dmmd.data import build_data
from mdlm_dmmd.diffusion import MaskedProcess, UniformProcess, process_from_meta, schedules
from mdlm_dmmd.diffusion.schedules import DuoSchedule, LogLinear, argmax_probability, build_schedule
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.pipeline import Pipeline
from mdlm_dmmd.training import vocab_info

TINY = ["data=digits", "debug=cpu", "model.length=64"]
DIGITS_V = 17


# -- Duo: p(γ) = P(argmax(α̃ e_x + σ̃ ε) = x) -----------------------------------------------------
@pytest.mark.parametrize("gamma", [-3.0, 0.0, 2.0])
def test_argmax_probability_matches_monte_carlo(gamma):
    V, n = 5, 200_000
    g = torch.Generator().manual_seed(0)
    alpha_tilde, sigma_tilde = math.sqrt(1 / (1 + math.exp(gamma))), math.sqrt(1 / (1 + math.exp(-gamma)))
    latent = sigma_tilde * torch.randn(n, V, generator=g, dtype=torch.float64)
    latent[:, 0] += alpha_tilde  # x = token 0
    hits = (latent.argmax(-1) == 0).double().mean().item()
    p = argmax_probability(torch.tensor(gamma), V)[0].item()
    assert abs(hits - p) < 4 * math.sqrt(p * (1 - p) / n), (hits, p)
    # the schedule reads the same p (t on a grid point of a table spanning [−3, 2])
    schedule = DuoSchedule(V, gamma_min=-3.0, gamma_max=2.0)
    t = torch.tensor([(gamma + 3.0) / 5.0], dtype=torch.float64)
    assert schedule.gamma(t).item() == pytest.approx(gamma)
    assert schedule.alpha(t).item() == pytest.approx((V * p - 1) / (V - 1), abs=1e-9)


@pytest.mark.parametrize("V", [2, 5, 50257])
def test_argmax_probability_limits(V):
    p, dp = argmax_probability(torch.tensor([-40.0, 40.0]), V)
    assert p[0].item() == pytest.approx(1.0, abs=1e-9)  # γ → −∞: no noise, x always wins
    assert p[1].item() == pytest.approx(1 / V, rel=1e-6)  # γ → +∞: pure noise, a uniform winner
    assert dp.abs().max().item() < 1e-6


def test_dp_dgamma_matches_finite_differences():
    gamma = torch.tensor([-4.0, -2.5, -1.0, 0.5], dtype=torch.float64)
    h = 1e-5
    for V in (5, 50257):
        _, dp = argmax_probability(gamma, V)
        fd = (argmax_probability(gamma + h, V)[0] - argmax_probability(gamma - h, V)[0]) / (2 * h)
        torch.testing.assert_close(dp, fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("V", [5, DIGITS_V, 50257])
def test_duo_alpha_decreases_within_0_1(V):
    schedule = DuoSchedule(V)
    t = torch.linspace(0, 1, 3001, dtype=torch.float64)
    alpha = schedule.alpha(t)
    assert (alpha.diff() < 0).all()
    assert (alpha > 0).all() and (alpha <= 1).all()
    assert (schedule.dalpha(t) < 0).all()


@pytest.mark.parametrize("V", [5, 50257])
def test_duo_dalpha_and_sigma(V):
    schedule = DuoSchedule(V, gamma_min=-4.0, gamma_max=-1.0)
    t = torch.tensor([0.0123, 0.2, 0.5004, 0.77, 0.9871], dtype=torch.float64)
    h = 1e-3  # one table step: the interpolated α is piecewise linear
    fd = (schedule.alpha(t + h) - schedule.alpha(t - h)) / (2 * h)
    torch.testing.assert_close(schedule.dalpha(t), fd, rtol=2e-4, atol=1e-6)
    # against the exact integral too (chain rule: dα/dt = V/(V−1) · dp/dγ · (γ_max − γ_min))
    _, dp = argmax_probability(schedule.gamma(t), V)
    torch.testing.assert_close(schedule.dalpha(t), V / (V - 1) * dp * 3.0, rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(schedule.sigma(t), -torch.log(schedule.alpha(t)))
    t32 = t.float()  # float32 in, float32 out (as LogLinear)
    assert schedule.alpha(t32).dtype == schedule.dalpha(t32).dtype == schedule.sigma(t32).dtype == torch.float32


def test_duo_equality_is_on_parameters_only():
    a, b = DuoSchedule(5), DuoSchedule(5)
    a.alpha(torch.tensor([0.5]))  # builds and caches the table
    assert a == b and hash(a) == hash(b)
    assert a != DuoSchedule(5, gamma_max=-1.0) and a != DuoSchedule(6) and a != LogLinear()


# -- LogLinear -----------------------------------------------------------------------------------
def test_loglinear_closed_forms():
    schedule = LogLinear(eps=1e-3)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(schedule.alpha(t), 1 - 0.999 * t)
    torch.testing.assert_close(schedule.dalpha(t), torch.full_like(t, -0.999))
    torch.testing.assert_close(schedule.sigma(t), -torch.log(1 - 0.999 * t))
    assert schedule.alpha(torch.tensor(1.0, dtype=torch.float64)).item() == pytest.approx(1e-3)


# -- config and checkpoint metadata ---------------------------------------------------------------
def test_build_schedule():
    assert build_schedule(OmegaConf.create({"type": "loglinear", "eps": 0.01})) == LogLinear(eps=0.01)
    duo = compose(["noise=duo"]).noise
    assert build_schedule(duo, 17) == DuoSchedule(17, gamma_min=-3.5, gamma_max=-1.75, num_points=1001)
    with pytest.raises(UserError, match="uniform-state"):
        build_schedule(duo)  # no vocabulary size: a masked caller
    bad = OmegaConf.create({"type": "duo", "gamma_min": -1.0, "gamma_max": -2.0, "num_points": 1})
    with pytest.raises(UserError, match="noise.gamma_min.*noise.num_points"):
        build_schedule(bad, 17)
    with pytest.raises(UserError, match="noise.type 'cosine'.*loglinear, duo"):
        build_schedule(OmegaConf.create({"type": "cosine"}), 17)


def test_meta_round_trip():
    process = UniformProcess(DuoSchedule(7, gamma_min=-4.0, gamma_max=-1.0, num_points=501), vocab_size=7)
    rebuilt, time_conditioning = process_from_meta(process.meta(), network_vocab=7)
    assert rebuilt == process and time_conditioning
    for process in (UniformProcess(LogLinear(eps=0.01), vocab_size=7), MaskedProcess(LogLinear(eps=0.01), mask_id=6)):
        assert process_from_meta(process.meta(), network_vocab=7)[0] == process


def test_old_style_meta_still_loads():
    old = {"process": "uniform", "vocab_size": 7, "schedule": "loglinear", "schedule_eps": 0.01}
    assert process_from_meta(old, 7)[0] == UniformProcess(LogLinear(eps=0.01), vocab_size=7)
    assert process_from_meta({"process": "masked", "schedule": "loglinear"}, 7)[0] == MaskedProcess(LogLinear(), mask_id=6)
    assert process_from_meta({}, 7)[0] == MaskedProcess(LogLinear(), mask_id=6)


def test_bad_schedule_meta():
    with pytest.raises(UserError, match=r"checkpoint x: schedule 'cosine' is not supported; accepted: loglinear, duo"):
        process_from_meta({"process": "uniform", "schedule": "cosine"}, 7, source="checkpoint x")
    with pytest.raises(UserError, match="masked"):
        process_from_meta({"process": "masked", **DuoSchedule(6).meta()}, 7)
    with pytest.raises(UserError, match="vocab_size 5"):
        process_from_meta({"process": "uniform", "vocab_size": 7, **DuoSchedule(5).meta()}, 7)


# -- end to end: algo=udlm noise=duo -------------------------------------------------------------
@pytest.fixture(scope="module")
def duo_teacher(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("duo") / "run"
    code = cli.main(["algo=udlm", "noise=duo", *TINY, "trainer.max_steps=2", "sampling.num_samples=0", f"run_dir={run_dir}"])
    assert code == 0
    return run_dir / "checkpoints" / "final.ckpt"


def refused(capsys, args, *needles):
    code = cli.main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def test_udlm_duo_checkpoint_samples_with_its_schedule(duo_teacher):
    pipeline = Pipeline.from_checkpoint(duo_teacher)
    assert pipeline.denoiser.process == pipeline.sampler.process == UniformProcess(DuoSchedule(DIGITS_V), vocab_size=DIGITS_V)
    samples = pipeline.generate(2, steps=4, generator=torch.Generator().manual_seed(0), noise_removal="greedy")
    assert samples.shape == (2, 64) and 0 <= samples.min() and samples.max() < DIGITS_V


def test_distilling_the_duo_teacher_needs_its_schedule(capsys, duo_teacher, tmp_path):
    err = refused(capsys, ["algo=dmmd", f"algo.teacher={duo_teacher}", "noise=loglinear", *TINY,
                           f"run_dir={tmp_path / 'student'}"], "noise (loglinear, eps=0.001)",
                  "teacher's schedule (duo, vocab_size=17, gamma_min=-3.5, gamma_max=-1.75")
    assert "noise=duo" in err and not (tmp_path / "student").exists()
    cfg = compose(["algo=dmmd", f"algo.teacher={duo_teacher}", "noise=duo", *TINY])
    config = OmegaConf.to_container(cfg, resolve=True)
    config["vocab"] = vocab_info(build_data(cfg.data, cfg.model.length))
    student = registry.load_algo("dmmd")(config)
    assert student.process.schedule == DuoSchedule(DIGITS_V)
    assert student.checkpoint_meta()["schedule"] == "duo"


def test_resume_needs_the_same_schedule(capsys, duo_teacher, tmp_path):
    refused(capsys, ["algo=udlm", "noise=duo", "noise.gamma_max=-1.0", *TINY, f"checkpoint={duo_teacher}",
                     f"run_dir={tmp_path / 'a'}"], "schedule_gamma_max=-1.75", "schedule_gamma_max=-1.0")
    refused(capsys, ["algo=udlm", *TINY, f"checkpoint={duo_teacher}", f"run_dir={tmp_path / 'b'}"],
            "schedule='duo'", "schedule='loglinear'")


def test_mdlm_refuses_duo(capsys, tmp_path):
    refused(capsys, ["algo=mdlm", "noise=duo", *TINY, f"run_dir={tmp_path / 'run'}"], "noise=duo", "algo=mdlm")


def test_udlm_duo_loss_is_finite():
    cfg = compose(["algo=udlm", "noise=duo", *TINY])
    config = OmegaConf.to_container(cfg, resolve=True)
    config["vocab"] = vocab_info(build_data(cfg.data, cfg.model.length))
    algo = registry.load_algo("udlm")(config)
    assert algo.process.schedule == DuoSchedule(DIGITS_V)
    x = torch.randint(0, DIGITS_V, (4, 64), generator=torch.Generator().manual_seed(0))
    total, count = algo.loss({"input_ids": x})
    assert torch.isfinite(total) and total > 0 and count == 4 * 64


def test_duo_integral_cache_first_built_while_sampling_stays_usable_in_training():
    """Pipeline.generate samples under torch.inference_mode; a table cached then must not be an
    inference tensor (those cannot be saved for backward nor written outside inference mode)."""
    schedules._integral_cache.cache_clear()
    with torch.inference_mode():
        table = schedules._integral_cache(7, -3.0, 3.0, 64, "cpu")
    assert not table.is_inference()
    schedules._integral_cache.cache_clear()


def test_build_schedule_eps_bounds():
    """noise.eps ∈ [0, 1): 0 is a valid log-linear schedule (α(1) = 0); 1 and negatives are refused."""
    assert build_schedule(OmegaConf.create({"type": "loglinear", "eps": 0.0})) == LogLinear(eps=0.0)
    for bad in (1.0, -0.1):
        with pytest.raises(UserError, match="noise.eps must be in"):
            build_schedule(OmegaConf.create({"type": "loglinear", "eps": bad}))


def test_duo_schedule_refuses_a_single_token_vocabulary():
    """α = (V p − 1)/(V − 1) divides by V − 1: V = 1 is refused at construction."""
    with pytest.raises(ValueError, match="vocab_size >= 2"):
        DuoSchedule(1)
    assert DuoSchedule(2).vocab_size == 2
