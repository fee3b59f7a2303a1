"""mode=study: teacher, students, table, pictures; a cached teacher is reused."""

import csv
import functools

import pytest
import torch

from mdlm_dmmd import cli, registry
from mdlm_dmmd.pipeline import Pipeline

# rows are compared with Pipeline sampling: on the CPU (streams differ by device), one batch of 8
TINY = ["experiment=quickstart", "debug=cpu", "study.student_max_steps=2", "study.num_samples=8",
        "study.teacher_steps=[2,4]", "study.student_steps=[2]", "eval.metrics=[frechet,entropy]",
        "sampling.device=cpu", "sampling.batch_size=8"]


def drawn_entropy(checkpoint, steps: int) -> float:
    """Entropy of a study row drawn by hand: study.num_samples (8) samples, seed = sampling.seed (1)."""
    samples = Pipeline.from_checkpoint(checkpoint).generate(8, steps=steps, generator=torch.Generator().manual_seed(1))
    return registry.load_metric("entropy")(samples)["value"]


def checkpoint(run_dir, folder) -> dict:
    return torch.load(run_dir / folder / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=False)


def test_study_writes_table_and_pictures_and_reuses_the_teacher(tmp_path, capsys):
    first = tmp_path / "first"
    assert cli.main([*TINY, f"run_dir={first}", "study.noise_input=[true,false]"]) == 0
    assert "teacher: trained here" in capsys.readouterr().out
    with open(first / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["steps"]) for r in rows] == [
        ("teacher", "2"), ("teacher", "4"), ("D-MMD (noise input)", "2"), ("D-MMD (no noise input)", "2")]
    assert all(float(r["frechet"]) > 0 and float(r["entropy"]) > 0 for r in rows)
    assert rows[2]["noise_input"] == "True" and rows[3]["noise_input"] == "False"
    assert float(rows[2]["gen_output_entropy"]) > 0
    # each row samples its own checkpoint at its steps; each student has its k and study.student_max_steps updates
    ckpts = ["teacher", "teacher", "dmmd_k2_noise", "dmmd_k2_nonoise"]
    assert [float(r["entropy"]) for r in rows] == pytest.approx(
        [drawn_entropy(first / c / "checkpoints" / "final.ckpt", int(r["steps"])) for c, r in zip(ckpts, rows)], rel=1e-12)
    for folder in ckpts[2:]:
        student = checkpoint(first, folder)
        assert student["mdlm_dmmd"]["sampling_steps"] == 2 and student["global_step"] == 2
    for name in ("report.md", "samples.png", "pareto.png", "config.yaml"):
        assert (first / name).is_file(), name
    report = (first / "report.md").read_text()
    assert "| teacher | 2 |" in report
    # every feature space is a column (FD and KID ± s.e.); the primary space's FD is `frechet`
    for row in rows:
        assert row["frechet"] == row["fd_digits_mlp"] and float(row["fd_digits_cnn"]) > 0
        assert all(row[c] != "" for c in ("kid_digits_mlp", "kid_digits_mlp_stderr", "kid_digits_cnn_stderr"))
    assert "| fd_digits_mlp | kid_digits_mlp | fd_digits_cnn | kid_digits_cnn |" in report
    assert "`pareto.png`): frechet: FD in digits_mlp features (primary; also digits_cnn" in report

    second = tmp_path / "second"
    assert cli.main([*TINY, f"run_dir={second}"]) == 0
    assert "teacher: reused from cache" in capsys.readouterr().out
    assert not (second / "teacher").exists()


def test_student_entropy_and_noise_input_come_from_the_students_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "study"
    assert cli.main([*TINY, f"run_dir={run_dir}", "study.noise_input=[true]", "study.teacher_steps=[]",
                     "study.student_steps=[2,4]", "study.student_max_steps=4"]) == 0  # 4: two generator updates
    with open(run_dir / "results.csv") as f:
        row, row4 = list(csv.DictReader(f))
    ckpt = checkpoint(run_dir, "dmmd_k2_noise")
    recorded = ckpt["distillation"]["recent_gen_entropy"]
    assert len(recorded) == 2 and recorded[0] != recorded[1]  # their mean, not the last one
    assert float(row["gen_output_entropy"]) == sum(recorded) / len(recorded)
    assert row["noise_input"] == "True" and ckpt["mdlm_dmmd"]["backbone_config"]["noise_dim"] > 0
    # one student per k (D-MMD trains for its k), the k = 4 row drawn from its own student
    assert checkpoint(run_dir, "dmmd_k4_noise")["mdlm_dmmd"]["sampling_steps"] == 4 and row4["steps"] == "4"
    assert float(row4["entropy"]) == pytest.approx(
        drawn_entropy(run_dir / "dmmd_k4_noise" / "checkpoints" / "final.ckpt", 4), rel=1e-12)


def fails(capsys, args, *needles, run_dir):
    code = cli.main([*args, f"run_dir={run_dir}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not run_dir.exists()


def test_student_algo_must_be_an_installed_distillation_algo(tmp_path, capsys):
    run_dir = tmp_path / "study"
    fails(capsys, [*TINY, "study.student_algo=dmmdd"], "study.student_algo", "unknown algo 'dmmdd'",
          "did you mean 'dmmd'?", run_dir=run_dir)
    fails(capsys, [*TINY, "study.student_algo=mdlm"], "study.student_algo 'mdlm' is not a distillation algo",
          "its config has no teacher key", run_dir=run_dir)


TOY_CONFIG = "name: toy_distill\nteacher: null\nsampling_steps: 8\nrate: 1.0\n"


def test_student_algo_config_is_found_on_the_search_path_and_overridden(tmp_path, monkeypatch):
    """A third-party distillation algo: its config comes from its package's configs/ folder (the
    registry's search path, as for algo=NAME), with study.student_overrides on top."""
    from importlib.metadata import EntryPoint

    from mdlm_dmmd import registry
    from mdlm_dmmd.modes.study import student_algo

    pkg = tmp_path / "toy_distill_pkg"
    (pkg / "configs" / "algo").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "configs" / "algo" / "toy_distill.yaml").write_text(TOY_CONFIG)
    monkeypatch.syspath_prepend(str(tmp_path))
    real = registry._entry_points
    toy = EntryPoint("toy_distill", "toy_distill_pkg.algo:Toy", registry.ALGO_GROUP)
    monkeypatch.setattr(registry, "_entry_points", lambda group: real(group) + ([toy] if group == registry.ALGO_GROUP else []))
    cfg = cli.compose([*TINY, "study.student_algo=toy_distill", "study.noise_input=[null]",
                       "study.student_overrides.rate=0.5", "study.student_overrides.extra=3"])
    algo = student_algo(cfg)
    # the quickstart's overrides (lr_generator, lr_aux) and the command line's
    assert dict(algo) == {"name": "toy_distill", "teacher": None, "sampling_steps": 8, "rate": 0.5,
                          "lr_generator": 1e-4, "lr_aux": 3e-4, "extra": 3}


KEY_BASE = ["experiment=quickstart", "debug=cpu"]


@functools.cache
def base_teacher_key() -> str:
    from mdlm_dmmd.modes.study import teacher_key

    return teacher_key(cli.compose(KEY_BASE))


@pytest.mark.parametrize("override, changes", [
    ("algo.time_conditioning=true", True), ("model.hidden_dim=64", True), ("data=shakespeare", True),
    ("noise.eps=1e-4", True), ("optim.lr=2e-3", True), ("training.ema=0.9", True), ("loader.batch_size=64", True),
    ("trainer.max_steps=10", True), ("seed=2", True),
    ("sampling.steps=7", False), ("sampling.seed=9", False), ("study.num_samples=3", False),
    ("study.student_max_steps=5", False), ("study.teacher_steps=[8]", False), ("eval.metrics=[entropy]", False),
])
def test_the_cached_teachers_key_is_what_trains_it(override, changes):
    """A cached teacher is reused when everything that trains it is the same, whatever is sampled."""
    from mdlm_dmmd.modes.study import teacher_key

    assert (teacher_key(cli.compose([*KEY_BASE, override])) != base_teacher_key()) is changes
