"""mode=study: teacher, students, table, pictures; a cached teacher is reused."""

import csv

from mdlm_dmmd import cli

TINY = ["experiment=quickstart", "debug=cpu", "study.student_max_steps=2", "study.num_samples=8",
        "study.teacher_steps=[2,4]", "study.student_steps=[2]", "eval.metrics=[frechet,entropy]"]


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
    import torch

    run_dir = tmp_path / "study"
    assert cli.main([*TINY, f"run_dir={run_dir}", "study.noise_input=[true]", "study.teacher_steps=[]"]) == 0
    with open(run_dir / "results.csv") as f:
        (row,) = list(csv.DictReader(f))
    ckpt = torch.load(run_dir / "dmmd_k2_noise" / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=False)
    recorded = ckpt["distillation"]["recent_gen_entropy"]
    assert len(recorded) >= 1
    assert float(row["gen_output_entropy"]) == sum(recorded) / len(recorded)
    assert row["noise_input"] == "True" and ckpt["mdlm_dmmd"]["backbone_config"]["noise_dim"] > 0


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
