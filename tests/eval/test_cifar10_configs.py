"""The paper's CIFAR-10 protocol as experiment configs (D-MMD §6.1, Tables 1, 4, 6; App. C): each
composes and holds the paper's settings; shrunk to a 4x4 crop and a tiny width, the masked configs
run end to end on CPU (train a teacher, distil a 2-step student, sweep both), scored with the
`fid` metric on the random stand-in extractor (not Inception: no weights here)."""

import csv

import numpy as np
import pytest
from omegaconf import OmegaConf

from mdlm_dmmd.cli import compose, main
from mdlm_dmmd.registry import config_dir

TEACHER_STEPS = [16, 32, 64, 128, 256, 512, 1024]  # Table 1's teacher columns
STUDENT_STEPS = [4, 8, 16, 32, 64]  # Table 1's D-MMD columns, one student per k
TEACHERS = {"cifar10_masked_teacher": "mdlm", "cifar10_uniform_teacher": "udlm"}
STUDENTS = {"cifar10_masked_dmmd": ("Masked", True), "cifar10_uniform_dmmd": ("Uniform", None)}
SHRINK = ["data.source=npy", "data.image_size=4", "model.length=48", "model.hidden_dim=32", "model.cond_dim=16",
          "model.n_blocks=1", "model.n_heads=2", "model.dropout=0.0", "trainer.max_steps=2",
          "trainer.precision=32-true", "trainer.accumulate_grad_batches=1", "trainer.val_check_interval=2",
          "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "loader.batch_size=4",
          "loader.eval_batch_size=4", "optim.warmup_steps=1", "logger=none", "sampling.batch_size=8",
          "sampling.device=cpu", "sampling.steps=4", "sampling.num_samples=8",
          "eval.metric_options.fid.features=random_conv"]


def plain(name, *extra):
    return OmegaConf.to_container(compose([f"experiment={name}", *extra]), resolve=True)


def header(name):
    return (config_dir() / "experiment" / f"{name}.yaml").read_text().split("defaults:")[0]


@pytest.mark.parametrize("name", sorted(TEACHERS))
def test_teachers_hold_table_1(name):
    cfg = plain(name, "checkpoint=/t.ckpt")
    assert cfg["algo"]["name"] == TEACHERS[name] and cfg["data"]["name"] == "cifar10_pixels"
    assert cfg["model"]["length"] == 3072 and cfg["data"]["image_size"] is None
    assert cfg["eval"]["metrics"] == ["fid"] and cfg["sweep"]["num_samples"] == 50000
    [teacher] = cfg["sweep"]["methods"]
    assert teacher["steps"] == TEACHER_STEPS and teacher["checkpoint"] == "/t.ckpt"
    text = header(name)
    assert "Table 1" in text and "Assumptions" in text and f"mdlm-dmmd experiment={name}" in text and "mode=sweep" in text


@pytest.mark.parametrize("name", sorted(STUDENTS))
def test_students_hold_table_1_one_per_k(name):
    label, noise = STUDENTS[name]
    cfg = plain(name, "algo.teacher=/t.ckpt")
    assert cfg["algo"]["name"] == "dmmd" and cfg["algo"]["noise_input"] is noise
    assert cfg["eval"]["metrics"] == ["fid"] and cfg["sweep"]["num_samples"] == 50000
    teacher, *students = cfg["sweep"]["methods"]
    assert teacher["checkpoint"] == "/t.ckpt" and teacher["steps"] == TEACHER_STEPS
    assert {s["name"] for s in students} == {f"{label} D-MMD"} and all(s["steps"] is None for s in students)
    # training with algo.sampling_steps=K writes exactly where the sweep looks for student K
    for k, student in zip(STUDENT_STEPS, students):
        run_dir = plain(name, "algo.teacher=/t.ckpt", f"algo.sampling_steps={k}")["run_dir"]
        assert student["checkpoint"] == f"{run_dir}/checkpoints/final.ckpt"
    assert "Table 1" in header(name) and "Assumptions" in header(name)


def test_masked_students_use_the_noise_pyramid_and_the_ablation_reads_both_variants():
    assert plain("cifar10_masked_dmmd")["algo"]["noise_pyramid"] is True  # §6.5, images
    cfg = plain("cifar10_masked_noise_ablation", "algo.teacher=/t.ckpt")
    assert cfg["mode"] == "sweep"
    paths = {(m["name"], m["checkpoint"]) for m in cfg["sweep"]["methods"]}
    for k in STUDENT_STEPS:
        for noise, label in ((True, "with"), (False, "without")):
            run_dir = plain("cifar10_masked_dmmd", "algo.teacher=/t.ckpt", f"algo.sampling_steps={k}",
                            f"algo.noise_input={str(noise).lower()}")["run_dir"]
            assert (f"Masked D-MMD {label} noise", f"{run_dir}/checkpoints/final.ckpt") in paths
    assert "Table 6" in header("cifar10_masked_noise_ablation")


def test_app_c_sweeps_read_what_training_writes():
    cfg = plain("cifar10_masked_distill_sweep", "algo.teacher=/t.ckpt")
    for method in cfg["sweep"]["methods"]:
        tau = 1.0 if "τ" not in method["name"] or method["name"].startswith("τ = 1") else float(method["name"][4:])
        p = method["distill_top_p"]
        run_dir = plain("cifar10_masked_dmmd", "algo.teacher=/t.ckpt", f"algo.teacher_temperature={tau}",
                        f"algo.teacher_top_p={p}")["run_dir"]
        assert method["checkpoint"] == f"{run_dir}/checkpoints/final.ckpt"
    sampling = plain("cifar10_sampling_sweep", "checkpoint=/t.ckpt")
    assert {m.get("temperature", 1.0) for m in sampling["sweep"]["methods"]} == {1.0, 0.9, 0.8, 0.7}
    assert "Fig. 4" in header("cifar10_sampling_sweep") and "Figs. 5a and 6" in header("cifar10_masked_distill_sweep")


def test_masked_protocol_runs_end_to_end_on_a_4x4_crop(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MDLM_DMMD_CACHE", str(tmp_path / "cache"))
    images = np.random.default_rng(0).integers(0, 256, size=(40, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "cifar.npy", images)
    data = [f"data.path={tmp_path / 'cifar.npy'}"]
    # 1. teacher, 2. a 2-step student from it
    assert main(["experiment=cifar10_masked_teacher", *SHRINK, *data, f"run_dir={tmp_path / 'teacher'}"]) == 0
    teacher = tmp_path / "teacher" / "checkpoints" / "final.ckpt"
    assert (tmp_path / "teacher" / "samples.png").is_file()  # an RGB grid of every image run
    assert main(["experiment=cifar10_masked_dmmd", *SHRINK, *data, f"algo.teacher={teacher}", "algo.sampling_steps=2",
                 "sampling.steps=null",
                 f"run_dir={tmp_path / 'student'}"]) == 0
    student = tmp_path / "student" / "checkpoints" / "final.ckpt"
    # 3. the sweep: teacher at 2 and 4 steps, student at its k, scored by `fid` on the stand-in features
    methods = (f"sweep.methods=[{{name: Masked teacher, checkpoint: '{teacher}', steps: [2, 4], top_p: [1.0]}},"
               f"{{name: Masked D-MMD, checkpoint: '{student}', steps: null, top_p: [1.0]}}]")
    sweep_dir = tmp_path / "sweep"
    assert main(["experiment=cifar10_masked_dmmd", "mode=sweep", *SHRINK, *data, f"algo.teacher={teacher}", methods,
                 "sweep.num_samples=8", f"run_dir={sweep_dir}"]) == 0
    with open(sweep_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["steps"]) for r in rows] == [("Masked teacher", "2"), ("Masked teacher", "4"),
                                                        ("Masked D-MMD", "2")]
    assert all(float(r["fid"]) > 0 and float(r["fid"]) == float(r["fd_random_conv"]) for r in rows)
    # an RGB grid per sweep point, and the stand-in named in the report
    grids = sorted(p.name for p in (sweep_dir / "grids").iterdir())
    assert grids == ["Masked_D-MMD_2steps_p1.png", "Masked_teacher_2steps_p1.png", "Masked_teacher_4steps_p1.png"]
    report = (sweep_dir / "results.md").read_text()
    assert "## fid: FD in random_conv features (primary) vs NFE" in report

    # FID proper, offline, without Inception weights: one line, exit code 2
    capsys.readouterr()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["experiment=cifar10_masked_teacher", "mode=eval", *SHRINK, *data, f"checkpoint={teacher}",
                 "eval.metric_options.fid.features=inception", f"eval.metric_options.fid.inception_weights={tmp_path}/no.pth",
                 f"run_dir={tmp_path / 'eval'}"])
    err = capsys.readouterr().err.strip().splitlines()
    # before any sampling (no progress bar): torch-fidelity is missing here, or else the weights
    assert code == 2 and len(err) == 1 and err[0].startswith("mdlm-dmmd: error: frechet: ")
    assert "torch-fidelity" in err[0] or "inception_weights" in err[0]
    assert not (tmp_path / "eval").exists()
