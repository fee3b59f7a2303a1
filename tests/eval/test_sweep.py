"""mode=sweep: methods × steps × top-p rows, the Data / AR / quoted rows, tables and pictures, and
one-line refusals (a reference model that would judge itself, bad entries) that write nothing."""

import csv
import os
from pathlib import Path

import pytest
import torch

from mdlm_dmmd import registry
from mdlm_dmmd.cli import compose, main
from mdlm_dmmd.data import build_data
from mdlm_dmmd.eval.scoring import held_out_rows
from mdlm_dmmd.eval.sweep import output, plan
from mdlm_dmmd.eval.tables import value_stderr
from mdlm_dmmd.pipeline import Pipeline

TINY = ["data=digits", "debug=cpu", "model.length=64"]
# sampling.device=cpu: rows are compared with Pipeline sampling on the CPU (streams differ by device)
SWEEP = ["mode=sweep", "data=digits", "model.length=64", "seed=3", "sweep.num_samples=8", "sampling.device=cpu"]


def train(root: Path, *extra) -> Path:
    assert main([*TINY, f"run_dir={root}", "sampling.num_samples=0", *extra]) == 0
    return root / "checkpoints" / "final.ckpt"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def ar(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("ar"), "algo=ar")


def methods(*entries: dict) -> str:
    """`sweep.methods=[...]` in Hydra's override grammar (paths quoted)."""
    def value(v):
        if isinstance(v, (str, Path)):
            return f"'{v}'"
        if isinstance(v, list):
            return "[" + ", ".join(map(str, v)) + "]"
        return "null" if v is None else str(v)

    return "sweep.methods=[" + ", ".join("{" + ", ".join(f"{k}: {value(v)}" for k, v in e.items()) + "}"
                                         for e in entries) + "]"


def read_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def fails(capsys, args, *needles, run_dir: Path):
    """Exit 2, one stderr line naming every needle, and nothing written."""
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("mdlm-dmmd: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not run_dir.exists()


# -- the sweep --------------------------------------------------------------------------------------
def test_sweep_table_matches_direct_sampling_and_scoring(teacher, tmp_path, monkeypatch):
    calls = []
    measure = plan.measure
    monkeypatch.setattr(plan, "measure", lambda *a, **k: calls.append(a[2:]) or measure(*a, **k))
    literature = tmp_path / "literature.csv"
    literature.write_text("method,steps,frechet,frechet_stderr,entropy,note\nOld method,8,123.5,4.5,,Table 9\n")
    run_dir = tmp_path / "sweep"
    grid = {"checkpoint": teacher, "steps": [2, 4], "top_p": [1.0, 0.9]}
    assert main([*SWEEP, f"run_dir={run_dir}", "eval.metrics=[entropy,frechet]", f"sweep.literature_csv={literature}",
                 methods({"name": "Teacher", **grid}, {"name": "Copy", **grid})]) == 0
    rows = read_rows(run_dir)

    # 1. one row per method x steps x top-p in config order, then Data, then the quoted row
    expected = [(m, s, p) for m in ("Teacher", "Copy") for s in ("2", "4") for p in ("1.0", "0.9")]
    assert [(r["method"], r["steps"], r["top_p"]) for r in rows[:8]] == expected
    assert [(r["method"], r["source"]) for r in rows[8:]] == [("Data", "data"), ("Old method", "quoted")]
    for column in ("label", "distill_top_p", "temperature", "entropy", "entropy_stderr", "frechet", "checkpoint"):
        assert column in rows[0]
    assert rows[1]["label"] == "Teacher (p = 0.90)" and rows[1]["distill_top_p"] == ""
    # an RGB grid per sweep point (image data); the Copy rows are the Teacher's draws, copied
    assert sorted(p.name for p in (run_dir / "grids").iterdir()) == sorted(
        f"{m}_{s}steps_p{p}.png" for m in ("Teacher", "Copy") for s in (2, 4) for p in ("1", "0.9"))
    assert (run_dir / "grids" / "Copy_4steps_p0.9.png").read_bytes() == \
        (run_dir / "grids" / "Teacher_4steps_p0.9.png").read_bytes()

    # 2. a row equals sampling through Pipeline with the same seed and scoring directly
    samples = Pipeline.from_checkpoint(teacher).generate(8, steps=4, generator=torch.Generator().manual_seed(3), top_p=0.9)
    data_cfg = compose(["data=digits"]).data
    row = rows[3]
    assert float(row["entropy"]) == pytest.approx(registry.load_metric("entropy")(samples)["value"], rel=1e-12)
    assert float(row["frechet"]) == pytest.approx(registry.load_metric("frechet")(samples, data_config=data_cfg)["value"], rel=1e-9)
    # every row uses the same seed, so the same checkpoint under another name would give the same
    # numbers: those jobs are sampled once (4 calls for 8 rows) and their rows repeat the numbers
    assert calls == [(s, p) for s in (2, 4) for p in (1.0, 0.9)]
    assert [r["entropy"] for r in rows[:4]] == [r["entropy"] for r in rows[4:8]]
    assert rows[4]["method"] == "Copy" and rows[4]["label"] == "Copy (p = 1.00)"

    # 3. the Data row scores 8 held-out images drawn with the seed; far closer to data than the model
    valid = build_data(data_cfg, 64).valid
    index = torch.randperm(len(valid), generator=torch.Generator().manual_seed(3))[:8]
    data = torch.stack([valid[int(i)]["input_ids"] for i in index])
    data_row = rows[8]
    assert data_row["steps"] == "" and data_row["num_samples"] == "8"
    assert float(data_row["entropy"]) == pytest.approx(registry.load_metric("entropy")(data)["value"], rel=1e-12)
    assert float(data_row["frechet"]) < min(float(r["frechet"]) for r in rows[:8])

    # 4. the quoted row keeps its numbers and is marked
    quoted = rows[9]
    assert quoted["label"] == "Old method (quoted)" and quoted["steps"] == "8"
    assert float(quoted["frechet"]) == 123.5 and float(quoted["frechet_stderr"]) == 4.5 and quoted["entropy"] == ""

    # 5. results.md: one NFE table per metric (Table 2's shape) and every row with ± stderr
    report = (run_dir / "results.md").read_text()
    assert "## frechet: FD in digits_mlp features (primary; also digits_cnn (fd_*, kid_* columns)) vs NFE" in report and "## entropy vs NFE" in report
    assert "| method | 2 | 4 | 8 | — |" in report  # frechet: NFE columns, then the Data column
    assert f"| Teacher (p = 0.90) | {value_stderr(float(rows[1]['frechet']))} | {value_stderr(float(rows[3]['frechet']))} |  |  |" in report
    assert "| Old method (quoted) |  |  | 123.5 |  |" in report
    assert f"| Data |  |  |  |  | {value_stderr(float(data_row['entropy']))} ± " in report  # NFE, top-p, T blank
    for name in ("nfe_entropy.png", "nfe_frechet.png", "config.yaml"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "gen_ppl_vs_entropy.png").exists()  # no gen-PPL measured


def test_judge_metrics_trade_off_pictures(teacher, ar, tmp_path):
    """GM and gen-PPL with an `ar` reference on digits: every metric, all three pictures."""
    run_dir = tmp_path / "sweep"
    assert main([*SWEEP, f"run_dir={run_dir}", "eval.metrics=[entropy,gen_ppl,gradient_moment]",
                 f"+eval.metric_options.gen_ppl.reference='{ar}'", f"+eval.metric_options.gradient_moment.reference='{ar}'",
                 "+eval.metric_options.gradient_moment.batch_size=2",
                 methods({"name": "Teacher", "checkpoint": teacher, "steps": [2, 4]})]) == 0
    rows = read_rows(run_dir)
    assert [r["method"] for r in rows] == ["Teacher", "Teacher", "Data"]
    assert all(float(r[m]) == float(r[m]) for r in rows for m in ("gen_ppl", "gradient_moment", "entropy"))
    for name in ("nfe_gen_ppl.png", "nfe_gradient_moment.png", "gen_ppl_vs_entropy.png", "gm_vs_gen_ppl.png"):
        assert (run_dir / name).is_file(), name


def test_two_references_give_a_column_each_and_the_first_is_primary(teacher, ar, tmp_path):
    from conftest import write_ar_checkpoint

    other = write_ar_checkpoint(tmp_path / "ar_random", vocab=17, length=64, seed=5)
    run_dir = tmp_path / "sweep"
    assert main([*SWEEP, f"run_dir={run_dir}", "eval.metrics=[gradient_moment]", "sweep.reference_rows=false",
                 f"+eval.metric_options.gradient_moment.reference=['{ar}','{other}']",
                 "+eval.metric_options.gradient_moment.batch_size=2",
                 methods({"name": "Teacher", "checkpoint": teacher, "steps": [2]})]) == 0
    (row,) = read_rows(run_dir)
    label = ar.parent.parent.name  # the run folder of RUN/checkpoints/final.ckpt
    assert row["gradient_moment"] == row[f"gm_{label}"] and row["gradient_moment_stderr"] == row[f"gm_{label}_stderr"]
    assert float(row["gm_ar_random"]) != float(row[f"gm_{label}"]) and row["gm_ar_random_stderr"] != ""
    report = (run_dir / "results.md").read_text()
    assert f"## gm_{label} vs NFE" in report and "## gm_ar_random vs NFE" in report
    assert (run_dir / "nfe_gm_ar_random.png").is_file()


def test_ar_baseline_is_sampled_with_length_steps(teacher, ar, tmp_path):
    run_dir = tmp_path / "sweep"
    assert main([*SWEEP, f"run_dir={run_dir}", "eval.metrics=[entropy]", "sweep.reference_rows=false",
                 f"sweep.ar_baseline='{ar}'", methods({"name": "Teacher", "checkpoint": teacher, "steps": [2]})]) == 0
    rows = read_rows(run_dir)
    assert [(r["method"], r["steps"], r["top_p"]) for r in rows] == [("Teacher", "2", "1.0"), ("AR baseline", "64", "1.0")]
    expected = Pipeline.from_checkpoint(ar).generate(8, steps=64, generator=torch.Generator().manual_seed(3))
    assert float(rows[1]["entropy"]) == pytest.approx(registry.load_metric("entropy")(expected)["value"], rel=1e-12)


def test_greedy_tail_rows_count_its_extra_call(teacher, ar, tmp_path):
    run_dir = tmp_path / "sweep"
    assert main([*SWEEP, f"run_dir={run_dir}", "eval.metrics=[entropy]", "sweep.reference_rows=false",
                 "sampling.noise_removal=greedy_tail", f"sweep.ar_baseline='{ar}'",
                 methods({"name": "Teacher", "checkpoint": teacher, "steps": [2]})]) == 0
    rows = read_rows(run_dir)
    assert [(r["method"], r["steps"], r["nfe"]) for r in rows] == [("Teacher", "2", "3"), ("AR baseline", "64", "64")]
    expected = Pipeline.from_checkpoint(teacher).generate(8, steps=2, generator=torch.Generator().manual_seed(3),
                                                          noise_removal="greedy_tail")
    assert float(rows[0]["entropy"]) == pytest.approx(registry.load_metric("entropy")(expected)["value"], rel=1e-12)


def entropy_of(path: Path, steps: int, **options) -> float:
    """Entropy of 8 samples drawn through Pipeline with seed 3 (a sweep row's draw, done by hand)."""
    samples = Pipeline.from_checkpoint(path).generate(8, steps=steps, generator=torch.Generator().manual_seed(3), **options)
    return registry.load_metric("entropy")(samples)["value"]


def test_entries_default_to_sampling_top_p_and_temperature_and_each_keeps_its_own(teacher, ar, tmp_path, monkeypatch):
    """A takes sampling.top_p and sampling.temperature; B sets its own temperature (a separate
    draw, though checkpoint, steps and top-p are A's); the AR baseline samples with sweep.ar_top_p
    and sampling.temperature; a metric only quoted (gen_ppl) gets its column from the first
    results.csv on (a sweep that dies keeps the quoted numbers) and its table."""
    snapshots = []  # results.csv after each write (after every row, then the final one)
    write_csv = output.write_csv
    monkeypatch.setattr(output, "write_csv", lambda d, *a: write_csv(d, *a) or snapshots.append(read_rows(d)))
    literature = tmp_path / "literature.csv"
    literature.write_text("method,steps,gen_ppl\nQ,8,40.0\n")
    run_dir = tmp_path / "sweep"
    assert main([*SWEEP, f"run_dir={run_dir}", "eval.metrics=[entropy]", "sweep.reference_rows=false",
                 "sampling.top_p=0.9", "sampling.temperature=0.5", f"sweep.ar_baseline='{ar}'", "sweep.ar_top_p=0.8",
                 f"sweep.literature_csv={literature}",
                 methods({"name": "A", "checkpoint": teacher, "steps": [2]},
                         {"name": "B", "checkpoint": teacher, "steps": [2], "top_p": [0.9], "temperature": 1.0})]) == 0
    a, b, baseline, quoted = read_rows(run_dir)
    assert [(r["label"], r["top_p"], r["temperature"]) for r in (a, b, baseline)] == [
        ("A (p = 0.90, T = 0.5)", "0.9", "0.5"), ("B (p = 0.90)", "0.9", "1.0"),
        ("AR baseline (p = 0.80, T = 0.5)", "0.8", "0.5")]
    assert float(a["entropy"]) == pytest.approx(entropy_of(teacher, 2, top_p=0.9, temperature=0.5), rel=1e-12)
    assert float(b["entropy"]) == pytest.approx(entropy_of(teacher, 2, top_p=0.9), rel=1e-12)
    assert float(a["entropy"]) != float(b["entropy"])
    assert float(baseline["entropy"]) == pytest.approx(entropy_of(ar, 64, top_p=0.8, temperature=0.5), rel=1e-12)
    assert quoted["label"] == "Q (quoted)" and float(quoted["gen_ppl"]) == 40.0 and quoted["entropy"] == ""
    assert len(snapshots) == 4 and all(rows[-1].get("gen_ppl") == "40.0" for rows in snapshots)
    report = (run_dir / "results.md").read_text()
    assert "## gen_ppl vs NFE\n\n| method | 8 |\n|---|---|\n| Q (quoted) | 40 |" in report
    assert (run_dir / "nfe_gen_ppl.png").is_file()


def test_an_ar_baseline_trained_on_other_data_is_refused(teacher, ar, tmp_path, capsys):
    """The AR baseline's data is checked as each method's is: a digits AR model would score
    Shakespeare's ids as pixels."""
    run_dir = tmp_path / "sweep"
    fails(capsys, ["mode=sweep", "data=shakespeare", "model.length=64", f"run_dir={run_dir}", "eval.metrics=[entropy]",
                   f"sweep.ar_baseline='{ar}'", methods({"name": "T", "checkpoint": teacher, "steps": [2]})],
          f"sweep.ar_baseline '{ar}' was trained on data 'digits' but the sweep scores against data=shakespeare",
          f"sweep.methods.0.checkpoint '{teacher}' was trained on data 'digits'", run_dir=run_dir)


def test_student_at_its_own_k_keeps_its_distillation_top_p(teacher, tmp_path):
    student = train(tmp_path / "student", "algo=dmmd", f"algo.teacher={teacher}", "algo.sampling_steps=2",
                    "algo.teacher_top_p=0.9", "trainer.max_steps=2", "trainer.limit_val_batches=0")
    run_dir = tmp_path / "sweep"
    assert main([*SWEEP, f"run_dir={run_dir}", "eval.metrics=[entropy]", "sweep.reference_rows=false",
                 methods({"name": "D-MMD", "checkpoint": student, "steps": None, "top_p": [1.0, 0.8], "distill_top_p": 0.9})]) == 0
    rows = read_rows(run_dir)
    assert [(r["steps"], r["distill_top_p"], r["top_p"], r["label"]) for r in rows] == [
        ("2", "0.9", "1.0", "D-MMD (p = 0.90/1.00)"), ("2", "0.9", "0.8", "D-MMD (p = 0.90/0.80)")]


def test_a_students_distill_top_p_comes_from_the_entry_when_its_checkpoint_records_none(teacher, tmp_path):
    """An SDTT student records its teacher (and k) but no teacher_top_p: the entry's labels it."""
    student = train(tmp_path / "sdtt", "algo=sdtt", f"algo.teacher={teacher}", "algo.initial_steps=4",
                    "algo.final_steps=2", "algo.steps_per_round=2", "trainer.max_steps=2", "trainer.limit_val_batches=0")
    assert Pipeline.from_checkpoint(student).meta.teacher_top_p is None
    run_dir = tmp_path / "sweep"
    assert main([*SWEEP, f"run_dir={run_dir}", "eval.metrics=[entropy]", "sweep.reference_rows=false",
                 methods({"name": "SDTT", "checkpoint": student, "steps": None, "distill_top_p": 0.9})]) == 0
    (row,) = read_rows(run_dir)
    assert (row["steps"], row["distill_top_p"], row["top_p"], row["label"]) == ("2", "0.9", "1.0", "SDTT (p = 0.90/1.00)")


def test_plots_without_steps_or_with_quoted_rows(tmp_path):
    rows = [
        {"method": "A", "label": "A", "source": "measured", "steps": 4, "gen_ppl": 30.0, "entropy": 5.1, "gradient_moment": 0.3,
         "gradient_moment_stderr": 0.02},
        {"method": "A", "label": "A", "source": "measured", "steps": 8, "gen_ppl": 25.0, "entropy": 5.2, "gradient_moment": 0.2},
        {"method": "B", "label": "B (quoted)", "source": "quoted", "steps": 4, "gen_ppl": 80.0, "entropy": 5.0},
        {"method": "Data", "label": "Data", "source": "data", "steps": "", "gen_ppl": 15.4, "entropy": 5.44, "gradient_moment": 0.0},
    ]
    written = output.write_plots(tmp_path, rows, ["gradient_moment", "gen_ppl", "entropy"])
    assert written == ["nfe_gradient_moment.png", "nfe_gen_ppl.png", "nfe_entropy.png",
                       "gen_ppl_vs_entropy.png", "gm_vs_gen_ppl.png"]
    assert all((tmp_path / name).stat().st_size > 0 for name in written)


def test_plots_draw_steps_in_order_quoted_rows_dotted_and_tradeoff_axes_as_named(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from mdlm_dmmd.eval import plots

    calls = []
    for name in ("plot", "errorbar", "scatter"):
        real = getattr(Axes, name)
        monkeypatch.setattr(Axes, name, lambda self, *a, _name=name, _real=real, **k:
                            calls.append((_name, a, k)) or _real(self, *a, **k))
    rows = [
        {"method": "A", "source": "measured", "steps": 8, "gen_ppl": 25.0, "entropy": 5.2},
        {"method": "A", "source": "measured", "steps": 4, "gen_ppl": 30.0, "entropy": 5.1},
        {"method": "B", "source": "quoted", "steps": 4, "gen_ppl": 80.0, "gen_ppl_stderr": 2.0, "entropy": 5.0},
    ]
    plots.metric_vs_steps(rows, "gen_ppl", tmp_path / "nfe.png")
    assert [(n, a, k["label"], k["marker"], k.get("linestyle")) for n, a, k in calls] == [
        ("plot", ((4, 8), (30.0, 25.0)), "A", "o", None), ("plot", ((4,), (80.0,)), "B", "x", ":")]
    calls.clear()
    plots.metric_vs_steps(rows, "gen_ppl", tmp_path / "nfe_err.png", errorbars=True)
    (name, args, options) = calls[-1]  # B has a stderr: error bars, still dotted with x markers
    assert name == "errorbar" and args == ((4,), (80.0,)) and options["yerr"] == [2.0]
    assert (options["marker"], options["linestyle"]) == ("x", ":")
    calls.clear()
    plots.tradeoff(rows, "entropy", "gen_ppl", tmp_path / "tradeoff.png")
    assert [(n, a, k["marker"]) for n, a, k in calls] == [
        ("scatter", ([5.2, 5.1], [25.0, 30.0]), "o"), ("scatter", ([5.0], [80.0]), "x")]


# -- refusals ---------------------------------------------------------------------------------------
def test_reference_model_never_judges_itself(teacher, ar, tmp_path, capsys):
    run_dir = tmp_path / "sweep"
    # the AR baseline is the GM reference
    fails(capsys, [*SWEEP, f"run_dir={run_dir}", "eval.metrics=[entropy,gradient_moment]",
                   f"+eval.metric_options.gradient_moment.reference='{ar}'", f"sweep.ar_baseline='{ar}'",
                   methods({"name": "Teacher", "checkpoint": teacher, "steps": [2]})],
          "eval.metric_options.gradient_moment.reference", "sweep.ar_baseline", "must not judge itself", run_dir=run_dir)
    # a judged checkpoint reached through a link is the same file
    link = tmp_path / "link.ckpt"
    os.symlink(teacher, link)
    fails(capsys, [*SWEEP, f"run_dir={run_dir}", "eval.metrics=[gen_ppl]", f"+eval.metric_options.gen_ppl.reference='{link}'",
                   methods({"name": "Teacher", "checkpoint": teacher, "steps": [2]})],
          "eval.metric_options.gen_ppl.reference", "sweep.methods.0.checkpoint", run_dir=run_dir)
    # one of several references
    fails(capsys, [*SWEEP, f"run_dir={run_dir}", "eval.metrics=[gen_ppl]",
                   f"+eval.metric_options.gen_ppl.reference=['{ar}','{teacher}']",
                   methods({"name": "Teacher", "checkpoint": teacher, "steps": [2]})],
          f"eval.metric_options.gen_ppl.reference '{teacher}'", "sweep.methods.0.checkpoint", run_dir=run_dir)


def test_an_exported_directory_is_not_judged_by_its_own_weights_file(teacher, tmp_path, capsys):
    """A reference `DIR/model.safetensors` loads the same weights as the evaluated directory DIR."""
    from mdlm_dmmd.checkpoints import load_backbone, save_backbone

    loaded = load_backbone(teacher)
    exported = save_backbone(tmp_path / "export", loaded.model, loaded.meta)
    run_dir = tmp_path / "sweep"
    fails(capsys, [*SWEEP, f"run_dir={run_dir}", "eval.metrics=[gen_ppl]",
                   f"+eval.metric_options.gen_ppl.reference='{exported / 'model.safetensors'}'",
                   methods({"name": "Exported", "checkpoint": exported, "steps": [2]})],
          "eval.metric_options.gen_ppl.reference", "sweep.methods.0.checkpoint", "must not judge itself", run_dir=run_dir)


def test_checkpoints_of_other_lengths_are_refused(teacher, tmp_path, capsys):
    from conftest import write_ar_checkpoint

    short = write_ar_checkpoint(tmp_path / "ar32", vocab=17, length=32)
    run_dir = tmp_path / "sweep"
    fails(capsys, [*SWEEP, f"run_dir={run_dir}", "eval.metrics=[entropy]", f"sweep.ar_baseline='{short}'",
                   methods({"name": "T", "checkpoint": teacher, "steps": [2]})],
          "all checkpoints of a sweep must share one sequence length, got sweep.methods.0: 64, sweep.ar_baseline: 32",
          run_dir=run_dir)


def test_a_metric_that_cannot_run_stops_the_sweep_before_sampling(teacher, tmp_path, capsys, monkeypatch):
    from mdlm_dmmd.errors import UserError

    def not_ready(**options):
        raise UserError("entropy: not ready (test)")

    monkeypatch.setattr(registry.load_metric("entropy"), "check_ready", not_ready, raising=False)
    monkeypatch.setattr(plan, "measure", lambda *a, **k: pytest.fail("sampled"))
    run_dir = tmp_path / "sweep"
    fails(capsys, [*SWEEP, f"run_dir={run_dir}", "eval.metrics=[entropy]",
                   methods({"name": "T", "checkpoint": teacher, "steps": [2]})],
          "entropy: not ready (test)", run_dir=run_dir)


def bad_cases(teacher: Path, ar: Path, tmp: Path, write: bool = True):
    """case -> (arguments, needles); `write`: the literature files the cases read, under tmp."""
    ok = {"name": "T", "checkpoint": teacher, "steps": [2]}
    bad_csv, zero_csv = tmp / "bad.csv", tmp / "zero_steps.csv"
    if write:
        bad_csv.write_text("method,steps,inception_score\nX,4,1.0\n")
        zero_csv.write_text("method,steps,entropy\nX,0,1.0\n")
    return {
        "missing checkpoint": ([methods({**ok, "checkpoint": tmp / "nope.ckpt"})], ["sweep.methods.0.checkpoint", "does not exist"]),
        "no checkpoint": ([methods({"name": "T", "steps": [2]})], ["sweep.methods.0.checkpoint is required"]),
        "empty methods": (["sweep.methods=[]"], ["sweep.methods is empty"]),
        "steps < 1": ([methods({**ok, "steps": [2, 0]})], ["sweep.methods.0.steps", "ints >= 1"]),
        "top_p > 1": ([methods({**ok, "top_p": [1.0, 1.5]})], ["sweep.methods.0.top_p", "(0, 1]", "1.5"]),
        "top_p = 0": ([methods({**ok, "top_p": [0.0]})], ["sweep.methods.0.top_p", "(0, 1]"]),
        "unknown key": ([methods({**ok, "stpes": [2]})], ["sweep.methods.0", "unknown key(s) stpes", "accepted:"]),
        "teacher without steps": ([methods({**ok, "steps": None})], ["sweep.methods.0.steps is null", "not a distilled student"]),
        "distill top-p on a teacher": ([methods({**ok, "distill_top_p": 0.9})], ["sweep.methods.0.distill_top_p"]),
        "ar as a method": ([methods({**ok, "checkpoint": ar})], ["sweep.methods.0.checkpoint", "sweep.ar_baseline"]),
        "diffusion as ar baseline": ([methods(ok), f"sweep.ar_baseline='{teacher}'"], ["sweep.ar_baseline", "not one of the `ar` algo"]),
        "other data": ([methods(ok), "data=shakespeare"], ["trained on data 'digits'", "data=digits"]),
        "duplicate rows": ([methods(ok, ok)], ["two rows 'T (p = 1.00)' at 2 steps"]),
        "num_samples": ([methods(ok), "sweep.num_samples=0"], ["sweep.num_samples"]),
        "resume": ([methods(ok), "sweep.resume=3"], ["sweep.resume must be true or false"]),
        "literature column": ([methods(ok), f"sweep.literature_csv={bad_csv}"], ["sweep.literature_csv", "unknown column(s) inception_score"]),
        "literature steps 0": ([methods(ok), f"sweep.literature_csv={zero_csv}"],
                               ["sweep.literature_csv", "line 2: steps must be an int >= 1, got '0'"]),
        "two problems at once": ([methods({**ok, "steps": [0], "top_p": [2.0]})], ["sweep.methods.0.steps", "sweep.methods.0.top_p"]),
    }


CASES = list(bad_cases(Path("t"), Path("a"), Path("tmp"), write=False))  # the names, at collection


@pytest.mark.parametrize("case", CASES)
def test_bad_sweep_input_is_one_line_and_writes_nothing(case, teacher, ar, tmp_path, capsys):
    args, needles = bad_cases(teacher, ar, tmp_path)[case]
    run_dir = tmp_path / "sweep"
    fails(capsys, [*SWEEP, f"run_dir={run_dir}", "eval.metrics=[entropy]", *args], *needles, run_dir=run_dir)


def test_sweep_refuses_to_write_into_a_training_run(teacher, capsys):
    run_dir = teacher.parent.parent
    before = (run_dir / "config.yaml").read_text()
    code = main([*SWEEP, f"run_dir={run_dir}", "eval.metrics=[entropy]", methods({"name": "T", "checkpoint": teacher, "steps": [2]})])
    assert code == 2 and "holds a training run" in capsys.readouterr().err
    assert (run_dir / "config.yaml").read_text() == before and not (run_dir / "results.csv").exists()


def write_rows(run_dir: Path, rows: list[dict]) -> None:
    with open(run_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_sweep_resumes_from_its_results_csv(teacher, tmp_path, capsys):
    """A second run keeps the rows already measured (a marked value survives) and adds the missing
    ones, equal to a fresh sweep's; other settings in that folder are refused, changing nothing."""
    run_dir, fresh = tmp_path / "sweep", tmp_path / "fresh"
    args = [*SWEEP, "eval.metrics=[entropy]"]
    entry = {"name": "T", "checkpoint": teacher}
    assert main([*args, f"run_dir={run_dir}", methods({**entry, "steps": [2]})]) == 0
    first = read_rows(run_dir)
    assert [r["method"] for r in first] == ["T", "Data"]
    for row in first:  # mark the measured values: a kept row keeps them, a re-measured one would not
        row["entropy"] = "123.0" if row["method"] == "T" else "7.5"
    write_rows(run_dir, first)

    assert main([*args, f"run_dir={run_dir}", methods({**entry, "steps": [2, 4]})]) == 0
    assert main([*args, f"run_dir={fresh}", methods({**entry, "steps": [2, 4]})]) == 0
    resumed, expected = read_rows(run_dir), read_rows(fresh)
    assert [(r["method"], r["steps"]) for r in resumed] == [("T", "2"), ("T", "4"), ("Data", "")]
    assert [r["entropy"] for r in resumed] == ["123.0", expected[1]["entropy"], "7.5"]
    assert [r["nfe"] for r in resumed] == [r["nfe"] for r in expected] == ["2", "4", ""]  # kept ints stay ints
    assert "| T (p = 1.00) | 123 |" in (run_dir / "results.md").read_text()

    # another seed: refused in one line, results.csv untouched
    before = (run_dir / "results.csv").read_text()
    capsys.readouterr()
    code = main([*args, f"run_dir={run_dir}", "sampling.seed=4", methods({**entry, "steps": [2]})])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "other settings: sampling.seed (3 there, 4 now)" in err and "sweep.resume=false" in err
    assert (run_dir / "results.csv").read_text() == before
    # another number of samples: refused too (SWEEP has 8)
    code = main([*args, f"run_dir={run_dir}", "sweep.num_samples=4", methods({**entry, "steps": [2]})])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "other settings: sweep.num_samples (8 there, 4 now)" in err, err
    assert (run_dir / "results.csv").read_text() == before

    # the same name and steps from another checkpoint file (a copy: the same numbers as a fresh
    # row) are measured again, not taken for the marked row; quoted rows come from
    # sweep.literature_csv each time, never twice
    copy = tmp_path / "copy.ckpt"
    copy.write_bytes(teacher.read_bytes())
    literature = tmp_path / "literature.csv"
    literature.write_text("method,steps,entropy\nOld method,8,4.5\n")
    quoted_args = [*args, f"run_dir={run_dir}", f"sweep.literature_csv={literature}"]
    assert main([*quoted_args, methods({**entry, "checkpoint": copy, "steps": [2]})]) == 0
    again = read_rows(run_dir)
    assert [(r["method"], r["entropy"], r["checkpoint"]) for r in again] == [
        ("T", expected[0]["entropy"], str(copy)), ("Data", "7.5", "data=digits (valid split)"), ("Old method", "4.5", "")]
    assert main([*quoted_args, methods({**entry, "checkpoint": copy, "steps": [2]})]) == 0
    assert read_rows(run_dir) == again  # resumed: every row kept, the quoted one once

    # sweep.resume=false measures every row again
    assert main([*args, f"run_dir={run_dir}", "sweep.resume=false", methods({**entry, "steps": [2, 4]})]) == 0
    assert [r["entropy"] for r in read_rows(run_dir)] == [r["entropy"] for r in expected]

    # results.csv without the config.yaml that says how it was made: refused
    (run_dir / "config.yaml").unlink()
    code = main([*args, f"run_dir={run_dir}", methods({**entry, "steps": [2]})])
    assert code == 2 and "no config.yaml" in capsys.readouterr().err


def test_prompted_sweep_continues_held_out_rows_and_has_no_data_row(teacher, ar, tmp_path):
    run_dir = tmp_path / "sweep"
    options = f"eval.metric_options={{gradient_moment: {{reference: '{ar}', batch_size: 2}}}}"
    assert main([*SWEEP, f"run_dir={run_dir}", "eval.metrics=[gradient_moment]", options, "sampling.prompt_length=48",
                 methods({"name": "Teacher", "checkpoint": teacher, "steps": [2]})]) == 0
    rows = read_rows(run_dir)
    assert [r["method"] for r in rows] == ["Teacher"]  # no Data row: the data continuations are the prompts' rows
    assert float(rows[0]["gradient_moment"]) == float(rows[0]["gradient_moment"])
    cfg = compose([*SWEEP, "sampling.prompt_length=48"])
    prompts = held_out_rows(cfg, 64, 8)[:, :48]
    samples = Pipeline.from_checkpoint(teacher).generate(8, steps=2, prompts=prompts, generator=torch.Generator().manual_seed(3))
    assert torch.equal(samples[:, :48], prompts)


def test_distill_top_p_on_a_ce_trained_uniform_teacher_is_refused(tmp_path, capsys):
    """Such a teacher samples with the generator rule too (fix c), but it is no student: it has no teacher."""
    ce_teacher = train(tmp_path / "ce", "algo=udlm", "algo.loss=ce")
    capsys.readouterr()  # the training log
    run_dir = tmp_path / "sweep"
    entry = {"name": "T", "checkpoint": ce_teacher, "steps": [2], "distill_top_p": 0.9}
    fails(capsys, [*SWEEP, f"run_dir={run_dir}", "eval.metrics=[entropy]", methods(entry)],
          "sweep.methods.0.distill_top_p", "udlm", run_dir=run_dir)
