"""IDLM: the masked generator gradient against its closed form, the Duo gradient through the
models' inputs by finite differences, the soft losses against the hard ones, which network each
update moves, fake-first ordering across a resume, mode=study, and one-line refusals."""

import logging

import pytest
import torch

from mdlm_dmmd import cli
from mdlm_dmmd.algos.idlm import IDLM, renoise, soft_loss
from mdlm_dmmd.checkpoints import load_backbone, save_backbone
from mdlm_dmmd.diffusion.schedules import DuoSchedule, LogLinear
from mdlm_dmmd.diffusion.uniform import UniformProcess
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.models.dit import DiTConfig

from conftest import host_config, random_model, study_rows

VOCAB, LENGTH = 17, 64


def saved_teacher(directory, process="masked", seed=0):
    """A random tiny teacher: masked (MDLM layout), uniform with Duo's schedule, or log-linear uniform."""
    masked = process == "masked"
    model = random_model(DiTConfig(vocab_size=VOCAB + masked, length=LENGTH, hidden_dim=32, cond_dim=16, n_blocks=1,
                                   n_heads=2, dropout=0.0), seed=seed)
    if masked:
        meta = {"process": "masked", "mask_id": VOCAB, "schedule": "loglinear", "schedule_eps": 1e-3,
                "time_conditioning": False}
    else:
        schedule = DuoSchedule(VOCAB) if process == "duo" else LogLinear()
        meta = {"process": "uniform", "vocab_size": VOCAB, **schedule.meta(), "time_conditioning": True}
    return save_backbone(directory, model, meta)


def config(teacher, noise=None, **algo):
    return host_config({"name": "idlm", "teacher": str(teacher), **algo}, vocab=VOCAB, length=LENGTH, clip=None,
                       noise=noise)


DUO_NOISE = {"type": "duo", "gamma_min": -3.5, "gamma_max": -1.75}


@pytest.fixture(scope="module")
def masked(tmp_path_factory):
    return saved_teacher(tmp_path_factory.mktemp("masked"))


@pytest.fixture(scope="module")
def duo(tmp_path_factory):
    return saved_teacher(tmp_path_factory.mktemp("duo"), "duo")


def with_random_fake(algo, seed=3):
    algo.fake.load_state_dict(random_model(algo.fake.config, seed=seed).state_dict())
    return algo


def test_masked_generator_gradient_is_w_times_log_ratio_on_masked_positions(masked):
    """∂(ℓ_θ − ℓ_φ)/∂x̂ = w(t')(log x̂_φ − log x̂_θ) where z_t' is masked, 0 elsewhere; w = 1/t'
    for the log-linear schedule."""
    algo = with_random_fake(IDLM(config(masked)))
    torch.manual_seed(0)
    x_probs = torch.softmax(torch.randn(3, LENGTH, VOCAB + 1), -1)
    x_probs[..., VOCAB] = 0  # SUBS: the generator never predicts the mask
    x_probs = (x_probs / x_probs.sum(-1, keepdim=True)).requires_grad_()
    t = torch.tensor([0.9, 0.5, 0.2])
    z, _ = renoise(algo.process, x_probs, t, 1e-3)
    loss = algo.model_loss(algo.teacher, x_probs, (z, z, t)) - algo.model_loss(algo.fake, x_probs, (z, z, t))
    (grad,) = torch.autograd.grad(loss, x_probs)
    with torch.no_grad():
        log_teacher = algo.denoiser(algo.teacher)(z, t)
        log_fake = algo.denoiser(algo.fake)(z, t)
    w = 1 / t  # −α'/(1 − α) = (1 − ε)/((1 − ε)t) for α = 1 − (1 − ε)t
    expected = w[:, None, None] * (log_fake - log_teacher) * (z == VOCAB)[..., None]
    expected[..., VOCAB] = 0  # both models give the mask NEG_INF: no difference
    masked_positions = z == VOCAB
    assert masked_positions.any() and (~masked_positions).any()
    torch.testing.assert_close(grad[..., :VOCAB], expected[..., :VOCAB], rtol=1e-4, atol=1e-5)
    assert grad[~masked_positions].abs().max() == 0


def test_the_renoising_time_is_drawn_independently_of_the_generators(masked, monkeypatch):
    """The generator's t and the re-noising t' are both stratified over the batch, but t' is not in
    t's stratum (the paper's separate expectation over t'; drawn by row index, |t − t'| < 1/B)."""
    algo = IDLM(config(masked))
    drawn = []
    data_times = algo.data_times
    monkeypatch.setattr(algo, "data_times", lambda x, *a, **k: drawn.append(data_times(x, *a, **k)) or drawn[-1])
    rows = 64
    x = torch.randint(0, VOCAB, (rows, LENGTH), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    algo.phase_loss({"input_ids": x}, "gen")
    t, t_renoise = drawn  # the generator's, then the re-noising's
    strata = [((u - 1e-3) / (1 - 1e-3) * rows).floor().long() for u in (t, t_renoise)]
    assert torch.equal(strata[0], torch.arange(rows))
    assert sorted(strata[1].tolist()) == list(range(rows))  # still one t' per stratum
    assert (t - t_renoise).abs().max() > 0.5 and abs(torch.corrcoef(torch.stack([t, t_renoise]))[0, 1]) < 0.3


def test_the_generator_loss_is_the_teachers_minus_the_fakes_by_hand(masked):
    """Eq. 10 on the masked process: (ℓ_θ − ℓ_φ) / (B·L) with ℓ = Σ over positions masked in z_t'
    of (1/t')·(−Σ_v x̂_v log p(v | z_t')), x̂ the generator's SUBS probabilities at z_t."""
    algo = with_random_fake(IDLM(config(masked)))
    algo.generator.load_state_dict(random_model(algo.generator.config, seed=5).state_dict())
    x = torch.randint(0, VOCAB, (4, LENGTH), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(6)
    loss = algo.phase_loss({"input_ids": x}, "gen")
    torch.manual_seed(6)
    with torch.no_grad():
        t = algo.data_times(x)
        x_hat = algo.denoiser(algo.generator)(algo.process.corrupt(x, t), t).exp()
        t2 = algo.data_times(x, independent=True)
        z2, _ = renoise(algo.process, x_hat, t2, 1e-3)
        by_network = []
        for network in (algo.teacher, algo.fake):
            log_p = algo.denoiser(network)(z2, t2)
            cross_entropy = -(x_hat * log_p.clamp_min(-1e6))[..., :VOCAB].sum(-1)  # the mask has no mass in x̂
            by_network.append(((z2 == VOCAB) * cross_entropy / t2[:, None]).sum())
    assert (z2 == VOCAB).any() and (z2 != VOCAB).any()
    expected = (by_network[0] - by_network[1]) / x.numel()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_masked_renoise_draws_the_soft_marginal(masked):
    """z_t' ~ Cat(α x̂ + (1 − α) e_mask): at α = 1/2 and x̂ = (0.7, 0.3 on tokens 0 and 1)."""
    algo = IDLM(config(masked))
    x_probs = torch.zeros(2000, 1, VOCAB + 1)
    x_probs[..., 0], x_probs[..., 1] = 0.7, 0.3
    t = torch.full((2000,), 0.5 / (1 - 1e-3))  # α_t = 1/2
    torch.manual_seed(1)
    z, _ = renoise(algo.process, x_probs, t, 1e-3)
    freq = torch.stack([(z == c).float().mean() for c in (0, 1, VOCAB)])
    torch.testing.assert_close(freq, torch.tensor([0.35, 0.15, 0.5]), atol=0.035, rtol=0)


def test_uniform_soft_nelbo_equals_the_hard_one_on_one_hot_and_vanishes_at_the_target():
    process = UniformProcess(DuoSchedule(VOCAB), vocab_size=VOCAB)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (4, 9), generator=g)
    t = torch.rand(4, generator=g) * 0.9 + 0.05
    z = process.corrupt(x, t, generator=g)
    log_p = torch.log_softmax(torch.randn(4, 9, VOCAB, generator=g), -1)
    one_hot = torch.nn.functional.one_hot(x, VOCAB).float()
    torch.testing.assert_close(process.nelbo_soft(log_p, one_hot, z, t), process.nelbo(log_p, x, z, t), rtol=1e-4, atol=1e-5)
    x_hat = torch.softmax(torch.randn(4, 9, VOCAB, generator=g), -1)
    assert process.nelbo_soft(x_hat.log(), x_hat, z, t).abs().max() < 1e-5  # x̂_θ = x̂: nothing to learn
    assert (process.nelbo_soft(log_p, x_hat, z, t) > 0).all()


def test_masked_soft_nelbo_is_the_expected_hard_one(masked):
    """Linear in x̂: Σ_c x̂_c · nelbo(x = c) on masked positions."""
    process = IDLM(config(masked)).process
    g = torch.Generator().manual_seed(2)
    z = torch.where(torch.rand(2, 5, generator=g) < 0.6, VOCAB, torch.randint(0, VOCAB, (2, 5), generator=g))
    t = torch.tensor([0.3, 0.8])
    log_p = torch.log_softmax(torch.randn(2, 5, VOCAB + 1, generator=g), -1)
    x_hat = torch.softmax(torch.randn(2, 5, VOCAB + 1, generator=g), -1)
    expected = sum(x_hat[..., c] * process.nelbo(log_p, torch.full((2, 5), c), z, t) for c in range(VOCAB + 1))
    torch.testing.assert_close(process.nelbo_soft(log_p, x_hat, z, t), expected)


def test_duo_gradient_reaches_eta_through_the_teachers_input(duo):
    """The soft input softmax((α̃ x̂ + σ̃ ε)/τ) carries the gradient (reparameterisation): with the
    loss's target slot held fixed, autograd's directional derivative through the teacher's input
    equals a central finite difference, and it is not small."""
    algo = IDLM(config(duo, DUO_NOISE, duo_temperature=0.5))
    g = torch.Generator().manual_seed(0)
    x_hat = torch.softmax(torch.randn(2, LENGTH, VOCAB, generator=g), -1)
    t = torch.tensor([0.3, 0.7])
    eps = torch.randn(2, LENGTH, VOCAB, generator=g)
    gamma = algo.process.schedule.gamma(t)[:, None, None]
    z = (torch.sigmoid(-gamma).sqrt() * x_hat + torch.sigmoid(gamma).sqrt() * eps).argmax(-1)

    def through_input(x):  # the named function's soft input, with its noise fixed; the target slot fixed
        soft = torch.softmax((torch.sigmoid(-gamma).sqrt() * x + torch.sigmoid(gamma).sqrt() * eps) / 0.5, -1)
        log_p = algo.training_denoiser(algo.teacher)(soft, t)
        return soft_loss(algo.process, log_p, x_hat, z, t, "elbo").double().sum()

    x = x_hat.clone().requires_grad_()
    (grad,) = torch.autograd.grad(through_input(x), x)
    direction = torch.randn(x_hat.shape, generator=g)
    # The DiT computes in float32 (loss ≈ 570, rounding ≈ 570 · 6e-8 / 2h), and the O(h²) error is
    # 2% at h = 1e-2: at h = 3e-3 both stay below 0.5% (the difference converges to autograd's as h
    # falls: −1.59, −1.39, −1.365 at h = 3e-2, 1e-2, 3e-3; autograd −1.363)
    h = 3e-3
    numeric = (through_input(x_hat + h * direction) - through_input(x_hat - h * direction)) / (2 * h)
    analytic = (grad.double() * direction.double()).sum()
    assert analytic.item() == pytest.approx(numeric.item(), rel=1e-2)
    assert grad.abs().max() > 1e-3
    # the named function makes that same input: its argmax and values for one noise draw
    torch.manual_seed(4)
    soft, hard = renoise(algo.process, x_hat.float(), t.float(), 0.5)
    torch.manual_seed(4)
    noise = torch.randn(x_hat.shape)
    latent = torch.sigmoid(-gamma).sqrt().float() * x_hat.float() + torch.sigmoid(gamma).sqrt().float() * noise
    torch.testing.assert_close(soft, torch.softmax(latent / 0.5, -1))
    assert torch.equal(hard, latent.argmax(-1))


def test_duo_generator_loss_moves_only_the_generator(duo):
    algo = with_random_fake(IDLM(config(duo, DUO_NOISE, duo_temperature=0.5)))
    x = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    algo.phase_loss({"input_ids": x}, "gen").backward()
    assert all(p.grad is None for p in algo.teacher.parameters())
    assert all(p.grad is None for p in algo.fake.parameters())
    assert all(p.requires_grad for p in algo.fake.parameters())  # restored after the block
    assert sum(p.grad.abs().sum() for p in algo.generator.parameters() if p.grad is not None) > 0


def test_fake_loss_trains_only_the_fake_model(masked):
    algo = with_random_fake(IDLM(config(masked)))
    x = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    algo.phase_loss({"input_ids": x}, "aux").backward()
    assert all(p.grad is None for p in algo.generator.parameters())
    assert sum(p.grad.abs().sum() for p in algo.fake.parameters() if p.grad is not None) > 0


def run(tmp_path, name, *extra):
    args = ["algo=idlm", f"algo.teacher={tmp_path / 'teacher' / 'checkpoints' / 'final.ckpt'}", "data=digits",
            "debug=cpu", "algo.lr_generator=1e-3", "algo.lr_fake=1e-3", "trainer.val_check_interval=3",
            "trainer.limit_val_batches=0", "sampling.num_samples=0", f"run_dir={tmp_path / name}", *extra]
    assert cli.main(args) == 0
    return torch.load(tmp_path / name / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=False)


def weights(ckpt, prefix):
    return {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def cli_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("idlm_cli")
    assert cli.main(["algo=mdlm", "data=digits", "debug=cpu", "trainer.max_steps=3", "sampling.num_samples=0",
                     f"run_dir={root / 'teacher'}"]) == 0
    return root


def test_fake_goes_first_and_each_update_moves_only_its_network(cli_teacher):
    one, two = run(cli_teacher, "one", "trainer.max_steps=1"), run(cli_teacher, "two", "trainer.max_steps=2")
    start = load_backbone(cli_teacher / "teacher" / "checkpoints" / "final.ckpt").model.state_dict()  # (its EMA)
    # update 0 (fake): the generator is still the teacher, the fake model moved
    assert all(torch.equal(weights(one, "generator.")[k], start[k]) for k in start)
    assert any(not torch.equal(weights(one, "fake.")[k], start[k]) for k in start)
    # update 1 (generator): the fake model is as after update 0, the generator moved
    assert all(torch.equal(weights(two, "fake.")[k], weights(one, "fake.")[k]) for k in start)
    assert any(not torch.equal(weights(two, "generator.")[k], start[k]) for k in start)
    assert not any(k.startswith("teacher.") for k in two["state_dict"])  # reloaded from its path


def test_a_resumed_run_keeps_the_fake_first_order(cli_teacher):
    """Resumed from step 3 (after fake, gen, fake: the next update is the generator's): the final
    generator, fake model, both EMAs and the alternation state equal an uninterrupted run's."""
    straight = run(cli_teacher, "straight", "trainer.max_steps=5", "training.ema=0.9")
    mid = cli_teacher / "straight" / "checkpoints" / "step3.ckpt"
    assert torch.load(mid, map_location="cpu", weights_only=False)["idlm"]["micro_step"] == 3
    resumed = run(cli_teacher, "resumed", "trainer.max_steps=5", "training.ema=0.9", f"checkpoint={mid}")
    assert straight["idlm"]["micro_step"] == resumed["idlm"]["micro_step"] == 5
    for key in straight["state_dict"]:
        assert torch.equal(straight["state_dict"][key], resumed["state_dict"][key]), key
    for a, b in ((straight["ema"]["shadow"], resumed["ema"]["shadow"]),
                 (straight["idlm"]["fake_ema"]["shadow"], resumed["idlm"]["fake_ema"]["shadow"])):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_checkpoint_samples_at_any_k(cli_teacher):
    from mdlm_dmmd.pipeline import Pipeline

    run(cli_teacher, "sampled", "trainer.max_steps=2")
    pipeline = Pipeline.from_checkpoint(cli_teacher / "sampled" / "checkpoints" / "final.ckpt")
    assert pipeline.meta.sampling_steps is None and pipeline.meta.algo == "idlm"
    for steps in (4, 8):
        samples = pipeline.generate(3, steps=steps, generator=torch.Generator().manual_seed(0))
        assert samples.shape == (3, 64) and samples.max() < VOCAB


def test_study_trains_one_idlm_student_and_samples_it_at_every_k(tmp_path, monkeypatch):
    rows = study_rows(tmp_path, monkeypatch, "study.student_algo=idlm", "study.student_max_steps=2",
                      "study.student_steps=[2,4]")
    assert [(r["method"], r["steps"]) for r in rows] == [("IDLM", "2"), ("IDLM", "4")]
    assert [p.name for p in (tmp_path / "study").iterdir() if p.name.startswith("idlm")] == ["idlm_default"]


def test_weighting_other_than_elbo_warns(masked, caplog):
    with caplog.at_level(logging.WARNING, logger="mdlm_dmmd.algos.idlm"):
        IDLM(config(masked, weighting="constant"))
    assert "uniqueness theorem" in caplog.text


@pytest.mark.parametrize("algo, needle", [
    ({"fake_every": 0}, "algo.fake_every must be an int >= 1, got 0"),
    ({"weighting": "mse"}, "algo.weighting must be one of elbo, constant, got 'mse'"),
    ({"duo_temperature": 0}, "algo.duo_temperature must be a number > 0, got 0"),
    ({"lr_fake": -1.0}, "algo.lr_fake must be a number > 0, got -1.0"),
    ({"lr_aux": 1e-4}, "algo.lr_aux is not an idlm key"),
])
def test_bad_settings_are_one_line(masked, algo, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        IDLM(config(masked, **algo))


def test_a_uniform_teacher_without_the_gaussian_schedule_is_refused(tmp_path):
    path = saved_teacher(tmp_path / "loglinear", "loglinear")
    with pytest.raises(UserError, match="algo=idlm needs a teacher whose process has a soft marginal: .* is uniform "
                                        "with loglinear"):
        IDLM(config(path))


def test_a_public_duo_teacher_trains_on_the_gamma_schedule_and_samples_like_its_teacher(tmp_path):
    """A public Duo folder records no γ range and samples log-linear: with noise=duo, IDLM's losses
    use the Gaussian latent of that γ schedule, while its student samples (σ(t), steps) as the
    teacher does; without noise=duo the refusal says what to pass."""
    import json

    from safetensors.torch import save_file

    from mdlm_dmmd.pipeline import Pipeline

    model = random_model(DiTConfig(vocab_size=VOCAB, length=LENGTH, hidden_dim=32, cond_dim=16, n_blocks=1, n_heads=2,
                                   dropout=0.0))
    folder = tmp_path / "duo-public"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["DUO"], "model_type": "duo", "vocab_size": VOCAB, "model_length": LENGTH, "hidden_dim": 32,
        "cond_dim": 16, "n_blocks": 1, "n_heads": 2, "dropout": 0.0}))
    save_file({f"backbone.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    with pytest.raises(UserError, match="a public Duo checkpoint: pass noise=duo"):
        IDLM(config(folder))
    algo = IDLM(config(folder, DUO_NOISE))
    assert isinstance(algo.process.schedule, DuoSchedule) and algo.process.soft_corruption
    assert isinstance(algo.denoiser(algo.generator).process.schedule, LogLinear)  # sampled as the teacher is
    assert algo.checkpoint_meta()["schedule"] == "loglinear"
    x = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    assert torch.isfinite(algo.phase_loss({"input_ids": x}, "gen"))
    samples = Pipeline(algo.denoiser(algo.generator), algo.sampler(), None).generate(2, steps=4)
    assert samples.shape == (2, LENGTH)
