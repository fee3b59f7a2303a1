"""Resuming a run whose files moved (issue 12, fix h): a student records its teacher by resolved
path and content hash, so a moved copy of the teacher is accepted and another teacher is refused
naming both paths; and `last.ckpt` is always the latest state (never a stale one beside `last-v1.ckpt`)."""

import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mdlm_dmmd import cli
from mdlm_dmmd.algos.distillation import content_hash
from mdlm_dmmd.cli import main

TINY = ["debug=cpu", "data=digits", "model.length=64", "sampling.num_samples=0"]  # seconds on CPU


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def fails(capsys, args, *needles, run_dir):
    """Exit 2, one stderr line naming every needle, `run_dir` not written."""
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not run_dir.exists()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A one-step tiny MDLM run's final checkpoint."""
    root = tmp_path_factory.mktemp("teacher")
    assert main(TINY + ["trainer.max_steps=1", "trainer.limit_val_batches=0", f"run_dir={root}"]) == 0
    return root / "checkpoints" / "final.ckpt"


def student_args(teacher: Path, run_dir: Path, steps: int) -> list[str]:
    return TINY + ["algo=dmmd", f"algo.teacher={teacher}", "algo.noise_dim=8", "trainer.limit_val_batches=0",
                   f"trainer.max_steps={steps}", f"run_dir={run_dir}"]


def test_study_student_config_names_its_teacher_by_resolved_path(tmp_path, monkeypatch):
    from mdlm_dmmd.modes.study import student_config

    cfg = cli.compose(["experiment=quickstart", "debug=cpu"])
    algo = OmegaConf.create({"name": "dmmd", "teacher": None, "sampling_steps": 8})
    monkeypatch.chdir(tmp_path)
    student = student_config(cfg, algo, Path("study/teacher/checkpoints/final.ckpt"), 2, None, Path("study"))
    assert student.algo.teacher == str((tmp_path / "study/teacher/checkpoints/final.ckpt").resolve())


def test_student_checkpoint_records_resolved_teacher_and_its_hash(tmp_path, monkeypatch, teacher):
    monkeypatch.chdir(teacher.parent)
    run_dir = tmp_path / "student"
    assert main(student_args(Path(teacher.name), run_dir, 1)) == 0  # a relative algo.teacher
    meta = load(run_dir / "checkpoints" / "final.ckpt")["mdlm_dmmd"]
    assert meta["teacher"] == str(teacher.resolve())
    assert meta["teacher_sha256"] == content_hash(teacher)


def test_resume_accepts_a_moved_teacher_with_the_same_bytes_and_refuses_another(tmp_path, capsys, teacher):
    original = tmp_path / "original" / "teacher.ckpt"
    original.parent.mkdir()
    shutil.copy(teacher, original)
    first = tmp_path / "first"
    assert main(student_args(original, first, 2)) == 0
    last = first / "checkpoints" / "last.ckpt"

    moved = tmp_path / "moved" / "teacher.ckpt"
    shutil.copytree(original.parent, moved.parent)
    shutil.rmtree(original.parent)  # the recorded path is gone: only the copy's contents can vouch for it
    resumed = tmp_path / "resumed"
    assert main(student_args(moved, resumed, 3) + [f"checkpoint={last}"]) == 0
    final = load(resumed / "checkpoints" / "final.ckpt")
    assert final["global_step"] == 3 and final["mdlm_dmmd"]["teacher"] == str(moved.resolve())

    other = tmp_path / "other.ckpt"
    ckpt = load(moved)
    name = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][name] = ckpt["state_dict"][name] + 1  # same shapes, other weights
    torch.save(ckpt, other)
    refused = tmp_path / "refused"
    fails(capsys, student_args(other, refused, 3) + [f"checkpoint={last}"],
          f"checkpoint '{last}'", str(original.resolve()), str(other.resolve()), "other contents", run_dir=refused)


def test_resuming_a_moved_run_folder_overwrites_last_ckpt(tmp_path):
    """Lightning only knows `last.ckpt` as its own in the folder it wrote it in; in a moved folder
    it used to write `last-v1.ckpt` beside the stale one, which the next resume would go back to."""
    first = tmp_path / "first"
    assert main(TINY + ["trainer.max_steps=2", "trainer.limit_val_batches=0", f"run_dir={first}"]) == 0
    moved = tmp_path / "moved"
    shutil.copytree(first, moved)
    shutil.rmtree(first)
    last = moved / "checkpoints" / "last.ckpt"
    assert load(last)["global_step"] == 2
    assert main(TINY + ["trainer.max_steps=4", "trainer.limit_val_batches=0", f"checkpoint={last}",
                        f"run_dir={moved}"]) == 0
    assert not list((moved / "checkpoints").glob("last-v*.ckpt"))
    assert load(last)["global_step"] == 4
