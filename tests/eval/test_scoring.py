"""`scoring.generate`: sample batches with their own seeds, shared between processes; the NFE
rows of reports."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mdlm_dmmd import cli
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.diffusion.block_sampling import BlockSampler
from mdlm_dmmd.diffusion.masked import MaskedProcess
from mdlm_dmmd.diffusion.sampling import AutoregressiveSampler, DiffusionSampler
from mdlm_dmmd.diffusion.schedules import LogLinear
from mdlm_dmmd.eval.scoring import batch_seed, generate, nfe_report
from mdlm_dmmd.eval.tables import write_report
from mdlm_dmmd.ranks import Ranks


class SeedEcho:
    """A model that records (rows asked for, its generator's seed) per call; every sample is
    [index of that call, row within the batch]."""

    device, length = torch.device("cpu"), 3

    def __init__(self):
        self.calls = []

    def generate(self, num_samples, *, generator, prompts=None, **_):
        seed = generator.initial_seed()
        self.calls.append((num_samples, seed))
        return torch.tensor([[len(self.calls) - 1, row] for row in range(num_samples)])


def sampling(num_samples, batch_size, seed=7):
    return OmegaConf.create({"sampling": {"num_samples": num_samples, "batch_size": batch_size, "seed": seed,
                                          "temperature": 1.0, "top_p": 1.0, "noise_removal": "ancestral"}})


class OwnShare(Ranks):
    """Process `rank` of `world` without the other processes: gathers its own batches only."""

    def gather(self, pieces):
        return pieces


def test_each_batch_draws_from_its_own_seed():
    model = SeedEcho()
    samples = generate(model, sampling(5, 2), steps=4, progress=False)
    mixed = [int(np.random.SeedSequence([7, b]).generate_state(1, np.uint64)[0]) for b in (1, 2)]
    assert model.calls == [(2, 7), (2, mixed[0]), (1, mixed[1])]  # batch 0: the seed itself, as Pipeline.generate
    assert samples.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [2, 0]]
    assert samples[:, 1].tolist() == [0, 1, 0, 1, 0]
    assert batch_seed(2, 0) != batch_seed(1, 1) and len({batch_seed(s, b) for s in range(3) for b in range(3)}) == 9
    # a batch's seed does not depend on how many samples are drawn after it
    fewer = SeedEcho()
    generate(fewer, sampling(3, 2), steps=4, progress=False)
    assert fewer.calls == [(2, 7), (1, mixed[0])]


def test_a_process_draws_only_its_share_of_the_batches():
    model = SeedEcho()
    mine = generate(model, sampling(7, 2), steps=4, progress=False, ranks=OwnShare(1, 2))
    assert model.calls == [(2, batch_seed(7, 1)), (1, batch_seed(7, 3))]  # batches 1 and 3 of 0..3
    assert mine.tolist() == [[0, 0], [0, 1], [1, 0]]


def test_study_refuses_several_launched_processes(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["mode=study", "data=digits"]) == 2
    assert "mode=study runs in one process" in capsys.readouterr().err


def test_study_refuses_several_devices_before_lightning_starts_them(capsys):
    """Lightning's own launcher re-runs the command in child processes after the parent started:
    the parent must refuse first (else it waits for children that refused)."""
    assert cli.main(["mode=study", "data=digits", "trainer.devices=2"]) == 2
    assert "trainer.devices=2" in capsys.readouterr().err
    assert cli.main(["mode=study", "data=digits", "trainer.num_nodes=2"]) == 2


def test_a_fixed_gpu_is_refused_for_several_processes(monkeypatch, capsys):
    from mdlm_dmmd.eval.scoring import default_device

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match="sampling.device=cuda:1 would put all 2 processes on one GPU"):
        default_device(OmegaConf.create({"sampling": {"device": "cuda:1"}}))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert default_device(OmegaConf.create({"sampling": {"device": "cuda"}})) == "cuda:1"
    assert default_device(OmegaConf.create({"sampling": {"device": "auto"}})) == "cuda:1"


def test_nfe_rows_count_the_greedy_tails_extra_call():
    """k steps make k calls, k + 1 with Duo's greedy tail (per block for block models); the AR
    sampler's L calls are its steps and no diffusion noise removal applies to it."""
    process = MaskedProcess(LogLinear(), mask_id=9)

    def cfg(noise_removal):
        return OmegaConf.create({"sampling": {"noise_removal": noise_removal, "kv_cache": True}})

    assert nfe_report(DiffusionSampler(process), 64, 8, cfg("ancestral")) == {}
    assert nfe_report(DiffusionSampler(process), 64, 8, cfg("greedy")) == {}
    assert nfe_report(DiffusionSampler(process), 64, 8, cfg("greedy_tail")) == {"NFE": 9}
    assert nfe_report(AutoregressiveSampler(start_id=9), 64, 64, cfg("greedy_tail")) == {}
    block = BlockSampler(process, 16)  # 4 blocks, 3 commits
    assert nfe_report(block, 64, 8, cfg("greedy_tail")) == {
        "block size": 16, "steps per block": 9, "NFE (all blocks)": 36, "NFE with KV-cache commits": 39}
    assert nfe_report(block, 64, 8, cfg("ancestral"))["NFE with KV-cache commits"] == 35
    longer = OmegaConf.create({"sampling": {"noise_removal": "ancestral", "kv_cache": True, "length": 128}})
    assert nfe_report(block, 64, 8, longer) == {  # a sliding window over 128 tokens: 8 blocks, 7 commits
        "block size": 16, "steps per block": 8, "NFE (all blocks)": 64, "NFE with KV-cache commits": 71}
    uncached = OmegaConf.create({"sampling": {"noise_removal": "ancestral", "kv_cache": False}})
    assert nfe_report(block, 64, 8, uncached)["NFE with KV-cache commits"] == 32  # no commit passes


def test_a_report_shows_a_metric_without_a_standard_error(tmp_path):
    """A metric may return no stderr (or None): the report shows its value alone."""
    write_report(tmp_path, "run", {"a": {"value": 1.5}, "b": {"value": 2.0, "stderr": None},
                                   "c": {"value": 1.0, "stderr": 0.25}, "steps": 4}, ["x.pt"])
    report = (tmp_path / "report.md").read_text()
    for line in ("| a | 1.5000 |", "| b | 2.0000 |", "| c | 1.0000 ± 0.2500 |", "| steps | 4 |"):
        assert line in report, line


def test_table_cells_show_value_then_standard_error():
    from mdlm_dmmd.eval.tables import as_number, cell, value_stderr

    assert value_stderr(12.345, 0.41) == "12.35 ± 0.41"
    assert value_stderr(12.345, 0.4123) == "12.35 ± 0.41"  # the value to 4 significant digits, its error to 2
    assert value_stderr(12.345) == "12.35" and value_stderr(None, 0.41) == ""
    assert cell({"x": 1.5, "x_stderr": 0.25}, "x") == "1.5 ± 0.25"
    assert cell({"x": 1.5}, "x") == "1.5"
    # NaN is a missing cell: no "± nan" after a value
    assert as_number("nan") is None and as_number(float("nan")) is None and as_number("2.5") == 2.5
    assert cell({"x": 1.0, "x_stderr": float("nan")}, "x") == "1"


def test_prompted_sampling_needs_one_held_out_row_per_sample():
    """digits has 180 validation rows: 180 prompted samples are fine, 181 are refused."""
    from mdlm_dmmd.eval.scoring import prompt_rows

    def cfg(n):
        return cli.compose(["mode=sample", "data=digits", "sampling.prompt_length=8", f"sampling.num_samples={n}"])

    assert prompt_rows(cfg(180), 64).shape == (180, 64)
    with pytest.raises(UserError, match=r"^sampling.prompt_length needs one held-out row per sample: 181 samples "
                                        r"but data=digits has 180 validation rows$"):
        prompt_rows(cfg(181), 64)
