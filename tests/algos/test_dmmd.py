"""D-MMD: losses by hand, zero gradient at init, gradient flow, phases, Δ-lowering, errors."""

import math

import pytest
import torch

from mdlm_dmmd import cli
from mdlm_dmmd.algos.distillation import NonFiniteGuard, PhaseSchedule
from mdlm_dmmd.algos.dmmd import (
    DMMD,
    aux_loss,
    distillation_times,
    generator_loss,
    modified_teacher,
    output_entropy,
)
from mdlm_dmmd.checkpoints import load_backbone, save_backbone
from mdlm_dmmd.diffusion.sampling import sample_categorical, top_p_mask
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.models.dit import DiT, DiTConfig

from conftest import host_config, random_model

VOCAB = 17  # digits: real tokens; the teacher has VOCAB + 1 with the mask
LENGTH = 64


def make_teacher(directory, *, vocab=VOCAB, seed=0, time_conditioning=False):
    """A tiny random masked 'teacher' saved as an exported directory (non-zero output head);
    time-conditioned, x̂(z, s) ≠ x̂(z, t), so the times each network sees matter."""
    torch.manual_seed(seed)
    model = DiT(DiTConfig(vocab_size=vocab + 1, length=LENGTH, hidden_dim=32, cond_dim=16, n_blocks=1, n_heads=2, dropout=0.0))
    with torch.no_grad():
        model.output_layer.linear.weight.normal_(0, 0.5)
        for block in model.blocks:
            block.adaLN_modulation.weight.normal_(0, 0.1)
    meta = {"process": "masked", "mask_id": vocab, "schedule": "loglinear", "schedule_eps": 1e-3,
            "time_conditioning": time_conditioning}
    return save_backbone(directory, model, meta)


def dmmd_config(teacher, **algo):
    return host_config({"name": "dmmd", "teacher": str(teacher), "sampling_steps": 4, "noise_dim": 8, **algo},
                       vocab=VOCAB, length=LENGTH, ema=0.999)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_teacher(tmp_path_factory.mktemp("teacher"))


def batch(n=8, seed=0):
    return {"input_ids": torch.randint(0, VOCAB, (n, LENGTH), generator=torch.Generator().manual_seed(seed))}


# -- losses on a 1-token, 3-class example, by hand ------------------------------------------
def test_generator_and_aux_loss_by_hand():
    p_gen = torch.tensor([[[0.5, 0.3, 0.2]]], requires_grad=True)
    log_teacher = torch.log(torch.tensor([[[0.6, 0.3, 0.1]]]))
    log_aux = torch.log(torch.tensor([[[0.2, 0.5, 0.3]]]))
    w = torch.tensor([[2.0]])
    gen = generator_loss(p_gen, log_teacher, log_aux, w)
    by_hand = -2.0 * (0.5 * math.log(0.6 / 0.2) + 0.3 * math.log(0.3 / 0.5) + 0.2 * math.log(0.1 / 0.3))
    assert gen.item() == pytest.approx(by_hand, rel=1e-6)
    gen.sum().backward()  # d/dp = −w (log θ − log φ)
    expected_grad = -2.0 * torch.log(torch.tensor([0.6 / 0.2, 0.3 / 0.5, 0.1 / 0.3]))
    assert torch.allclose(p_gen.grad[0, 0], expected_grad, atol=1e-6)

    x = torch.tensor([[[0.0, 1.0, 0.0]]])  # hard sample: class 1
    aux = aux_loss(x, log_teacher.exp(), log_aux, w)
    by_hand = -2.0 * ((0 + 0.6) * math.log(0.2) + (1 + 0.3) * math.log(0.5) + (0 + 0.1) * math.log(0.3))
    assert aux.item() == pytest.approx(by_hand, rel=1e-6)


def test_aux_loss_optimum_is_the_midpoint():
    """argmin_φ of −Σ (x + θ) log φ over the simplex is (x + θ)/2 (paper §3, eq. 12)."""
    x = torch.tensor([0.0, 1.0, 0.0])
    teacher = torch.tensor([0.6, 0.3, 0.1])
    logits = torch.zeros(3, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(500):
        opt.zero_grad()
        aux_loss(x, teacher, torch.log_softmax(logits, -1), torch.tensor(1.0)).backward()
        opt.step()
    assert torch.allclose(torch.softmax(logits, -1), (x + teacher) / 2, atol=1e-3)


def test_output_entropy():
    p = torch.tensor([[[0.5, 0.5], [1.0, 0.0]]])
    assert output_entropy(p, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(math.log(2))
    assert output_entropy(p, torch.tensor([[1.0, 1.0]])).item() == pytest.approx(math.log(2) / 2)


# -- times, temperature and nucleus ---------------------------------------------------------
def test_times_follow_algorithm_1():
    s, t = distillation_times(20000, 4, "cpu", torch.Generator().manual_seed(0))
    assert (t >= s).all() and (t - s <= 0.25 + 1e-7).all() and (t <= 1).all() and (s >= 0).all()
    assert (t == 1).any()  # min(1, s + δ) clips
    assert abs(s.mean().item() - 0.5) < 0.01


def test_delta_lowering_keeps_the_nucleus():
    log_p = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]), -1)
    out = modified_teacher(log_p, temperature=1.0, top_p=0.8, delta=2.0)
    inside = top_p_mask(log_p, 0.8)[0]
    assert inside.tolist() == [True, True, False, False, False]
    # inside the nucleus: ratios unchanged; outside: lowered by exactly Δ relative to inside
    diff = out[0] - log_p[0]
    assert torch.allclose(diff[inside], diff[inside][0].expand(int(inside.sum())), atol=1e-6)
    assert torch.allclose(diff[~inside], diff[inside][0] - 2.0, atol=1e-6)
    assert abs(out.exp().sum().item() - 1) < 1e-6


def test_temperature_divides_log_probs_and_mask_stays_out():
    log_p = torch.log(torch.tensor([[0.7, 0.2, 0.1, 1e-30]]))  # last entry plays the SUBS mask
    out = modified_teacher(log_p, temperature=0.5, top_p=1.0)
    expected = torch.softmax(log_p / 0.5, -1)
    assert torch.allclose(out.exp(), expected, atol=1e-6) and out.exp()[0, 3] < 1e-20
    assert modified_teacher(log_p) is log_p  # τ = 1, top-p off: untouched


# -- the algo on a tiny teacher -------------------------------------------------------------
def test_generator_equals_teacher_at_init(teacher_dir):
    algo = DMMD(dmmd_config(teacher_dir))
    z = torch.randint(0, VOCAB + 1, (2, LENGTH))
    sigma = torch.zeros(2)
    noise = algo.generator.draw_noise(2, LENGTH)
    assert noise is not None
    assert torch.equal(algo.generator(z, sigma, noise=noise), algo.teacher(z, sigma))
    assert torch.equal(algo.aux(z, sigma), algo.teacher(z, sigma))


def test_generator_loss_and_gradient_are_zero_when_aux_is_teacher(teacher_dir):
    algo = DMMD(dmmd_config(teacher_dir))
    loss, _ = algo.phase_loss(batch(), "gen")
    assert loss.item() == 0.0
    loss.backward()
    grads = [p.grad for p in algo.generator.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.fixture(scope="module")
def time_conditioned_teacher_dir(tmp_path_factory):
    return make_teacher(tmp_path_factory.mktemp("tc_teacher"), time_conditioning=True)


@pytest.mark.parametrize("teacher, temperature", [("teacher_dir", 1.0), ("time_conditioned_teacher_dir", 0.7)])
@pytest.mark.parametrize("phase,aux_target", [("gen", "hard"), ("aux", "hard"), ("aux", "soft")])
def test_phase_loss_on_the_masked_rows_equals_the_dense_formula(request, teacher, temperature, phase, aux_target):
    """The masked path gathers the tokens masked in z_t before any [., V] work; replayed here
    densely over [B, L, V] with the same draws (times, z_t, the generator's noise, reveals, then
    one inverse-CDF uniform per token of the batch, used at the revealed tokens, or at every
    masked token for the hard auxiliary target): eqs. 11-12 with ELBO weights and a top-p teacher,
    the generator's gradient (its own backward, `Expectation`) against autograd's on the dense
    formula, and the generator's output entropy (at auxiliary steps). With a time-conditioned
    teacher (and a tempered one, §3.3) the times matter: teacher and auxiliary at (z_s, s), the
    generator at (z_t, t)."""
    algo = DMMD(dmmd_config(request.getfixturevalue(teacher), aux_target=aux_target, weighting="elbo",
                            teacher_top_p=0.8, teacher_temperature=temperature))
    for seed, network in enumerate((algo.generator, algo.aux), start=1):  # three different networks
        network.load_state_dict(random_model(network.config, seed=seed).state_dict())
    data = batch(4)
    torch.manual_seed(11)
    loss, logs = algo.phase_loss(data, phase)
    if phase == "gen":
        loss.backward()
        gradients = [p.grad.clone() for p in algo.generator.parameters()]
        algo.generator.zero_grad(set_to_none=True)

    torch.manual_seed(11)
    process, x_data = algo.process, data["input_ids"]
    s, t = distillation_times(4, 4, "cpu")
    z_t = process.corrupt(x_data, t)
    with torch.set_grad_enabled(phase == "gen"):
        p_gen_grad = algo.log_probs(algo.generator, z_t, t).exp()  # [B, L, V], the noise drawn as in training
    p_gen = p_gen_grad.detach()
    with torch.no_grad():
        masked = z_t == VOCAB
        revealed = masked & (torch.rand(z_t.shape, dtype=torch.float64) < process.reveal_probability(z_t, t, s))
        drawn = masked if (phase, aux_target) == ("aux", "hard") else revealed  # x is drawn where it is used
        x = z_t.clone()
        uniforms = torch.rand(z_t.shape, dtype=torch.float64)
        x[drawn] = sample_categorical(p_gen[drawn], uniforms=uniforms[drawn])
        z_s = torch.where(revealed, x, z_t)
        log_teacher = modified_teacher(algo.log_probs(algo.teacher, z_s, s), temperature, 0.8, 2.0)
        log_aux = algo.log_probs(algo.aux, z_s, s)
    w = 1 / s.clamp_min(algo.cfg.training.sampling_eps)[:, None]  # log-linear: −α'/(1 − α) = 1/s
    if phase == "gen":
        per_token = -w * (p_gen_grad * (log_teacher - log_aux)).sum(-1)
    else:
        target = p_gen if aux_target == "soft" else torch.nn.functional.one_hot(x, VOCAB + 1).float()
        per_token = -w * ((target + log_teacher.exp()) * log_aux).sum(-1)
    expected = (per_token * (z_s == VOCAB)).sum() / z_t.numel()
    assert revealed.any() and (masked & ~revealed).any()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    if phase == "gen":
        expected.backward()
        for got, want in zip(gradients, (p.grad for p in algo.generator.parameters())):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
        assert any(g.abs().max() > 0 for g in gradients) and "gen_entropy" not in logs
        return
    entropy = -(p_gen * p_gen.clamp_min(1e-30).log()).sum(-1)[masked].mean()
    assert logs["gen_entropy"].item() == pytest.approx(entropy.item(), rel=1e-5)


def test_the_masked_phase_builds_no_full_vocabulary_tensor(teacher_dir, monkeypatch):
    """Every network call of a masked x0-space phase runs its head at the gathered tokens only:
    no [B, L, V] logits exist (the memory that stops V = 50k runs)."""
    algo = DMMD(dmmd_config(teacher_dir))
    shapes = []
    forward = DiT.forward

    def recording(network, x, *args, **kwargs):
        out = forward(network, x, *args, **kwargs)
        shapes.append((kwargs.get("logits_at") is not None, tuple(out.shape)))
        return out

    monkeypatch.setattr(DiT, "forward", recording)
    torch.manual_seed(0)
    for phase in ("gen", "aux"):
        algo.phase_loss(batch(4), phase)
    assert len(shapes) == 6 and all(gathered and len(shape) == 2 for gathered, shape in shapes)
    assert all(shape[0] < 4 * LENGTH for _, shape in shapes)


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


def run_steps(algo, n, *, accumulate=1, data=None):
    """n optimiser updates of `algo` with a fresh Lightning trainer."""
    import lightning as L

    trainer = L.Trainer(max_steps=n, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    data = data or [batch(seed=i) for i in range(n * accumulate)]
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    trainer.fit(algo, loader)
    return trainer


def test_each_phase_updates_only_its_network(teacher_dir):
    algo = DMMD(dmmd_config(teacher_dir, first_step="aux"))
    teacher, gen, aux = _snapshot(algo.teacher), _snapshot(algo.generator), _snapshot(algo.aux)
    run_steps(algo, 1)  # update 0 = aux
    assert _changed(aux, algo.aux) and not _changed(gen, algo.generator) and not _changed(teacher, algo.teacher)
    aux = _snapshot(algo.aux)
    run_steps(algo, 1)  # update 1 = gen (after aux moved, its gradient is non-zero)
    assert _changed(gen, algo.generator) and not _changed(aux, algo.aux) and not _changed(teacher, algo.teacher)


def test_phase_schedule():
    assert [PhaseSchedule("gen", 1).phase(i) for i in range(4)] == ["gen", "aux", "gen", "aux"]
    assert [PhaseSchedule("aux", 1).phase(i) for i in range(4)] == ["aux", "gen", "aux", "gen"]
    assert [PhaseSchedule("aux", 2).phase(i) for i in range(6)] == ["aux", "aux", "gen"] * 2
    assert [PhaseSchedule("gen", 2).phase(i) for i in range(6)] == ["gen", "aux", "aux"] * 2


def test_gradient_accumulation_keeps_one_phase_per_update(teacher_dir):
    config = dmmd_config(teacher_dir, first_step="aux")
    config["trainer"]["accumulate_grad_batches"] = 2
    algo = DMMD(config)
    seen = []
    original = algo.phase_loss

    def spy(b, phase):
        seen.append(phase)
        return original(b, phase)

    algo.phase_loss = spy
    trainer = run_steps(algo, 4, accumulate=2)
    assert seen == ["aux", "aux", "gen", "gen", "aux", "aux", "gen", "gen"]
    assert trainer.global_step == 4  # optimiser updates, not micro-batches


def test_training_lowers_aux_loss(teacher_dir):
    """30 aux updates against a generator that differs from the teacher: L_AUX goes down.

    (With generator = teacher the auxiliary starts near its optimum, so there is little to lower.)
    """
    algo = DMMD(dmmd_config(teacher_dir, first_step="aux", aux_steps_per_gen_step=1000, lr_aux=1e-3))
    with torch.no_grad():
        algo.generator.output_layer.linear.bias[0] += 4.0  # the generator now favours token 0
    fixed = batch(n=16, seed=3)

    def aux_loss_on_fixed_draws():
        torch.manual_seed(0)
        return sum(algo.phase_loss(fixed, "aux")[0].item() for _ in range(10)) / 10

    before = aux_loss_on_fixed_draws()
    run_steps(algo, 30, data=[fixed] * 30)
    assert aux_loss_on_fixed_draws() < 0.9 * before


def test_nonfinite_losses_are_skipped_then_stop():
    guard = NonFiniteGuard(limit=3)
    assert guard.ok(torch.tensor(1.0))
    assert not guard.ok(torch.tensor(float("nan"))) and not guard.ok(torch.tensor(float("inf")))
    assert guard.ok(torch.tensor(0.5)) and guard.total == 2 and guard.in_a_row == 0
    guard.ok(torch.tensor(float("nan")))
    guard.ok(torch.tensor(float("nan")))
    with pytest.raises(UserError, match="NaN/Inf for 3 steps in a row"):
        guard.ok(torch.tensor(float("nan")))


def test_nan_step_is_skipped_without_touching_weights(teacher_dir):
    algo = DMMD(dmmd_config(teacher_dir, first_step="aux", max_nonfinite_steps=5))
    algo.phase_loss = lambda b, phase: (torch.tensor(float("nan"), requires_grad=True), {})
    aux = _snapshot(algo.aux)
    run_steps(algo, 2)
    assert not _changed(aux, algo.aux) and algo.alternation.guard.total == 2


@pytest.mark.parametrize(
    "override,message",
    [
        ({"sampling_steps": 0}, "algo.sampling_steps"),
        ({"teacher_top_p": 0.0}, "algo.teacher_top_p"),
        ({"teacher_top_p": 1.5}, "algo.teacher_top_p"),
        ({"top_p_delta": -1.0}, "algo.top_p_delta"),
        ({"aux_target": "medium"}, "algo.aux_target"),
        ({"weighting": "cosine"}, "algo.weighting"),
        ({"teacher_temperature": 0.0}, "algo.teacher_temperature"),
        ({"bogus_key": 1}, "algo.bogus_key"),
    ],
)
def test_bad_algo_settings(teacher_dir, override, message):
    with pytest.raises(UserError, match=message):
        DMMD(dmmd_config(teacher_dir, **override))


def test_bad_teacher(tmp_path, teacher_dir):
    with pytest.raises(UserError, match="algo.teacher is required"):
        DMMD(dmmd_config(None) | {"algo": {"name": "dmmd", "teacher": None}})
    with pytest.raises(UserError, match="does not exist"):
        DMMD(dmmd_config(tmp_path / "missing"))
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    with pytest.raises(UserError):
        DMMD(dmmd_config(junk))
    other = make_teacher(tmp_path / "other", vocab=9)
    with pytest.raises(UserError, match="vocab_size 10 does not match the data"):
        DMMD(dmmd_config(other))
    shorter = host_config({"name": "dmmd", "teacher": str(teacher_dir), "sampling_steps": 4},
                          vocab=VOCAB, length=LENGTH // 2, ema=0.999)  # the teacher's positions are 64
    with pytest.raises(UserError, match=r"model.length \(32\) must equal the teacher's length \(64\)"):
        DMMD(shorter)


def test_cli_distils_a_teacher_and_student_checkpoint_restores_noise(tmp_path, teacher_dir):
    run_dir = tmp_path / "student"
    code = cli.main(["algo=dmmd", f"algo.teacher={teacher_dir}", "algo.noise_dim=8", "data=digits", "debug=cpu",
                     "model.length=64", f"run_dir={run_dir}", "trainer.max_steps=4", "eval.metrics=[entropy]"])
    assert code == 0
    ckpt = run_dir / "checkpoints" / "final.ckpt"
    student = load_backbone(ckpt)
    assert student.config.noise_dim == 8 and student.meta.sampling_rule == "generator"
    assert student.config.noise_grid == [8, 8, 1]  # image tokens (H, W, C): the noise input is a pyramid (§6.5)
    with pytest.raises(ValueError, match="noise"):
        student.model(torch.zeros(1, LENGTH, dtype=torch.long), torch.zeros(1))  # never silently noiseless
    assert (run_dir / "samples.png").is_file()
    raw = torch.load(ckpt, weights_only=True)
    assert not any(k.startswith("teacher.") for k in raw["state_dict"])  # reloaded from algo.teacher


def test_fp16_loss_scaling_is_refused_in_one_line(tmp_path, teacher_dir, capsys):
    run_dir = tmp_path / "student"
    code = cli.main(["algo=dmmd", f"algo.teacher={teacher_dir}", "data=digits", "debug=cpu", "model.length=64",
                     "trainer.precision=16-mixed", f"run_dir={run_dir}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["mdlm-dmmd: error: trainer.precision=16-mixed (fp16 loss scaling) is not supported by "
                                 "algo=dmmd; use bf16-mixed or 32-true"]


def test_noise_schedule_must_match_the_teacher(teacher_dir):
    config = dmmd_config(teacher_dir)
    config["noise"] = {"type": "loglinear", "eps": 0.01}
    with pytest.raises(UserError, match=r"noise \(loglinear, eps=0.01\) disagrees with the teacher's schedule \(loglinear, eps=0.001\)"):
        DMMD(config)


def test_noise_pyramid_follows_the_data_and_refuses_text(teacher_dir):
    config = dmmd_config(teacher_dir)
    assert DMMD(config).generator.config.noise_grid is None  # no image shape: white noise per token
    image = config | {"vocab": {"size": VOCAB, "modality": "image", "image_shape": [8, 8]}}
    assert DMMD(image).generator.config.noise_grid == [8, 8]
    assert DMMD(image | {"algo": config["algo"] | {"noise_pyramid": False}}).generator.config.noise_grid is None
    with pytest.raises(UserError, match="algo.noise_pyramid=true needs image tokens"):
        DMMD(config | {"algo": config["algo"] | {"noise_pyramid": True}})
    with pytest.raises(UserError, match="algo.noise_pyramid must be true, false or null, got 'yes'"):
        DMMD(config | {"algo": config["algo"] | {"noise_pyramid": "yes"}})


def test_noise_projection_has_its_own_learning_rate(teacher_dir):
    config = dmmd_config(teacher_dir, lr_generator=1e-4, lr_noise_input=1e-6)
    algo = DMMD(config)
    (gen_opt, aux_opt), _ = algo.configure_optimizers()
    main, noise = gen_opt.param_groups
    assert (main["lr"], noise["lr"]) == (1e-4, 1e-6)
    assert noise["params"] == [algo.generator.noise_proj.weight]
    assert len(main["params"]) + 1 == len(list(algo.generator.parameters()))
    default = DMMD(dmmd_config(teacher_dir, lr_generator=1e-4)).configure_optimizers()[0][0]
    assert [g["lr"] for g in default.param_groups] == [1e-4, 1e-4]
    plain = DMMD(dmmd_config(teacher_dir, noise_input=False)).configure_optimizers()[0][0]
    assert len(plain.param_groups) == 1
    with pytest.raises(UserError, match="algo.lr_noise_input must be > 0 or null"):
        DMMD(dmmd_config(teacher_dir, lr_noise_input=0))


def test_students_train_without_the_teachers_dropout(tmp_path):
    # Fix a: with a dropout-0.1 teacher, generator and aux used to inherit dropout 0.1, so in
    # training mode log x̂_θ − log x̂_φ was not 0 at init. Students now default to dropout 0.
    teacher = make_teacher(tmp_path / "dropout_teacher")
    import json

    config = json.loads((teacher / "config.json").read_text())
    config["dropout"] = 0.1
    (teacher / "config.json").write_text(json.dumps(config))
    algo = DMMD(dmmd_config(teacher)).train()
    assert algo.generator.training and algo.generator.config.dropout == 0.0 and algo.aux.config.dropout == 0.0
    loss, _ = algo.phase_loss(batch(), "gen")
    loss.backward()
    grads = [p.grad for p in algo.generator.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)
    with_dropout = DMMD(dmmd_config(teacher, student_dropout=0.1))
    assert with_dropout.generator.config.dropout == 0.1
    with pytest.raises(UserError, match="algo.student_dropout"):
        DMMD(dmmd_config(teacher, student_dropout=1.5))


def test_teacher_travels_in_the_checkpoint_only_once_swapped(teacher_dir):
    """The Teacher part: reloaded from its path until `swap_from` (SDTT's rounds); after it, the
    checkpoint carries the swapped weights and a resumed algo restores them, not the file's."""
    algo = DMMD(dmmd_config(teacher_dir))
    original = {k: v.clone() for k, v in algo.teacher.state_dict().items()}
    plain = {"state_dict": algo.state_dict()}
    algo.on_save_checkpoint(plain)
    assert not any(k.startswith("teacher.") for k in plain["state_dict"]) and plain["teacher"] == {"swapped": False}

    with torch.no_grad():
        for parameter in algo.generator.parameters():
            parameter.add_(0.25)
    algo.teacher_part.swap_from(algo.generator)
    assert algo.teacher_part.in_checkpoint and not algo.teacher.training
    swapped = {"state_dict": algo.state_dict()}
    algo.on_save_checkpoint(swapped)
    assert swapped["teacher"] == {"swapped": True}
    assert torch.equal(swapped["state_dict"]["teacher.output_layer.linear.weight"],
                       algo.generator.output_layer.linear.weight)

    resumed = DMMD(dmmd_config(teacher_dir))  # loads the file's teacher ...
    resumed.on_load_checkpoint(swapped)
    resumed.load_state_dict(swapped["state_dict"])  # ... and the checkpoint's swapped one replaces it
    assert resumed.teacher_part.in_checkpoint
    for key, value in resumed.teacher.named_parameters():  # (buffers such as rotary frequencies never change)
        assert torch.equal(value, algo.teacher.state_dict()[key]) and not torch.equal(value, original[key]), key

    fresh = DMMD(dmmd_config(teacher_dir))
    fresh.on_load_checkpoint(plain)
    fresh.load_state_dict(plain["state_dict"])  # strict: the teacher's weights were put back from its path
    assert not fresh.teacher_part.in_checkpoint
    assert all(torch.equal(v, original[k]) for k, v in fresh.teacher.state_dict().items())
