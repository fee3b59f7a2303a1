"""Pipelines from checkpoints written by a real (tiny) CLI run: same samples as the algo that
wrote them, `mode=sample` / `mode=eval` outputs, and resuming training from a checkpoint."""

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from mdlm_dmmd import registry
from mdlm_dmmd.checkpoints import load_backbone, save_backbone
from mdlm_dmmd.cli import main
from mdlm_dmmd.pipeline import Pipeline

TINY = ["debug=cpu", "data=digits", "model.length=64"]  # 4 steps, checkpoints every 2, 4 samples


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """`mdlm-dmmd debug=cpu data=digits model.length=64`: 4 steps, then 4 samples of 4 steps."""
    run_dir = tmp_path_factory.mktemp("train") / "run"
    assert main(TINY + [f"run_dir={run_dir}"]) == 0
    return run_dir


def algo_from_checkpoint(path: Path):
    """The algo class from the registry, rebuilt from the checkpoint's stored config and state."""
    ckpt = load(path)
    algo = registry.load_algo(ckpt["mdlm_dmmd"]["algo"])(ckpt["hyper_parameters"]["config"])
    algo.load_state_dict(ckpt["state_dict"])
    algo.on_load_checkpoint(ckpt)
    return algo


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_train_run_writes_everything(run):
    for name in ("config.yaml", "report.md", "metrics.json", "samples.pt", "samples.png",
                 "checkpoints/final.ckpt", "checkpoints/last.ckpt", "checkpoints/step2.ckpt",
                 "checkpoints/step4.ckpt"):
        assert (run / name).is_file(), name
    assert not (run / "checkpoints" / "crash.ckpt").exists()
    assert load(run / "checkpoints" / "final.ckpt")["global_step"] == 4
    rows = json.loads((run / "metrics.json").read_text())
    assert rows["optimizer steps"] == 4 and rows["algo"] == "mdlm" and "entropy" in rows


def test_pipeline_from_checkpoint_reproduces_the_algo(run):
    ckpt = run / "checkpoints" / "final.ckpt"
    algo = algo_from_checkpoint(ckpt)
    pipe = Pipeline.from_checkpoint(ckpt)
    assert pipe.meta.ema is True and pipe.denoiser.process.mask_id == 17
    expected = algo.generate(5, steps=6, generator=seeded(3))
    assert torch.equal(pipe.generate(5, steps=6, generator=seeded(3)), expected)
    # the samples the training run wrote: sampling.seed = seed = 1, 4 samples, 4 steps
    written = torch.load(run / "samples.pt", weights_only=True)
    assert torch.equal(pipe.generate(4, steps=4, generator=seeded(1)), written)


@pytest.mark.parametrize("bad, shown", [(-1, "-1..3"), (18, "0..18"), (17, "0..17")])
def test_prompts_outside_the_models_data_tokens_are_one_line(run, bad, shown):
    """Digits model: ids 0..16 are data, 17 its mask; a prompt of other data (or a mask) is refused
    before the network would index past its embedding."""
    from mdlm_dmmd.errors import UserError

    pipe = Pipeline.from_checkpoint(run / "checkpoints" / "final.ckpt")
    prompts = torch.tensor([[0, 3, 2], [1, 2, 3]])
    pipe.generate(2, steps=2, generator=seeded(0), prompts=prompts)  # data tokens: fine
    prompts[1, 0] = bad
    with pytest.raises(UserError, match=rf"^sampling.prompt_length: the prompts hold token ids {shown}, but this model "
                                        r"reads ids 0..17 without its mask 17 \(prompts from other data"):
        pipe.generate(2, steps=2, generator=seeded(0), prompts=prompts)


def test_samples_are_normal_tensors_and_optimizers_are_not_fused_on_cpu(run):
    """Sampling runs under inference_mode, but callers get tensors they may write to and use
    with autograd; AdamW is fused on CUDA only (that path is untested: no GPU here)."""
    ckpt = run / "checkpoints" / "final.ckpt"
    samples = Pipeline.from_checkpoint(ckpt).generate(3, steps=2, generator=seeded(0))
    assert not samples.is_inference()
    samples[:, 0] = 1  # an inference tensor would refuse this outside inference_mode
    weights = torch.ones(18, requires_grad=True)
    weights[samples].sum().backward()  # and could not be saved for backward
    optimizer = algo_from_checkpoint(ckpt).configure_optimizers()["optimizer"]  # the mdlm run's AdamW
    assert isinstance(optimizer, torch.optim.AdamW) and not optimizer.param_groups[0]["fused"]


def test_pipeline_from_exported_dir_reproduces_the_checkpoint(run, tmp_path):
    ckpt = run / "checkpoints" / "final.ckpt"
    loaded = load_backbone(ckpt)
    exported = save_backbone(tmp_path / "export", loaded.model, loaded.meta)
    a = Pipeline.from_checkpoint(ckpt).generate(3, steps=5, generator=seeded(0))
    b = Pipeline.from_checkpoint(exported).generate(3, steps=5, generator=seeded(0))
    assert torch.equal(a, b)


def test_mode_sample_writes_samples(run, tmp_path):
    out = tmp_path / "sampled"
    ckpt = run / "checkpoints" / "final.ckpt"
    assert main(["mode=sample", f"checkpoint={ckpt}", "sampling.num_samples=3", "sampling.steps=5",
                 "sampling.seed=11", "sampling.device=cpu", f"run_dir={out}"]) == 0
    samples = torch.load(out / "samples.pt", weights_only=True)
    assert samples.shape == (3, 64) and samples.min() >= 0 and samples.max() <= 16
    assert (out / "samples.png").is_file()  # digits: a picture, decoded with the checkpoint's data config
    assert torch.equal(samples, Pipeline.from_checkpoint(ckpt).generate(3, steps=5, generator=seeded(11)))


def test_prompts_follow_their_rows_across_batches(run):
    """With batch_size < num_samples, each chunk continues its own rows of the prompts."""
    prompts = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]])
    samples = Pipeline.from_checkpoint(run / "checkpoints" / "final.ckpt").generate(
        4, steps=2, batch_size=2, prompts=prompts, generator=seeded(0))
    assert torch.equal(samples[:, :3], prompts)


def test_an_explicit_block_size_must_be_a_plain_checkpoints_length(run, tmp_path, capsys):
    ckpt = run / "checkpoints" / "final.ckpt"
    args = ["mode=sample", f"checkpoint={ckpt}", "sampling.num_samples=2", "sampling.steps=2", "sampling.device=cpu"]
    assert main([*args, "block_size=16", f"run_dir={tmp_path / 'b16'}"]) == 2
    err = capsys.readouterr().err
    assert f"block_size=16 but checkpoint '{ckpt}' has no block size (plain diffusion)" in err, err
    assert not (tmp_path / "b16").exists()
    assert main([*args, "block_size=64", f"run_dir={tmp_path / 'b64'}"]) == 0  # its length: plain diffusion
    assert (tmp_path / "b64" / "samples.pt").is_file()


def test_mode_eval_writes_report_with_requested_metrics(run, tmp_path):
    out = tmp_path / "evaluated"
    ckpt = run / "checkpoints" / "final.ckpt"
    assert main(["mode=eval", f"checkpoint={ckpt}", "eval.metrics=[entropy]", "sampling.num_samples=6",
                 "sampling.steps=4", f"run_dir={out}"]) == 0
    for name in ("report.md", "metrics.json", "samples.pt", "samples.png"):
        assert (out / name).is_file(), name
    rows = json.loads((out / "metrics.json").read_text())
    assert rows["samples"] == 6 and rows["sampling steps"] == 4 and rows["checkpoint"] == str(ckpt)
    samples = torch.load(out / "samples.pt", weights_only=True)
    by_hand = []
    for row in samples.tolist():
        counts = Counter(row)
        by_hand.append(-sum(c / 64 * math.log(c / 64) for c in counts.values()))
    assert rows["entropy"]["value"] == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-9)
    assert "per_sample" not in rows["entropy"]
    assert "| entropy |" in (out / "report.md").read_text()


# -- a student's own k -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def student(run, tmp_path_factory) -> Path:
    """A D-MMD student of `run` with k = 2 (2 updates), its training report sampled with
    sampling.steps=null (its own k) and 4 samples."""
    run_dir = tmp_path_factory.mktemp("student") / "run"
    assert main(TINY + ["algo=dmmd", f"algo.teacher={run / 'checkpoints' / 'final.ckpt'}", "algo.sampling_steps=2",
                        "trainer.max_steps=2", "trainer.limit_val_batches=0", "sampling.steps=null",
                        f"run_dir={run_dir}"]) == 0
    return run_dir


def test_a_students_training_report_samples_at_its_own_k(student):
    rows = json.loads((student / "metrics.json").read_text())
    assert rows["sampling steps"] == 2 and "| sampling steps | 2 |" in (student / "report.md").read_text()
    written = torch.load(student / "samples.pt", weights_only=True)  # seed = 1, 4 samples
    pipe = Pipeline.from_checkpoint(student / "checkpoints" / "final.ckpt")
    assert torch.equal(written, pipe.generate(4, steps=2, generator=seeded(1)))


@pytest.mark.parametrize("steps, expected", [("null", 2), ("4", 4)])
def test_sample_and_eval_use_sampling_steps_or_the_students_own_k(student, tmp_path, steps, expected):
    ckpt = student / "checkpoints" / "final.ckpt"
    args = [f"checkpoint={ckpt}", "sampling.num_samples=4", "sampling.seed=5", "sampling.device=cpu",
            f"sampling.steps={steps}"]
    by_hand = Pipeline.from_checkpoint(ckpt).generate(4, steps=expected, generator=seeded(5))
    assert main(["mode=eval", *args, "eval.metrics=[entropy]", f"run_dir={tmp_path / 'eval'}"]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["sampling steps"] == expected
    assert torch.equal(torch.load(tmp_path / "eval" / "samples.pt", weights_only=True), by_hand)
    assert main(["mode=sample", *args, f"run_dir={tmp_path / 'sample'}"]) == 0
    assert torch.equal(torch.load(tmp_path / "sample" / "samples.pt", weights_only=True), by_hand)


# -- resume --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def half(tmp_path_factory) -> Path:
    """The same run stopped after 2 steps."""
    run_dir = tmp_path_factory.mktemp("half") / "run"
    assert main(TINY + ["trainer.max_steps=2", "sampling.num_samples=0", f"run_dir={run_dir}"]) == 0
    return run_dir


def assert_same_state(a: dict, b: dict, what: str) -> None:
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=0, atol=1e-6,
                                   msg=f"{what}: {key}")
    assert a["ema"]["num_updates"] == b["ema"]["num_updates"]
    for key in a["ema"]["shadow"]:
        torch.testing.assert_close(a["ema"]["shadow"][key], b["ema"]["shadow"][key], rtol=0, atol=1e-6,
                                   msg=f"{what}: ema {key}")


def test_first_steps_are_deterministic(run, half):
    """Same seed, same first two steps: the straight run's step-2 file equals the short run's."""
    assert_same_state(load(run / "checkpoints" / "step2.ckpt"), load(half / "checkpoints" / "last.ckpt"), "step 2")


def test_resume_restores_weights_ema_and_optimizer(half, tmp_path):
    """Resuming at the checkpoint's own step trains nothing and hands back exactly its state."""
    last = half / "checkpoints" / "last.ckpt"
    out = tmp_path / "resumed"
    assert main(TINY + [f"checkpoint={last}", "trainer.max_steps=2", "sampling.num_samples=0",
                        f"run_dir={out}"]) == 0
    before, after = load(last), load(out / "checkpoints" / "final.ckpt")
    assert before["global_step"] == 2 and before["ema"]["num_updates"] == 2  # the file has step 2's EMA update
    assert after["global_step"] == 2 and after["ema"]["num_updates"] == 2
    assert_same_state(before, after, "resume at step 2")
    for a, b in zip(before["optimizer_states"][0]["state"].values(), after["optimizer_states"][0]["state"].values()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a[key], b[key])
    assert after["lr_schedulers"][0]["last_epoch"] == before["lr_schedulers"][0]["last_epoch"] == 2


def assert_identical(a: dict, b: dict, what: str) -> None:
    """Bit for bit: weights, EMA, optimiser moments, LR schedules, and the train loader's position
    (the same position also shows that Lightning did not restart or skip within the epoch)."""
    assert a["global_step"] == b["global_step"], what
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), f"{what}: {key}"
    assert a["ema"]["num_updates"] == b["ema"]["num_updates"]
    for key in a["ema"]["shadow"]:
        assert torch.equal(a["ema"]["shadow"][key], b["ema"]["shadow"][key]), f"{what}: ema {key}"
    assert len(a["optimizer_states"]) == len(b["optimizer_states"])
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"]):
        for state_a, state_b in zip(opt_a["state"].values(), opt_b["state"].values()):
            for key in state_a:
                assert torch.equal(state_a[key], state_b[key]), f"{what}: optimizer {key}"
    assert [s["last_epoch"] for s in a["lr_schedulers"]] == [s["last_epoch"] for s in b["lr_schedulers"]]
    position = a["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert position == b["loops"]["fit_loop"]["state_dict"]["combined_loader"], what


def test_resume_equals_straight_run(run, half, tmp_path):
    """STYLE §7: 4 steps straight vs 2 steps, stop, resume to 4 → identical state."""
    out = tmp_path / "resumed"
    assert main(TINY + [f"checkpoint={half / 'checkpoints' / 'last.ckpt'}", "trainer.max_steps=4",
                        "sampling.num_samples=0", f"run_dir={out}"]) == 0
    straight, resumed = load(run / "checkpoints" / "final.ckpt"), load(out / "checkpoints" / "final.ckpt")
    assert resumed["global_step"] == straight["global_step"] == 4
    assert straight["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "rows": 4 * 8}]  # debug=cpu: 8 rows
    assert_identical(straight, resumed, "4 straight vs 2 + resume 2")


def straight_and_resumed(tmp_path: Path, overrides: list[str], resume_from: str) -> tuple[dict, dict]:
    """Final checkpoints of a straight run and of a run resumed from its `resume_from` file
    (written mid-run, as if the run had been killed right after it)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = TINY + overrides + ["sampling.num_samples=0"]
    assert main(args + [f"run_dir={straight}"]) == 0
    assert main(args + [f"checkpoint={straight / 'checkpoints' / resume_from}", f"run_dir={resumed}"]) == 0
    return load(straight / "checkpoints" / "final.ckpt"), load(resumed / "checkpoints" / "final.ckpt")


@pytest.mark.parametrize("overrides, resume_from, rows", [
    (["trainer.accumulate_grad_batches=2"], "step2.ckpt", 8 * 8),
    # 3 batches per epoch: step 3 ends epoch 0, so the resumed run starts epoch 1 from its top
    (["loader.batch_size=512", "trainer.val_check_interval=3", "trainer.max_steps=5"], "step3.ckpt", 2 * 512),
], ids=["accumulate_grad_batches=2", "resume_at_epoch_end"])
def test_resume_equals_straight_run_mdlm(tmp_path, overrides, resume_from, rows):
    straight, resumed = straight_and_resumed(tmp_path, overrides, resume_from)
    assert straight["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["rows"] == rows
    assert_identical(straight, resumed, " ".join(overrides))


def test_resume_equals_straight_run_dmmd(run, tmp_path):
    """D-MMD (manual optimisation, two optimisers, micro_step) distilling the tiny MDLM run."""
    teacher = run / "checkpoints" / "final.ckpt"
    straight, resumed = straight_and_resumed(
        tmp_path, ["algo=dmmd", f"algo.teacher={teacher}", "algo.noise_dim=8"], "step2.ckpt")
    assert len(straight["optimizer_states"]) == 2 and straight["distillation"] == resumed["distillation"]
    assert_identical(straight, resumed, "dmmd")


@pytest.mark.parametrize("data,kind", [(["data=digits", "model.length=64"], "image"),
                                       (["data=shakespeare", "data.max_documents=3", "model.length=32"], "text")])
def test_samples_are_logged_to_wandb_as_table_or_image(tmp_path, monkeypatch, data, kind):
    """logger=wandb (offline-safe: WANDB_MODE=disabled in tests) receives the final samples."""
    from lightning.pytorch.loggers import WandbLogger

    from mdlm_dmmd import cli

    calls = []
    monkeypatch.setattr(WandbLogger, "log_image", lambda self, key, images, step=None: calls.append((key, "image", images[0].shape)))
    monkeypatch.setattr(WandbLogger, "log_text", lambda self, key, columns, data, step=None: calls.append((key, "text", len(data))))
    code = cli.main([*data, "debug=cpu", "logger=wandb", f"run_dir={tmp_path / 'run'}"])
    assert code == 0
    assert calls and calls[-1][:2] == ("samples", kind)
    assert calls[-1][2] == 4 if kind == "text" else calls[-1][2][-1] == 3  # 4 texts / an RGB grid


def test_sampling_rule_of_checkpoints_without_one():
    """Only a CE-trained uniform teacher gets the generator rule when none is recorded."""
    from mdlm_dmmd.checkpoint_meta import CheckpointMeta
    from mdlm_dmmd.pipeline import first_token, sampling_rule

    rule = lambda **stored: sampling_rule(CheckpointMeta.from_dict(stored))
    assert rule(process="uniform", loss="ce") == "generator"
    assert rule(process="uniform", loss="elbo") == rule(process="uniform") == rule(process="masked") == "ancestral"
    assert rule(process="uniform", loss="ce", sampling_rule="ancestral") == "ancestral"
    assert rule(process="masked", sampling_rule="generator") == "generator"
    bos = lambda **stored: first_token(CheckpointMeta.from_dict(stored))
    assert bos(vocab={"bos_id": 5}) is None  # a BOS in the data, but the model saw noisy BOS tokens
    assert bos(vocab={"bos_id": 5}, ignore_bos=True) == 5 and bos(ignore_bos=True) is None


def test_pipeline_from_checkpoint_without_ema_and_bad_sample_counts(run):
    from mdlm_dmmd.errors import UserError

    ckpt = run / "checkpoints" / "final.ckpt"
    live = {k.removeprefix("backbone."): v for k, v in load(ckpt)["state_dict"].items() if k.startswith("backbone.")}
    pipe = Pipeline.from_checkpoint(ckpt, use_ema=False)
    assert pipe.meta.ema is False
    for name, param in pipe.network.state_dict().items():
        assert torch.equal(param, live[name]), name
    for bad in (0, -1, 2.0, True):
        with pytest.raises(UserError, match=rf"^sampling.num_samples must be a positive int, got {bad!r}$"):
            pipe.generate(bad, steps=2)
