"""The package as a user gets it: the wheel ships the Hydra tree, and the installed copy (not the
checkout) runs the quickstart from a folder outside the repo. Slow: builds a wheel, trains."""

import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

# What a copy of the checkout leaves out: VCS data, build leftovers, run outputs.
IGNORE = shutil.ignore_patterns(".git", "outputs", "runs", "build", "dist", "*.egg-info", "__pycache__",
                                ".pytest_cache", "*.ckpt", "lightning_logs", ".ci-venv", "venv", ".venv",
                                ".cache", "wandb")


def offline_env(**extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               WANDB_MODE="disabled")
    env.pop("MDLM_DMMD_DEBUG", None)
    env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


def pip(*args, cwd: Path) -> None:
    # --no-build-isolation/--no-index: offline, with the setuptools already in the venv.
    proc = subprocess.run([sys.executable, "-m", "pip", *args, "--no-deps", "--no-build-isolation", "--no-index"],
                          capture_output=True, text=True, cwd=cwd, env=offline_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A wheel built from a copy of the checkout (so the checkout gets no build/), installed with
    `pip install --target`."""
    root = tmp_path_factory.mktemp("install")
    source = root / "src"
    shutil.copytree(REPO, source, ignore=IGNORE)
    pip("wheel", "-w", str(root / "dist"), str(source), cwd=root)
    (wheel,) = (root / "dist").glob("mdlm_dmmd-*.whl")
    target = root / "target"
    pip("install", "--target", str(target), str(wheel), cwd=root)
    return {"root": root, "wheel": wheel, "target": target}


def test_wheel_ships_the_config_tree(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    assert "mdlm_dmmd/configs/config.yaml" in names
    for group in ("algo", "data", "model", "noise", "trainer", "experiment", "debug"):
        shipped = {Path(n).name for n in names if n.startswith(f"mdlm_dmmd/configs/{group}/") and n.endswith(".yaml")}
        in_checkout = {p.name for p in (REPO / "configs" / group).glob("*.yaml")}
        assert shipped == in_checkout, group
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(installed["wheel"]).read(entry_points).decode()
    assert "[mdlm.algos]" in text and "mdlm = mdlm_dmmd.algos.mdlm:MDLM" in text
    assert "mdlm-dmmd = mdlm_dmmd.cli:entry" in text
    target = installed["target"]
    assert (target / "mdlm_dmmd" / "configs" / "config.yaml").is_file()
    assert sorted(p.name for p in (target / "mdlm_dmmd" / "configs" / "algo").glob("*.yaml")) == \
        sorted(p.name for p in (REPO / "configs" / "algo").glob("*.yaml"))


def test_installed_copy_runs_the_quickstart_outside_the_repo(installed, tmp_path):
    target = installed["target"]
    env = offline_env(PYTHONPATH=str(target))
    probe = subprocess.run(
        [sys.executable, "-c", "import mdlm_dmmd, mdlm_dmmd.registry as r; print(mdlm_dmmd.__file__); print(r.config_dir())"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert probe.returncode == 0, probe.stderr
    module_file, configs = (Path(line) for line in probe.stdout.split())
    assert module_file.is_relative_to(target), module_file  # the installed copy, not the checkout
    assert configs == (target / "mdlm_dmmd" / "configs").resolve()

    # The quickstart is a study (teacher, then D-MMD students): shrink every stage of it.
    run_dir = tmp_path / "q"
    proc = subprocess.run(
        [sys.executable, "-m", "mdlm_dmmd", "experiment=quickstart", "trainer.max_steps=20",
         "sampling.num_samples=4", "study.student_max_steps=4", "study.teacher_steps=[4]",
         "study.student_steps=[4]", "study.num_samples=16", "trainer.enable_progress_bar=false",
         f"run_dir={run_dir}"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("report.md", "samples.png", "results.csv", "teacher/checkpoints/final.ckpt"):
        assert (run_dir / name).is_file(), name
    report = (run_dir / "report.md").read_text()
    assert "| teacher | 4 |" in report and "| D-MMD | 4 |" in report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # nothing else written in the cwd


def test_full_quickstart(tmp_path):
    """`mdlm-dmmd experiment=quickstart` as the README says: teacher, D-MMD students, report."""
    script = Path(sys.executable).parent / "mdlm-dmmd"
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    run_dir = tmp_path / "quickstart"
    started = time.time()
    proc = subprocess.run([str(script), "experiment=quickstart", "trainer.enable_progress_bar=false",
                           f"run_dir={run_dir}"], capture_output=True, text=True, cwd=tmp_path,
                          env=offline_env(), timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (run_dir / "report.md").read_text()
    assert "| teacher |" in report and "| D-MMD |" in report and "frechet" in report
    assert (run_dir / "samples.png").is_file()
    print(f"full quickstart: {(time.time() - started) / 60:.1f} min")


TOY_PYPROJECT = """
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "toy-algo"
version = "0.1"

[project.entry-points."mdlm.algos"]
toy = "toy_algo.algo:ToyAlgo"

[tool.setuptools]
packages = ["toy_algo"]

[tool.setuptools.package-data]
toy_algo = ["configs/algo/*.yaml"]
"""


def test_a_real_installed_plugin_package_runs_through_the_host(installed, tmp_path):
    """pluggy-style: a separately built and installed package adds algo=toy; mdlm_dmmd is unchanged."""
    from test_registry import make_toy_package

    source = tmp_path / "toy_src"
    make_toy_package(source)
    (source / "pyproject.toml").write_text(TOY_PYPROJECT)
    pip("install", "--target", str(installed["target"]), str(source), cwd=tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = offline_env(PYTHONPATH=str(installed["target"]), MDLM_DMMD_CACHE=str(tmp_path / "cache"))
    run = [sys.executable, "-m", "mdlm_dmmd", "algo=toy", "data=digits", "debug=cpu", "model.length=64",
           f"run_dir={tmp_path / 'run'}"]
    proc = subprocess.run(run, cwd=outside, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "report.md").is_file()
    listed = subprocess.run([sys.executable, "-m", "mdlm_dmmd", "algo=nope"], cwd=outside, env=env,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 2 and "toy" in listed.stderr  # the installed plugin is listed
