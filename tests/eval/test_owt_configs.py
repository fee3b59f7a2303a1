"""The paper's OpenWebText protocol as experiment configs (D-MMD §6.2, Tables 2 and 5): each one
composes, holds the paper's settings, and (shrunk to a tiny width) validates on CPU. Nothing here
trains or samples a 1024-token model."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mdlm_dmmd import registry
from mdlm_dmmd.cli import compose, main
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.registry import config_dir

TEACHER_STEPS = [32, 64, 128, 256, 512]  # Table 2's teacher columns
STUDENT_STEPS = [4, 8, 16, 32, 64]  # one D-MMD student per k
TINY_WIDTH = ["model.hidden_dim=32", "model.cond_dim=16", "model.n_blocks=1", "model.n_heads=2"]
# (experiment, algo, teacher sampling top-p, D-MMD distillation top-p, D-MMD sampling top-p)
PROTOCOL = {
    "owt_masked_teacher": ("mdlm", 0.85, None, None),
    "owt_uniform_teacher": ("udlm", 0.5, None, None),
    "owt_masked_dmmd": ("dmmd", 0.85, 0.85, 1.0),
    "owt_uniform_dmmd": ("dmmd", 0.5, 0.7, 0.7),
}


def plain(name, *extra):
    return OmegaConf.to_container(compose([f"experiment={name}", *extra]), resolve=True)


@pytest.mark.parametrize("name", sorted(PROTOCOL))
def test_shared_paper_settings(name):
    cfg = plain(name)
    assert cfg["algo"]["name"] == PROTOCOL[name][0]
    assert cfg["data"]["name"] == "openwebtext-split" and cfg["data"]["valid_fraction"] == 0.02
    assert cfg["model"]["name"] == "small" and cfg["model"]["length"] == 1024
    assert cfg["model"]["attn_backend"] == "auto" and cfg["trainer"]["precision"] == "bf16-mixed"
    assert cfg["eval"]["metrics"] == ["gradient_moment", "gen_ppl", "entropy"]
    options = cfg["eval"]["metric_options"]
    assert options["gradient_moment"]["reference"] == "gpt2" and options["gradient_moment"]["split"] == "train"
    assert options["gen_ppl"]["reference"] == "gpt2-large"
    assert cfg["sweep"]["num_samples"] >= 512 and cfg["sweep"]["reference_rows"] is True
    header = (config_dir() / "experiment" / f"{name}.yaml").read_text().split("defaults:")[0]
    assert "Table 2" in header and f"mdlm-dmmd experiment={name}" in header and "mode=sweep" in header


@pytest.mark.parametrize("name", ["owt_masked_teacher", "owt_uniform_teacher"])
def test_teacher_top_p_and_step_grid(name, tmp_path):
    _, top_p, _, _ = PROTOCOL[name]
    cfg = plain(name, f"checkpoint={tmp_path}/final.ckpt")
    assert cfg["sampling"]["top_p"] == top_p
    [teacher] = cfg["sweep"]["methods"]
    assert teacher["steps"] == TEACHER_STEPS and teacher["top_p"][0] == top_p
    assert teacher["checkpoint"] == f"{tmp_path}/final.ckpt"  # the sweep scores checkpoint=PATH


@pytest.mark.parametrize("name", ["owt_masked_dmmd", "owt_uniform_dmmd"])
def test_dmmd_top_p_and_one_student_per_k(name):
    _, teacher_top_p, distill_top_p, sample_top_p = PROTOCOL[name]
    cfg = plain(name, "algo.teacher=/teachers/t.ckpt")
    assert cfg["algo"]["teacher_top_p"] == distill_top_p
    assert cfg["algo"]["sampling_steps"] in STUDENT_STEPS
    teacher, *students = cfg["sweep"]["methods"]
    assert teacher["checkpoint"] == "/teachers/t.ckpt" and teacher["steps"] == TEACHER_STEPS
    assert teacher["top_p"] == [teacher_top_p]
    assert [s["checkpoint"] for s in students] == [
        f"outputs/{name}/k{k}/checkpoints/final.ckpt" for k in STUDENT_STEPS]
    for student in students:
        assert student["steps"] is None  # each student at its own k
        assert student["top_p"] == [sample_top_p] and student["distill_top_p"] == distill_top_p
    # Training with algo.sampling_steps=K writes exactly where the sweep looks for student K.
    for k in STUDENT_STEPS:
        run_dir = plain(name, "algo.teacher=/t.ckpt", f"algo.sampling_steps={k}")["run_dir"]
        assert str(Path(run_dir) / "checkpoints" / "final.ckpt") == students[STUDENT_STEPS.index(k)]["checkpoint"]


def test_masked_dmmd_uses_the_noise_input():
    assert plain("owt_masked_dmmd")["algo"]["noise_input"] is True  # §6.5
    assert plain("owt_uniform_dmmd")["algo"]["noise_input"] is None  # dmmd: off for uniform teachers


@pytest.mark.parametrize("name", ["owt_masked_teacher", "owt_uniform_teacher"])
def test_teacher_algo_builds_from_the_composed_config(name):
    config = plain(name, *TINY_WIDTH)
    config["vocab"] = {"size": 50, "bos_id": 49, "eos_id": 49, "modality": "text", "image_shape": None}
    algo = registry.load_algo(config["algo"]["name"])(config)
    assert algo.backbone.config.length == 1024 and algo.backbone.config.attn_backend == "auto"
    x = torch.randint(0, 50, (1, 1024), generator=torch.Generator().manual_seed(0))
    total, count = algo.loss({"input_ids": x})
    assert torch.isfinite(total) and count == 1024


@pytest.mark.parametrize("name", ["owt_masked_dmmd", "owt_uniform_dmmd"])
def test_dmmd_without_teacher_is_refused(name, tmp_path, capsys):
    config = plain(name, *TINY_WIDTH)
    config["vocab"] = {"size": 50, "bos_id": 49, "eos_id": 49, "modality": "text", "image_shape": None}
    with pytest.raises(UserError, match="algo.teacher"):
        registry.load_algo("dmmd")(config)
    # The sweep says which checkpoint is missing, in one line, and writes nothing.
    run_dir = tmp_path / "sweep"
    assert main([f"experiment={name}", "mode=sweep", f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sweep.methods.0.checkpoint is required" in err
    assert not run_dir.exists()


@pytest.mark.parametrize("name, noise, top_p", [("owt_masked_idlm", "loglinear", 0.85), ("owt_duo_idlm", "duo", 0.5)])
def test_idlm_configs_hold_idlm_settings(name, noise, top_p):
    """IDLM paper App. E: global batch 512, constant rate after 2500 warmup steps, EMA 0.9999; the
    official code's fp32 and rate 1e-6; one student sampled at 4-32 steps; Duo teachers with noise=duo."""
    cfg = plain(name)
    assert cfg["algo"]["name"] == "idlm" and cfg["noise"]["type"] == noise
    assert cfg["loader"]["batch_size"] * cfg["trainer"]["accumulate_grad_batches"] == 512
    assert cfg["optim"]["warmup_steps"] == 2500 and cfg["training"]["ema"] == 0.9999
    assert cfg["algo"]["lr_generator"] == cfg["algo"]["lr_fake"] == 1e-6 and cfg["trainer"]["precision"] == "32-true"
    [idlm] = cfg["sweep"]["methods"]
    assert idlm["steps"] == [4, 8, 16, 32] and idlm["top_p"] == [1.0, top_p]
    header = (config_dir() / "experiment" / f"{name}.yaml").read_text().split("defaults:")[0]
    assert f"mdlm-dmmd experiment={name}" in header and "mode=sweep" in header
