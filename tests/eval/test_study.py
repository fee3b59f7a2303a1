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
    assert "| teacher | 2 |" in (first / "report.md").read_text()

    second = tmp_path / "second"
    assert cli.main([*TINY, f"run_dir={second}"]) == 0
    assert "teacher: reused from cache" in capsys.readouterr().out
    assert not (second / "teacher").exists()
