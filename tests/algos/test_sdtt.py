"""SDTT: the target against two explicit teacher steps replayed by hand, the loss on masked
positions only, each divergence by hand, the round schedule, the teacher swap and per-round
checkpoints through the CLI, and one-line refusals."""

import math

import pytest
import torch

from mdlm_dmmd import cli
from mdlm_dmmd.algos.sdtt import SDTT, SDTTConfig, divergence, teacher_times
from mdlm_dmmd.checkpoints import save_backbone
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.models.dit import DiTConfig
from mdlm_dmmd.pipeline import Pipeline

from conftest import host_config, random_model, study_rows

VOCAB, LENGTH = 17, 64


def masked_teacher(directory, seed=0):
    model = random_model(DiTConfig(vocab_size=VOCAB + 1, length=LENGTH, hidden_dim=32, cond_dim=16, n_blocks=1,
                                   n_heads=2, dropout=0.0), seed=seed)
    meta = {"process": "masked", "mask_id": VOCAB, "schedule": "loglinear", "schedule_eps": 1e-3,
            "time_conditioning": False}
    return save_backbone(directory, model, meta)


def config(teacher, **algo):
    return host_config({"name": "sdtt", "teacher": str(teacher), "initial_steps": 16, "final_steps": 4,
                        "steps_per_round": 2, **algo}, vocab=VOCAB, length=LENGTH)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return masked_teacher(tmp_path_factory.mktemp("teacher"))


def test_target_is_two_explicit_teacher_steps(teacher):
    """Replay: z_t, then teacher step 1 (t → t − dt: each mask revealed w.p. (α_s − α_t)/(1 − α_t),
    its token drawn from x̂_1), then x̂_2 on the result; a position revealed in step 1 takes x̂_1."""
    algo = SDTT(config(teacher))
    x = torch.randint(0, VOCAB, (3, LENGTH), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.9, 0.5, 0.2])
    z_t = algo.process.corrupt(x, t, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    target = algo.teacher_targets(z_t, t)

    torch.manual_seed(5)
    dt, eps = 1 / 16, 1e-3
    with torch.no_grad():
        log_p1 = algo.process.log_probs(algo.teacher(z_t, torch.zeros(3)), z_t)
        reveal = ((1 - (1 - eps) * (t - dt)) - (1 - (1 - eps) * t)) / ((1 - eps) * t)  # (α_s − α_t)/(1 − α_t)
        u = torch.rand(z_t.shape, dtype=torch.float64)
        revealed = (z_t == VOCAB) & (u < reveal[:, None])
        z_1 = z_t.clone()
        cdf = log_p1[revealed].double().exp().cumsum(-1)  # inverse CDF with one uniform per position of z_t
        u = torch.rand(z_t.shape, dtype=torch.float64)[revealed][:, None] * cdf[:, -1:]  # kept where revealed
        z_1[revealed] = (cdf <= u).sum(-1)  # the first index whose CDF exceeds u
        log_p2 = algo.process.log_probs(algo.teacher(z_1, torch.zeros(3)), z_1)
    expected = torch.where(revealed[..., None], log_p1, log_p2)
    assert revealed.any() and ((z_t == VOCAB) & ~revealed).any()  # both kinds of positions occur
    torch.testing.assert_close(target, expected)


def test_official_grid_and_round_schedule():
    t = torch.tensor([0.5])
    first, first_end, second, second_end = teacher_times(t, 1 / 1024, official=True, eps=1e-3)
    end = 0.5 - 2 / 1024
    assert first.item() == pytest.approx(0.5 + 0.5 * end) and second.item() == pytest.approx(0.5 * end)  # ≈ 0.749, 0.249
    assert first_end.item() == pytest.approx(first.item() - 1 / 1024)
    assert [x.item() for x in teacher_times(t, 0.1, official=False, eps=1e-3)] == pytest.approx([0.5, 0.4, 0.4, 0.3])
    settings = SDTTConfig(initial_steps=1024, final_steps=8)
    assert settings.rounds == 7
    assert [settings.student_steps(r) for r in range(7)] == [512, 256, 128, 64, 32, 16, 8]
    assert [settings.teacher_steps(r) for r in (0, 6)] == [1024, 16]


def test_each_divergence_by_hand():
    s = torch.log(torch.tensor([[0.5, 0.3, 0.2, 1e-30]]))  # the last column is the mask
    q = torch.log(torch.tensor([[0.25, 0.25, 0.5, 1e-30]]))
    p_s, p_q = [0.5, 0.3, 0.2], [0.25, 0.25, 0.5]
    kl_bwd = sum(a * math.log(a / b) for a, b in zip(p_s, p_q))
    kl_fwd = sum(b * math.log(b / a) for a, b in zip(p_s, p_q))
    assert divergence(s, q, "kl_bwd", 3).item() == pytest.approx(kl_bwd, rel=1e-5)
    assert divergence(s, q, "kl_fwd", 3).item() == pytest.approx(kl_fwd, rel=1e-5)
    assert divergence(s, q, "mse", 3).item() == pytest.approx(sum((a - b) ** 2 for a, b in zip(p_s, p_q)) / 3, rel=1e-5)
    assert divergence(s, q, "tvd", 3).item() == pytest.approx(0.5 * sum(abs(a - b) for a, b in zip(p_s, p_q)), rel=1e-5)
    logs = [(math.log(a) - math.log(b)) for a, b in zip(p_s, p_q)] + [0.0]
    assert divergence(s, q, "mse", 3, official=True).item() == pytest.approx(sum(d * d for d in logs) / 4, rel=1e-5)
    assert divergence(s, q, "tvd", 3, official=True).item() == pytest.approx(sum(abs(d) for d in logs), rel=1e-5)


def test_loss_counts_positions_masked_in_z_t_only(teacher, monkeypatch):
    algo = SDTT(config(teacher))
    algo.student.load_state_dict(random_model(algo.student.config, seed=3).state_dict())
    x = torch.randint(0, VOCAB, (4, LENGTH), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(4)
    total, count = algo.loss({"input_ids": x})
    torch.manual_seed(4)
    t = algo.data_times(x)
    z_t = algo.process.corrupt(x, t)
    assert count == (z_t == VOCAB).sum() and total > 0
    # the student's outputs at unmasked positions do not matter (SUBS copies them, and they are not counted)
    forward = algo.student.forward
    monkeypatch.setattr(algo.student, "forward", lambda z, *a, **k: forward(z, *a, **k) + 5.0 * (z != VOCAB)[..., None])
    torch.manual_seed(4)
    assert algo.loss({"input_ids": x})[0].item() == pytest.approx(total.item(), rel=1e-6)


@pytest.mark.parametrize("official", [False, True])
@pytest.mark.parametrize("kind", ["kl_bwd", "kl_fwd", "mse", "tvd"])
def test_a_student_equal_to_its_target_costs_nothing(teacher, monkeypatch, kind, official):
    """Target = the student's own SUBS log-probs: every divergence is 0, the official log-prob forms
    too (they compare the mask column, −1e6 − logsumexp on both sides as SUBS leaves it)."""
    algo = SDTT(config(teacher, divergence=kind, official_forms=official))
    monkeypatch.setattr(algo, "teacher_targets", lambda z_t, t: algo.denoiser(algo.student)(z_t, t).detach())
    x = torch.randint(0, VOCAB, (4, LENGTH), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(4)
    total, count = algo.loss({"input_ids": x})
    assert count > 0 and total.item() == 0.0


@pytest.mark.parametrize("kind", ["kl_bwd", "kl_fwd"])
def test_the_loss_is_the_kl_in_its_direction_by_hand(teacher, monkeypatch, kind):
    """kl_bwd = Σ_masked Σ_v p_s (log p_s − log q) (the student's distribution first), kl_fwd the
    other way round, against a fixed random target q."""
    algo = SDTT(config(teacher, divergence=kind))
    algo.student.load_state_dict(random_model(algo.student.config, seed=3).state_dict())
    x = torch.randint(0, VOCAB, (4, LENGTH), generator=torch.Generator().manual_seed(2))
    logits = torch.randn(4, LENGTH, VOCAB + 1, generator=torch.Generator().manual_seed(7))
    q = torch.log_softmax(logits.index_fill(-1, torch.tensor([VOCAB]), -1e6), -1)  # SUBS: the mask has no mass
    monkeypatch.setattr(algo, "teacher_targets", lambda z_t, t: q)
    torch.manual_seed(4)
    total, _ = algo.loss({"input_ids": x})
    torch.manual_seed(4)
    t = algo.data_times(x)
    z_t = algo.process.corrupt(x, t)
    with torch.no_grad():
        p = algo.denoiser(algo.student)(z_t, t).double()
    expected = 0.0
    for b, i in (z_t == VOCAB).nonzero().tolist():
        ps, qs = p[b, i, :VOCAB].exp().tolist(), q[b, i, :VOCAB].double().exp().tolist()
        pairs = zip(ps, qs) if kind == "kl_bwd" else zip(qs, ps)
        expected += sum(a * (math.log(a) - math.log(c)) for a, c in pairs)
    assert total.item() == pytest.approx(expected, rel=1e-4)


def test_a_fresh_student_equals_its_teacher(teacher):
    algo = SDTT(config(teacher))
    assert all(torch.equal(a, b) for a, b in zip(algo.student.state_dict().values(), algo.teacher.state_dict().values()))


def test_rounds_swap_the_teacher_and_write_a_checkpoint_per_round(tmp_path):
    teacher_dir = tmp_path / "teacher"
    assert cli.main(["algo=mdlm", "data=digits", "debug=cpu", "trainer.max_steps=3", "sampling.num_samples=0",
                     f"run_dir={teacher_dir}"]) == 0
    run_dir = tmp_path / "sdtt"
    assert cli.main(["algo=sdtt", f"algo.teacher={teacher_dir / 'checkpoints' / 'final.ckpt'}", "data=digits",
                     "debug=cpu", "algo.initial_steps=8", "algo.final_steps=2", "algo.steps_per_round=2",
                     "trainer.max_steps=20", "sampling.num_samples=2", f"run_dir={run_dir}"]) == 0
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "round0_k4.ckpt").is_file() and (checkpoints / "round1_k2.ckpt").is_file()
    rounds = [torch.load(checkpoints / name, map_location="cpu", weights_only=False)
              for name in ("round0_k4.ckpt", "round1_k2.ckpt", "final.ckpt")]
    assert [c["mdlm_dmmd"]["sampling_steps"] for c in rounds] == [4, 2, 2]
    # round 1's teacher is round 0's student (raw weights): stored in the checkpoint once swapped
    student0 = {k[len("student."):]: v for k, v in rounds[0]["state_dict"].items() if k.startswith("student.")}
    teacher1 = {k[len("teacher."):]: v for k, v in rounds[1]["state_dict"].items() if k.startswith("teacher.")}
    assert rounds[1]["teacher"]["swapped"] and set(teacher1) == set(student0)
    assert all(torch.equal(teacher1[k], student0[k]) for k in student0)
    assert rounds[0]["global_step"] == 2 and rounds[1]["global_step"] == 4
    assert Pipeline.from_checkpoint(checkpoints / "round0_k4.ckpt").meta.sampling_steps == 4
    # training that ends with the last round (max_steps = rounds x steps_per_round) writes its file too
    exact = tmp_path / "exact"
    assert cli.main(["algo=sdtt", f"algo.teacher={teacher_dir / 'checkpoints' / 'final.ckpt'}", "data=digits",
                     "debug=cpu", "algo.initial_steps=8", "algo.final_steps=2", "algo.steps_per_round=2",
                     "trainer.max_steps=4", "sampling.num_samples=0", f"run_dir={exact}"]) == 0
    last, final = (torch.load(exact / "checkpoints" / name, map_location="cpu", weights_only=False)
                   for name in ("round1_k2.ckpt", "final.ckpt"))
    assert last["global_step"] == final["global_step"] == 4 and last["mdlm_dmmd"]["sampling_steps"] == 2
    assert all(torch.equal(v, final["state_dict"][k]) for k, v in last["state_dict"].items() if k.startswith("student."))


@pytest.mark.parametrize("algo, needle", [
    ({"initial_steps": 12, "final_steps": 4}, "algo.initial_steps (12) must be algo.final_steps (4) times a power of two"),
    ({"initial_steps": 8, "final_steps": 16}, "algo.final_steps (16) must be below algo.initial_steps (8)"),
    ({"steps_per_round": 0}, "algo.steps_per_round must be an int >= 1, got 0"),
    ({"divergence": "js"}, "algo.divergence must be one of kl_bwd, kl_fwd, mse, tvd, got 'js'"),
    ({"official_grid": "yes"}, "algo.official_grid must be true or false, got 'yes'"),
    ({"rounds": 3}, "algo.rounds is not an sdtt key"),
])
def test_bad_settings_are_one_line(teacher, algo, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        SDTT(config(teacher, **algo))


def test_a_max_steps_that_ends_before_the_last_round_is_refused(teacher):
    """16 -> 4 steps: 2 rounds of 2 updates; 3 updates would leave round 1's (k = 4) student half-trained."""
    short = config(teacher)
    short["trainer"]["max_steps"] = 3
    with pytest.raises(UserError, match=r"^algo=sdtt: 2 rounds \(16 -> 4 steps\) of algo.steps_per_round=2 need "
                                        r"trainer.max_steps >= 4, got 3: training would stop before the 4-step student"):
        SDTT(short)
    for enough in (4, 5, -1):  # -1: Lightning's "no limit"
        short["trainer"]["max_steps"] = enough
        SDTT(short)


def test_a_uniform_teacher_is_refused(tmp_path):
    model = random_model(DiTConfig(vocab_size=VOCAB, length=LENGTH, hidden_dim=32, cond_dim=16, n_blocks=1, n_heads=2,
                                   dropout=0.0))
    path = save_backbone(tmp_path / "uniform", model, {"process": "uniform", "vocab_size": VOCAB, "schedule": "loglinear",
                                                       "time_conditioning": True})
    with pytest.raises(UserError, match="algo=sdtt distils masked teachers only; .* is a uniform diffusion model"):
        SDTT(config(path))


def test_a_run_resumed_inside_a_later_round_equals_an_uninterrupted_one(tmp_path):
    """Rounds of 3 steps; resumed from step 4 (round 1, the teacher already swapped and stored in
    the checkpoint): the final student, EMA, optimiser and teacher equal the straight run's."""
    teacher_dir = tmp_path / "teacher"
    assert cli.main(["algo=mdlm", "data=digits", "debug=cpu", "trainer.max_steps=3", "sampling.num_samples=0",
                     f"run_dir={teacher_dir}"]) == 0
    args = ["algo=sdtt", f"algo.teacher={teacher_dir / 'checkpoints' / 'final.ckpt'}", "data=digits", "debug=cpu",
            "algo.initial_steps=8", "algo.final_steps=2", "algo.steps_per_round=3", "trainer.max_steps=20",
            "trainer.val_check_interval=2", "trainer.limit_val_batches=0", "sampling.num_samples=0"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert cli.main(args + [f"run_dir={straight}"]) == 0
    mid = torch.load(straight / "checkpoints" / "step4.ckpt", map_location="cpu", weights_only=False)
    assert mid["sdtt"]["round"] == 1 and mid["teacher"]["swapped"]
    assert cli.main(args + [f"checkpoint={straight / 'checkpoints' / 'step4.ckpt'}", f"run_dir={resumed}"]) == 0
    a, b = (torch.load(d / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=False) for d in (straight, resumed))
    assert a["global_step"] == b["global_step"] and a["sdtt"] == b["sdtt"] == {"round": 2}
    assert a["state_dict"].keys() == b["state_dict"].keys() and any(k.startswith("teacher.") for k in a["state_dict"])
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"]):
        for state_a, state_b in zip(opt_a["state"].values(), opt_b["state"].values()):
            assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_study_trains_one_sdtt_student_per_k_down_to_it(tmp_path, monkeypatch):
    """study.student_algo=sdtt: algo.final_steps is the student's k; its rounds from initial_steps."""
    rows = study_rows(tmp_path, monkeypatch, "study.student_algo=sdtt", "study.student_max_steps=3",
                      "study.student_steps=[2,4]", "+study.student_overrides={initial_steps: 8, steps_per_round: 1}")
    assert [(r["method"], r["steps"]) for r in rows] == [("SDTT", "2"), ("SDTT", "4")]
    finals = [torch.load(tmp_path / "study" / f"sdtt_k{k}_default" / "checkpoints" / "final.ckpt", map_location="cpu",
                         weights_only=False) for k in (2, 4)]
    assert [c["mdlm_dmmd"]["sampling_steps"] for c in finals] == [2, 4]
