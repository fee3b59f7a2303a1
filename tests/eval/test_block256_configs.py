"""The paper's block-256 setting (§6.3, Table 3) as experiment configs: both compose, hold Table 3's
settings and say what they assume; at a tiny width the uniform block teacher trains a step on
1024 tokens and a 16-step block student is distilled from it (block size from the teacher)."""

import torch
from omegaconf import OmegaConf

from mdlm_dmmd import registry
from mdlm_dmmd.checkpoints import save_backbone
from mdlm_dmmd.cli import compose
from mdlm_dmmd.registry import config_dir

TINY_WIDTH = ["model.hidden_dim=32", "model.cond_dim=16", "model.n_blocks=1", "model.n_heads=2"]
VOCAB = {"size": 50, "bos_id": 49, "eos_id": 49, "modality": "text", "image_shape": None}


def plain(name, *extra):
    return OmegaConf.to_container(compose([f"experiment={name}", *extra]), resolve=True)


def test_teacher_holds_table_3():
    cfg = plain("owt_block256_teacher")
    assert cfg["algo"]["name"] == "bd3lm" and cfg["algo"]["process"] == "uniform"
    assert cfg["block_size"] == 256 and cfg["model"]["length"] == 1024 and cfg["model"]["name"] == "small"
    assert cfg["sampling"]["steps"] == 256 and cfg["sampling"]["top_p"] == 0.9 and cfg["sampling"]["kv_cache"]
    assert cfg["sweep"]["methods"][0]["steps"] == [16, 64, 256]
    header = (config_dir() / "experiment" / "owt_block256_teacher.yaml").read_text().split("defaults:")[0]
    assert "Table 3" in header and "BD3-LM" in header and "assumption" in header.lower()


def test_student_holds_table_3():
    cfg = plain("owt_block256_dmmd16", "algo.teacher=/t.ckpt")
    assert cfg["algo"]["name"] == "dmmd" and cfg["algo"]["sampling_steps"] == 16
    assert cfg["algo"]["teacher_top_p"] == 0.7 and cfg["sampling"]["top_p"] == 0.7
    teacher, student = cfg["sweep"]["methods"]
    assert teacher["steps"] == [256] and teacher["top_p"] == [0.9] and teacher["checkpoint"] == "/t.ckpt"
    assert student["steps"] is None and student["checkpoint"] == f"{cfg['run_dir']}/checkpoints/final.ckpt"
    header = (config_dir() / "experiment" / "owt_block256_dmmd16.yaml").read_text().split("defaults:")[0]
    assert "Table 3" in header and "per block" in header and "0.70/0.70" in header


def test_tiny_teacher_and_student_at_1024_tokens_in_blocks_of_256(tmp_path):
    config = plain("owt_block256_teacher", *TINY_WIDTH)
    config["vocab"] = VOCAB
    teacher = registry.load_algo("bd3lm")(config)
    assert teacher.block == 256 and teacher.num_blocks == 4 and teacher.time_conditioning
    x = torch.randint(0, 50, (1, 1024), generator=torch.Generator().manual_seed(0))
    total, count = teacher.loss({"input_ids": x})
    assert torch.isfinite(total) and count == 1023  # ignore_bos: the data has a BOS
    path = save_backbone(tmp_path / "teacher", teacher.backbone, teacher.checkpoint_meta())

    student_config = plain("owt_block256_dmmd16", *TINY_WIDTH, f"algo.teacher={path}")
    student_config["vocab"] = VOCAB
    student = registry.load_algo("dmmd")(student_config)
    assert student.block == 256 and student.settings.loss_space == "posterior"  # an ELBO-trained uniform teacher
    loss, _ = student.phase_loss({"input_ids": x}, "gen")
    assert torch.isfinite(loss)
    assert student.sampler().nfe(1024, 16) == {"per_block": 16, "denoising": 64, "commit": 3, "total": 67}
