"""The command line: every wrong input is one line on stderr naming the key, exit code 2, no
traceback, and nothing written to disk. Runs `cli.main` in-process (fast) and the installed
console script once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mdlm_dmmd.checkpoints import load_backbone, save_backbone
from mdlm_dmmd.cli import check_launcher, main

TINY = ["debug=cpu", "data=digits", "model.length=64"]  # configs/debug/cpu.yaml: seconds on CPU


def fails(capsys, args, *needles, run_dir=None):
    """Run the CLI on `args`; assert exit 2, one stderr line naming every needle, nothing written."""
    code = main(args)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (out, err)
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("mdlm-dmmd: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    if run_dir is not None:
        assert not run_dir.exists(), f"{run_dir} was written although the input was rejected"
    return lines[0]


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return tmp_path / "run"


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory) -> Path:
    """A real checkpoint of a one-step `debug=cpu` run on digits (hidden_dim 32)."""
    root = tmp_path_factory.mktemp("trained")
    args = TINY + ["trainer.max_steps=1", "trainer.limit_val_batches=0", "sampling.num_samples=0",
                   f"run_dir={root}"]
    assert main(args) == 0
    return root / "checkpoints" / "final.ckpt"


# -- unknown names -----------------------------------------------------------------------------
def test_unknown_algo_lists_installed_and_suggests(capsys, run_dir):
    line = fails(capsys, ["algo=mdml", f"run_dir={run_dir}"], "unknown algo 'mdml'", "installed:",
                 "did you mean 'mdlm'?", run_dir=run_dir)
    installed = line.split("installed: ")[1].split(" (")[0].split(", ")
    assert {"mdlm", "ar"} <= set(installed)


def test_unknown_metric(capsys, run_dir):
    fails(capsys, ["eval.metrics=[nope]", f"run_dir={run_dir}"], "unknown metric 'nope'", "entropy",
          run_dir=run_dir)
    fails(capsys, ["eval.metrics=[entrpy]", f"run_dir={run_dir}"], "did you mean 'entropy'?", run_dir=run_dir)


@pytest.mark.parametrize("group, available", [
    ("data", "digits"), ("model", "tiny"), ("experiment", "quickstart"), ("debug", "cpu"),
    ("noise", "loglinear"), ("trainer", "default"),
])
def test_unknown_group_option(capsys, run_dir, group, available):
    fails(capsys, [f"{group}=nope", f"run_dir={run_dir}"], f"unknown {group} 'nope'", available,
          run_dir=run_dir)


def test_close_data_name_is_suggested(capsys, run_dir):
    fails(capsys, ["data=digit", f"run_dir={run_dir}"], "did you mean 'digits'?", run_dir=run_dir)


def test_bad_mode(capsys, run_dir):
    fails(capsys, ["mode=fit", f"run_dir={run_dir}"], "mode must be one of train, sample, eval", "'fit'",
          run_dir=run_dir)


def test_unknown_key_is_a_config_error(capsys, run_dir):
    fails(capsys, TINY + ["model.lenght=64", f"run_dir={run_dir}"], "model.lenght", run_dir=run_dir)


# -- bad values ------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["-3", "0", "abc", "1.5"])
@pytest.mark.parametrize("algo", ["mdlm", "ar"])
def test_model_length_must_be_positive_int(capsys, run_dir, value, algo):
    fails(capsys, TINY + [f"algo={algo}", f"model.length={value}", f"run_dir={run_dir}"],
          "model.length must be a positive int", run_dir=run_dir)


def test_digits_needs_length_64(capsys, run_dir):
    fails(capsys, ["debug=cpu", "data=digits", "model.length=32", f"run_dir={run_dir}"],
          "model.length must be 64", "digits", run_dir=run_dir)


@pytest.mark.parametrize("override, key", [
    ("sampling.top_p=1.5", "sampling.top_p"),
    ("sampling.top_p=0", "sampling.top_p"),
    ("sampling.steps=0", "sampling.steps"),
    ("sampling.steps=2.5", "sampling.steps"),
    ("sampling.temperature=-1", "sampling.temperature"),
    ("sampling.temperature=hot", "sampling.temperature"),
    ("sampling.num_samples=abc", "sampling.num_samples"),
    ("sampling.batch_size=0", "sampling.batch_size"),
    ("sampling.device=tpu", "sampling.device must be auto, cpu, cuda or cuda:N; got 'tpu'"),
])
def test_bad_sampling_values_fail_before_training(capsys, run_dir, override, key):
    # Train mode samples after fitting: the value must be refused before anything runs.
    fails(capsys, TINY + [override, f"run_dir={run_dir}"], key, run_dir=run_dir)


@pytest.mark.parametrize("mode", ["sample", "eval"])
def test_sampling_modes_need_at_least_one_sample(capsys, tmp_path, run_dir, mode):
    """Only mode=train takes sampling.num_samples=0 (no samples after fitting); refused before the
    checkpoint is opened."""
    fails(capsys, [f"mode={mode}", f"checkpoint={tmp_path / 'run.ckpt'}", "sampling.num_samples=0", f"run_dir={run_dir}"],
          "sampling.num_samples must be an int >= 1, got 0", run_dir=run_dir)


@pytest.mark.parametrize("accelerator", ["gpu", "cuda"])
def test_a_gpu_accelerator_without_a_gpu_is_one_line(capsys, run_dir, monkeypatch, accelerator):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)  # "gpu" would take a Mac's MPS
    fails(capsys, TINY + [f"trainer.accelerator={accelerator}", f"run_dir={run_dir}"],
          f"trainer.accelerator={accelerator} but torch sees no CUDA device; use trainer.accelerator=cpu", run_dir=run_dir)


@pytest.mark.parametrize("override, needle", [
    ("study.student_ema=-0.5", "study.student_ema must be a number in [0, 1) (0 = off), got -0.5"),
    ("study.student_ema=1.0", "study.student_ema must be a number in [0, 1)"),
    ("study.student_max_steps=0", "study.student_max_steps must be an int >= 1, got 0"),
    ("training.ema=2", "training.ema must be a number in [0, 1)"),
    ("study.student_steps=[0]", "study.student_steps must be a list of ints >= 1, got [0]"),
    ("study.student_steps=[2.5]", "study.student_steps must be a list of ints >= 1"),
    ("study.teacher_steps=4", "study.teacher_steps must be a list of ints >= 1, got 4"),
    ("study.noise_input=[maybe]", "study.noise_input must be a list of true, false or null, got ['maybe']"),
])
def test_bad_study_values_fail_before_the_teacher_trains(capsys, run_dir, override, needle):
    fails(capsys, ["mode=study", *TINY, override, f"run_dir={run_dir}"], needle, run_dir=run_dir)


@pytest.mark.parametrize("overrides, needle", [
    (["study.student_algo=idlm", "study.noise_input=[null]", "study.student_overrides.lr_aux=1e-4"],
     "study.student_algo=idlm student (noise_input=None; from study.student_steps, noise_input and "
     "student_overrides, with trainer.max_steps = study.student_max_steps): algo.lr_aux is not an idlm key; "
     "accepted: "),
    (["study.student_overrides.lr_aux=-1"], "study.student_algo=dmmd student (k=4, noise_input=None; from "
     "study.student_steps, noise_input and student_overrides, with trainer.max_steps = study.student_max_steps): "
     "algo.lr_aux must be > 0"),
    # SDTT's default 10000 updates per round: 7 rounds from 1024 steps to k=8 cannot end in 400 updates
    (["study.student_algo=sdtt", "study.noise_input=[null]", "~study.student_overrides", "study.student_steps=[8]",
      "study.student_max_steps=400"],
     "study.student_algo=sdtt student (k=8, noise_input=None; from study.student_steps, noise_input and "
     "student_overrides, with trainer.max_steps = study.student_max_steps): algo=sdtt: 7 rounds (1024 -> 8 steps) "
     "of algo.steps_per_round=10000 need trainer.max_steps >= 70000, got 400: training would stop before the "
     "8-step student is trained"),
])
def test_a_student_setting_its_algo_refuses_fails_before_the_teacher_trains(capsys, run_dir, overrides, needle):
    fails(capsys, ["mode=study", *TINY, *overrides, f"run_dir={run_dir}"], needle, run_dir=run_dir)


@pytest.mark.parametrize("overrides", [
    ["trainer.val_check_interval=00:00:30:00"],  # a time: Lightning's to check
    ["trainer.val_check_interval=1000.0", "trainer.check_val_every_n_epoch=1"],
    ["trainer.val_check_interval=0.25", "trainer.check_val_every_n_epoch=1"],
    ["trainer.gradient_clip_val=0", "optim.lr=0", "optim.eps=0", "optim.beta1=0", "optim.warmup_steps=1e3"],
    ["algo=bd3lm", "training.sampling_eps=0", "training.ema=0", "seed=4294967295"],
    ["mode=study", "study.student_ema=0"],
])
def test_what_pytorch_and_lightning_accept_is_not_refused(overrides):
    from mdlm_dmmd.cli import compose

    compose([*TINY, *overrides])  # raises a UserError if refused


def test_modes_without_training_read_only_sampling_seed():
    from mdlm_dmmd.cli import compose

    assert compose(["mode=sample", "seed=null", "sampling.seed=3", "optim.lr=-1"]).sampling.seed == 3


def test_fid_with_a_digits_feature_space_checks_the_data_before_sampling(capsys, tmp_path):
    fails(capsys, ["mode=eval", f"checkpoint={tmp_path / 'run.ckpt'}", "data=shakespeare", "eval.metrics=[fid]",
                   "eval.metric_options.fid.features=digits_mlp"],
          "fid: eval.metric_options.fid.features=digits_mlp needs data.name=digits", "got 'shakespeare'")


def test_a_metric_that_cannot_score_the_data_fails_before_sampling(capsys, tmp_path):
    """frechet's digits feature spaces score digits only; with data_from=config metrics read `data=`."""
    line = fails(capsys, ["mode=eval", f"checkpoint={tmp_path / 'run.ckpt'}", "data_from=config",
                          "eval.metrics=[frechet]"],
                 "frechet: ", "needs data.name=digits", "got 'shakespeare'")
    assert "does not exist" not in line  # refused before the checkpoint is even opened
    fails(capsys, ["mode=eval", f"checkpoint={tmp_path / 'run.ckpt'}", "data=digits", "eval.metrics=[frechet]"],
          "does not exist")  # digits data: the frechet check passes


def test_fid_in_an_image_feature_space_refuses_text_data_before_sampling(capsys, tmp_path):
    ckpt = f"checkpoint={tmp_path / 'run.ckpt'}"
    option = "eval.metric_options.fid.features"
    line = fails(capsys, ["mode=eval", ckpt, "data=shakespeare", "eval.metrics=[fid]", f"{option}=random_conv"],
                 f"fid: {option}=random_conv needs image data", "got data.name='shakespeare' (text)")
    assert "does not exist" not in line  # refused before the checkpoint is even opened
    fails(capsys, ["mode=eval", ckpt, "data=digits", "eval.metrics=[fid]", f"{option}=random_conv"],
          "does not exist")  # image data: the check passes


def test_cuda_sampling_device_without_a_gpu_fails_before_training(capsys, run_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fails(capsys, TINY + ["sampling.device=cuda:1", f"run_dir={run_dir}"],
          "sampling.device=cuda:1 but torch sees no CUDA device", run_dir=run_dir)


@pytest.mark.parametrize("override, needle", [
    ("+trainer.no_such_arg=1", "no_such_arg"),
    ("trainer.precision=bogus", "bogus"),
    ("trainer.devices=0", "bad trainer config: `Trainer(devices=0)` value is not a valid input"),
    # refused by PyTorch or Lightning deep inside fit (tracebacks), or taken silently
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches must be an int >= 1, got 0"),
    ("trainer.val_check_interval=0", "trainer.val_check_interval must be > 0 (steps, or with check_val_every_n_epoch"),
    ("trainer.val_check_interval=0.5", "bad trainer config: `val_check_interval` should be an integer"),  # Lightning's
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val must be a number >= 0 or null (off), got -1"),
    ("loader.batch_size=0", "loader.batch_size must be an int >= 1, got 0"),
    ("loader.eval_batch_size=-4", "loader.eval_batch_size must be an int >= 1, got -4"),
    ("loader.num_workers=-1", "loader.num_workers must be an int >= 0, got -1"),
    ("optim.lr=-1", "optim.lr must be a number >= 0, got -1"),
    ("optim.lr=fast", "optim.lr must be a number >= 0, got 'fast'"),
    ("optim.lr=${nope}", "optim.lr cannot be read (Interpolation key 'nope' not found); it must be a number >= 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be a number >= 0"),
    ("optim.beta2=1", "optim.beta2 must be a number in [0, 1), got 1"),
    ("optim.eps=-1e-8", "optim.eps must be a number >= 0"),
    ("optim.warmup_steps=-3", "optim.warmup_steps must be a whole number >= 0, got -3"),
    ("optim.warmup_steps=2.5", "optim.warmup_steps must be a whole number >= 0, got 2.5"),
    ("training.ema=-0.5", "training.ema must be a number in [0, 1) (0 = off), got -0.5"),
    ("training.sampling_eps=1", "training.sampling_eps must be a number in [0, 1), got 1"),
    ("seed=abc", "seed must be an int in [0, 4294967295], got 'abc'"),
    ("seed=-1", "seed must be an int in [0, 4294967295], got -1"),
    ("seed=4294967296", "seed must be an int in [0, 4294967295]"),
    ("sampling.seed=-1", "sampling.seed must be an int >= 0, got -1"),
    ("trainer.accelerator=tpu", "bad trainer config (a package it needs is missing): "),
    ("logger=bogus", "logger"),
    ("training.ema=2", "training.ema"),
    ("model.n_heads=3", "model.n_heads"),
    ("model.compile=yes", "model.compile must be true or false, got 'yes'"),
    ("model.activation_checkpointing=1", "model.activation_checkpointing must be true or false, got 1"),
    ("loader.batch_size=100000", "batch size"),
    ("sampling.prompt_length=64", "sampling.prompt_length must be an int in [0, 64) (model length 64), got 64"),
    ("sampling.prompt_length=-1", "sampling.prompt_length must be an int in [0, 64)"),
    ("sampling.prompt_length=half", "sampling.prompt_length must be an int in [0, 64)"),
    ("data.train_shard=[2,2]", "data.train_shard must be [index, count] with 0 <= index < count, got [2, 2]"),
    ("data.train_shard=[0,5000]", "data.train_shard [0, 5000] is empty"),
])
def test_bad_training_values(capsys, run_dir, override, needle):
    fails(capsys, TINY + ["logger=csv", override, f"run_dir={run_dir}"], needle, run_dir=run_dir)


# -- checkpoints -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["sample", "eval"])
def test_sample_needs_checkpoint(capsys, run_dir, mode):
    fails(capsys, [f"mode={mode}", f"run_dir={run_dir}"], f"mode={mode} needs checkpoint=PATH", run_dir=run_dir)


@pytest.mark.parametrize("mode", ["train", "sample", "eval"])
def test_missing_checkpoint(capsys, tmp_path, run_dir, mode):
    missing = tmp_path / "nope.ckpt"
    fails(capsys, TINY + [f"mode={mode}", f"checkpoint={missing}", f"run_dir={run_dir}"],
          "checkpoint", str(missing), "does not exist", run_dir=run_dir)


@pytest.mark.parametrize("mode", ["train", "sample", "eval"])
def test_text_file_is_not_a_checkpoint(capsys, tmp_path, run_dir, mode):
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    fails(capsys, TINY + [f"mode={mode}", f"checkpoint={text}", f"run_dir={run_dir}"],
          str(text), "is not a checkpoint", run_dir=run_dir)


def test_exported_dir_whose_shapes_do_not_match_its_config(capsys, tmp_path, run_dir, trained_ckpt):
    loaded = load_backbone(trained_ckpt)
    exported = save_backbone(tmp_path / "export", loaded.model, loaded.meta)
    assert main(["mode=sample", f"checkpoint={exported}", "sampling.steps=2", "sampling.num_samples=2",
                 f"run_dir={tmp_path / 'ok'}"]) == 0  # the untouched export samples
    capsys.readouterr()
    config = json.loads((exported / "config.json").read_text())
    assert config["hidden_dim"] == 32
    config["hidden_dim"] = 64
    (exported / "config.json").write_text(json.dumps(config))
    for mode in ("sample", "eval"):
        fails(capsys, [f"mode={mode}", f"checkpoint={exported}", f"run_dir={run_dir}"],
              str(exported), "shape mismatch", run_dir=run_dir)


def test_resume_from_checkpoint_of_another_config(capsys, run_dir, trained_ckpt):
    fails(capsys, TINY + ["model.hidden_dim=64", f"checkpoint={trained_ckpt}", f"run_dir={run_dir}"],
          str(trained_ckpt), "does not fit this config", run_dir=run_dir)


@pytest.mark.parametrize("override,message", [
    ("noise.eps=0.01", "trained with schedule_eps=0.001 but this config has schedule_eps=0.01"),
    ("algo=udlm", "trained with algo='mdlm' but this config has algo='udlm'"),
    # the network's inputs: a resumed run trained half its steps without time conditioning
    ("algo.time_conditioning=true", "trained with time_conditioning=False but this config has time_conditioning=True"),
])
def test_resume_with_another_process_or_schedule(capsys, run_dir, trained_ckpt, override, message):
    fails(capsys, TINY + [override, f"checkpoint={trained_ckpt}", f"run_dir={run_dir}"], message, run_dir=run_dir)


def test_resume_from_a_checkpoint_with_an_extra_weight_is_refused(capsys, tmp_path, run_dir, trained_ckpt):
    """Refused before the run folder exists (Lightning's strict load would fail inside fit)."""
    ckpt = torch.load(trained_ckpt, map_location="cpu", weights_only=False)
    ckpt["state_dict"]["backbone.extra"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "extra.ckpt")
    fails(capsys, TINY + [f"checkpoint={tmp_path / 'extra.ckpt'}", f"run_dir={run_dir}"],
          "does not fit this config (unexpected backbone.extra)", run_dir=run_dir)


def test_periodic_checkpoints_do_not_need_validation(tmp_path):
    """trainer.val_check_interval=2 writes step2.ckpt and step4.ckpt even with validation off."""
    assert main(TINY + ["trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=0",
                        "sampling.num_samples=0", f"run_dir={tmp_path}"]) == 0
    assert {"step2.ckpt", "step4.ckpt", "last.ckpt"} <= {p.name for p in (tmp_path / "checkpoints").iterdir()}


def test_resume_from_exported_dir_is_refused(capsys, tmp_path, run_dir, trained_ckpt):
    loaded = load_backbone(trained_ckpt)
    exported = save_backbone(tmp_path / "export", loaded.model, loaded.meta)
    fails(capsys, TINY + [f"checkpoint={exported}", f"run_dir={run_dir}"], str(exported), ".ckpt",
          run_dir=run_dir)


# -- text files ----------------------------------------------------------------------------
@pytest.fixture
def good_text(tmp_path) -> Path:
    path = tmp_path / "good.txt"
    path.write_text("To be, or not to be, that is the question.\n" * 40, encoding="utf-8")
    return path


def text_files_args(run_dir, *paths):
    listed = ",".join(str(p) for p in paths)
    return ["debug=cpu", "data=text_files", f"data.paths=[{listed}]", "model.length=16", f"run_dir={run_dir}"]


def test_text_files_empty_file(capsys, tmp_path, run_dir, good_text):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    fails(capsys, text_files_args(run_dir, empty, good_text), "data.paths", str(empty), "is empty", run_dir=run_dir)


def test_text_files_binary_file(capsys, tmp_path, run_dir, good_text):
    binary = tmp_path / "image.txt"
    binary.write_bytes(bytes(range(256)))
    fails(capsys, text_files_args(run_dir, binary, good_text), "data.paths", str(binary), "not UTF-8",
          run_dir=run_dir)


def test_text_files_missing_file(capsys, tmp_path, run_dir, good_text):
    missing = tmp_path / "missing.txt"
    fails(capsys, text_files_args(run_dir, good_text, missing), "data.paths", str(missing), "does not exist",
          run_dir=run_dir)


def test_text_files_without_paths(capsys, run_dir):
    fails(capsys, ["debug=cpu", "data=text_files", f"run_dir={run_dir}"], "data.paths", run_dir=run_dir)


# -- the real entry points -----------------------------------------------------------------
def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("MDLM_DMMD_DEBUG", None)
    return env


def test_console_script_unknown_algo(tmp_path):
    script = Path(sys.executable).parent / "mdlm-dmmd"
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    run_dir = tmp_path / "run"
    proc = subprocess.run([str(script), "algo=nope", f"run_dir={run_dir}"], capture_output=True, text=True,
                          cwd=tmp_path, env=_env(), timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mdlm-dmmd: error: unknown algo 'nope'"), proc.stderr
    assert not run_dir.exists()
    assert list(tmp_path.iterdir()) == []  # not even a Hydra outputs/ folder


def test_python_m_help(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mdlm_dmmd", "--help"], capture_output=True, text=True,
                          cwd=tmp_path, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "mdlm-dmmd algo=NAME" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_debug_env_shows_the_traceback(monkeypatch):
    from mdlm_dmmd.errors import UserError

    monkeypatch.setenv("MDLM_DMMD_DEBUG", "1")
    with pytest.raises(UserError, match="unknown algo"):
        main(["algo=nope"])


def test_wandb_logger_without_wandb_installed(capsys, run_dir, monkeypatch):
    import importlib.util

    from mdlm_dmmd import training

    real = importlib.util.find_spec
    monkeypatch.setattr(training.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    fails(capsys, TINY + ["logger=wandb", f"run_dir={run_dir}"], "logger=wandb needs wandb", run_dir=run_dir)


def test_tensorboard_logger_without_tensorboard_installed(capsys, run_dir, monkeypatch):
    import importlib.util

    from mdlm_dmmd import training

    real = importlib.util.find_spec
    monkeypatch.setattr(training.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "tensorboardX") else real(name, *a))
    fails(capsys, TINY + ["logger=tensorboard", f"run_dir={run_dir}"], "logger=tensorboard needs tensorboard: pip install",
          run_dir=run_dir)


# -- prompted sampling and conditional GM -------------------------------------------------------
def test_eval_with_prompts_continues_held_out_rows_and_scores_conditional_gm(tmp_path, trained_ckpt):
    import torch
    from conftest import write_ar_checkpoint
    from omegaconf import OmegaConf

    from mdlm_dmmd.eval.scoring import held_out_rows

    reference = write_ar_checkpoint(tmp_path / "reference")
    out_dir = tmp_path / "eval"
    args = TINY + ["mode=eval", f"checkpoint={trained_ckpt}", f"run_dir={out_dir}", "sampling.steps=4",
                   "sampling.num_samples=16", "sampling.prompt_length=40", "eval.metrics=[gradient_moment,entropy]",
                   f"eval.metric_options={{gradient_moment: {{reference: '{reference}', batch_size: 4, device: cpu}}}}"]
    assert main(args) == 0
    samples = torch.load(out_dir / "samples.pt")
    cfg = OmegaConf.load(out_dir / "config.yaml")
    rows = held_out_rows(cfg, 64, 16)
    assert torch.equal(samples[:, :40], rows[:, :40]) and not torch.equal(samples, rows)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["prompt length"] == 40 and metrics["gradient_moment"]["split"] == "prompts"
    fails_eval = main(TINY + ["mode=eval", f"checkpoint={trained_ckpt}", f"run_dir={tmp_path / 'e2'}",
                              "sampling.num_samples=1000", "sampling.prompt_length=8", "sampling.steps=2"])
    assert fails_eval == 2  # more samples than the 180 held-out digits that could prompt them


@pytest.mark.parametrize("overrides, resolved", [
    ([], "checkpoint"),
    (["data=digits"], "config"),
    (["data.max_documents=3"], "config"),
    (["experiment=quickstart"], "config"),  # an experiment may choose the data
    (["data_from=config"], "config"),
    (["data_from=checkpoint", "experiment=quickstart"], "checkpoint"),
])
def test_data_from_auto_is_the_checkpoints_data_unless_the_command_line_chooses_data(overrides, resolved):
    from mdlm_dmmd.cli import compose

    assert compose(["mode=eval", "checkpoint=x", *overrides]).data_from == resolved


def test_bad_data_from_is_one_line(capsys, run_dir):
    fails(capsys, ["mode=eval", "checkpoint=x", "data_from=trained", f"run_dir={run_dir}"],
          "data_from must be one of auto, checkpoint, config, got 'trained'", run_dir=run_dir)
    for data in ("data=digits", "data.max_documents=3", "+data.extra=1"):  # would be dropped for the stored data
        fails(capsys, ["mode=eval", "checkpoint=x", "data_from=checkpoint", data, f"run_dir={run_dir}"],
              "data_from=checkpoint reads the data the checkpoint stores (data= only where it stores none), so "
              f"{data.lstrip('+').split('=')[0]}= would be ignored", run_dir=run_dir)
    from mdlm_dmmd.cli import compose

    for mode in ("train", "sweep", "study"):  # they read data= whatever data_from says
        assert compose([f"mode={mode}", "data_from=checkpoint", "data=digits"]).data.name == "digits"


def test_a_checkpoint_without_stored_data_is_scored_on_data_and_says_so():
    from mdlm_dmmd.checkpoint_meta import CheckpointMeta
    from mdlm_dmmd.cli import compose
    from mdlm_dmmd.eval.scoring import data_row, with_checkpoint_data

    cfg = compose(["mode=eval", "checkpoint=x"])
    assert cfg.data_from == "checkpoint"
    public = with_checkpoint_data(cfg, CheckpointMeta())  # e.g. a public MDLM folder
    assert public.data.name == "shakespeare" and public.data_from == "config"
    assert data_row(public) == "shakespeare (data=)"
    trained = with_checkpoint_data(cfg, CheckpointMeta(data={"name": "digits"}))
    assert data_row(trained) == "digits (the checkpoint's)" and cfg.data.name == "shakespeare"  # cfg itself unchanged


def test_eval_and_sample_read_the_checkpoints_data_unless_data_is_given(capsys, tmp_path, trained_ckpt, monkeypatch):
    """A digits checkpoint evaluated without data= (default: shakespeare): the metrics' check, the
    prompts and the report read digits; with data= given, that data (here refused: its GPT-2 ids
    are no digits tokens)."""
    import torch
    from omegaconf import OmegaConf

    from mdlm_dmmd.eval import scoring
    from mdlm_dmmd.eval.scoring import held_out_rows
    from mdlm_dmmd.modes import evaluate

    checked = []
    monkeypatch.setattr(scoring, "check_metrics_ready", lambda cfg: checked.append(("cli", cfg.data.name)))
    monkeypatch.setattr(evaluate, "check_metrics_ready", lambda cfg: checked.append(("eval", cfg.data.name)))
    common = ["debug=cpu", f"checkpoint={trained_ckpt}", "sampling.steps=2", "sampling.num_samples=4",
              "sampling.prompt_length=8"]
    for mode in ("eval", "sample"):
        out_dir = tmp_path / mode
        assert main([*common, f"mode={mode}", f"run_dir={out_dir}"]) == 0
        samples = torch.load(out_dir / "samples.pt")
        cfg = OmegaConf.load(out_dir / "config.yaml")
        assert cfg.data.name == "digits" and cfg.data_from == "checkpoint"
        assert torch.equal(samples[:, :8], held_out_rows(cfg, 64, 4)[:, :8])
    assert checked == [("eval", "digits")]  # once, after the checkpoint was read; none in sample mode
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["data"] == "digits (the checkpoint's)"
    checked.clear()
    capsys.readouterr()
    fails(capsys, [*common, "mode=eval", "data=shakespeare", f"run_dir={tmp_path / 'given'}"],
          "sampling.prompt_length: the prompts hold token ids", "but this model reads ids 0..17 without its mask 17",
          "see data_from", run_dir=tmp_path / "given")  # was an IndexError inside the network
    assert checked == [("cli", "shakespeare")]


def test_dispatch_finds_the_mode_by_name(monkeypatch, tmp_path):
    from mdlm_dmmd import modes

    seen = []
    monkeypatch.setitem(modes.MODES, "sample", lambda cfg: seen.append((cfg.mode, cfg.checkpoint)))
    assert main(TINY + ["mode=sample", "checkpoint=any", f"run_dir={tmp_path / 'run'}"]) == 0
    assert seen == [("sample", "any")]


# -- friction a new user meets (issue 12, fix f) ----------------------------------------------------
def test_dataset_with_a_natural_length_sets_model_length(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["algo=mdlm", "data=digits", "debug=cpu", "sampling.num_samples=0", f"run_dir={run_dir}"]
    assert main(args) == 0, capsys.readouterr().err  # model=tiny says 128; digits rows are 64 tokens
    from omegaconf import OmegaConf

    assert OmegaConf.load(run_dir / "config.yaml").model.length == 64
    # given explicitly, the length is the user's: the same value works, another stays an error
    assert main([*args[:-1], "model.length=64", f"run_dir={tmp_path / 'same'}"]) == 0
    capsys.readouterr()
    fails(capsys, ["debug=cpu", "data=digits", "model.length=128", f"run_dir={tmp_path / 'other'}"],
          "model.length must be 64 for data=digits, got 128", run_dir=tmp_path / "other")


@pytest.mark.parametrize("override, needle", [
    ("trainer.max_steps=abc", "trainer.max_steps must be an int, got 'abc'"),
    ("trainer.max_steps=2.5", "trainer.max_steps must be an int, got 2.5"),
    ("trainer.max_steps=true", "trainer.max_steps must be an int, got True"),  # a bool is no int here
    ("trainer.log_every_n_steps=often", "trainer.log_every_n_steps must be an int"),
    ("trainer.limit_val_batches=all", "trainer.limit_val_batches must be an int or a float"),
])
def test_trainer_value_of_the_wrong_type_names_key_and_type(capsys, run_dir, override, needle):
    fails(capsys, TINY + [override, f"run_dir={run_dir}"], needle, run_dir=run_dir)


@pytest.mark.parametrize("mode", ["train", "sample", "study", "sweep"])
def test_unwritable_run_dir_is_one_line(capsys, tmp_path, trained_ckpt, mode):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    run_dir = blocker / "run"  # its parent is a file: no user (root included) can create it
    extra = {"train": [], "sample": [f"checkpoint={trained_ckpt}", "sampling.steps=2"],
             "study": ["study.teacher_steps=[2]", "study.student_steps=[]", "study.num_samples=2"],
             "sweep": [f"sweep.methods=[{{name: T, checkpoint: '{trained_ckpt}', steps: [2]}}]", "sweep.num_samples=2"]}
    fails(capsys, TINY + [f"mode={mode}", *extra[mode], f"run_dir={run_dir}"], f"run_dir '{run_dir}'",
          "cannot be written", run_dir=run_dir)


@pytest.mark.parametrize("mode", ["sample", "eval", "study", "sweep"])
def test_srun_tasks_of_a_mode_outside_lightning_are_refused(capsys, monkeypatch, run_dir, trained_ckpt, mode):
    """srun's task 1 of 8 without torchrun would run the whole job alone and write the same files."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    extra = {"sample": [f"checkpoint={trained_ckpt}"], "eval": [f"checkpoint={trained_ckpt}"],
             "study": ["study.teacher_steps=[2]", "study.student_steps=[]"],
             "sweep": [f"sweep.methods=[{{name: T, checkpoint: '{trained_ckpt}', steps: [2]}}]"]}
    fails(capsys, TINY + [f"mode={mode}", *extra[mode], f"run_dir={run_dir}"], f"mode={mode} under srun",
          "task 1 of 8", "torchrun", run_dir=run_dir)
    monkeypatch.setenv("SLURM_PROCID", "0")  # task 0 (or a batch script, or torchrun inside srun) goes on
    check_launcher(mode)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("WORLD_SIZE", "16")
    check_launcher(mode)


def test_compiled_and_checkpointed_training_keeps_plain_checkpoint_keys(tmp_path, monkeypatch):
    """`model.compile=true` compiles every DiT in place (here with torch's eager backend: no C++
    toolchain in a unit test), `model.activation_checkpointing=true` recomputes blocks; the
    checkpoint's keys carry no `_orig_mod.` and `mode=sample` loads it."""
    import torch

    compiled = []
    original = torch.nn.Module.compile

    def eager(module, *args, **kwargs):
        compiled.append(type(module).__name__)
        return original(module, backend="eager")

    monkeypatch.setattr(torch.nn.Module, "compile", eager)
    run = tmp_path / "run"
    assert main(TINY + ["trainer.max_steps=2", "sampling.num_samples=0", "model.compile=true",
                        "model.activation_checkpointing=true", f"run_dir={run}"]) == 0
    assert compiled == ["DiT"]
    state = torch.load(run / "checkpoints" / "final.ckpt", weights_only=False)["state_dict"]
    assert state and not any("_orig_mod" in key for key in state)
    assert main(["mode=sample", f"checkpoint={run / 'checkpoints' / 'final.ckpt'}", "sampling.num_samples=2",
                 "sampling.steps=2", f"run_dir={tmp_path / 'sample'}"]) == 0
