"""BD3-LM (algo=bd3lm): the loss against a per-block brute force, block_size = L against mdlm/udlm,
per-block times, short CPU training with block_size=4 model.length=16 (masked and uniform), the
block size reaching model, loss, sampler and checkpoint, and one-line refusals."""

import csv

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from mdlm_dmmd.algos.bd3lm import BD3LM
from mdlm_dmmd.algos.mdlm import MDLM
from mdlm_dmmd.algos.udlm import UDLM
from mdlm_dmmd.cli import compose, main
from mdlm_dmmd.data import build_data
from mdlm_dmmd.diffusion import block
from mdlm_dmmd.diffusion.block_sampling import BlockSampler
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.pipeline import Pipeline
from mdlm_dmmd.training import vocab_info

EPS = 1e-3
V_DATA = 17


def config(*overrides, algo="bd3lm") -> tuple[dict, object]:
    cfg = compose([f"algo={algo}", "debug=cpu", "data=digits", *overrides])
    data = build_data(cfg.data, cfg.model.length)
    out = OmegaConf.to_container(cfg, resolve=True)
    out["vocab"] = vocab_info(data)
    return out, data


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def batch(data, n=4):
    return {"input_ids": torch.stack([data.train[i]["input_ids"] for i in range(n)])}


def test_masked_loss_equals_a_per_block_brute_force():
    """One stratified t per (sequence, block); block j of x_t sees itself and the clean blocks
    before it; −log p / t on masked tokens (SUBS never predicts the mask)."""
    cfg, data = config("block_size=16", "algo.ignore_bos=false")
    algo = BD3LM(cfg)
    randomise(algo.backbone)
    x = batch(data)["input_ids"]  # [4, 64]: 4 blocks of 16
    B, n = 4, 4
    torch.manual_seed(7)
    total, count = algo.loss({"input_ids": x})

    torch.manual_seed(7)
    u, r = torch.rand(B * n), torch.rand(B, 64)
    expected = 0.0
    with torch.no_grad():
        for b in range(B):
            for j in range(n):
                t = EPS + (1 - EPS) * ((b * n + j + u[b * n + j].item()) / (B * n))  # antithetic over B·n
                part = slice(16 * j, 16 * (j + 1))
                alpha = 1 - (1 - EPS) * t
                z = torch.where(r[b, part] < alpha, x[b, part], torch.tensor(V_DATA))
                # the sampling layout: clean blocks before j, then the noisy block (σ = 0: not time-conditioned)
                tokens = torch.cat([x[b, : 16 * j], z])[None]
                logits = algo.backbone(tokens, torch.zeros(1), attn_mask=block.block_causal_mask(tokens.shape[1], 16))
                log_p = torch.log_softmax(logits[0, -16:, :V_DATA].double(), dim=-1)
                for i in range(16):
                    if z[i] == V_DATA:
                        expected += -log_p[i, x[b, 16 * j + i]].item() / t
    assert count == B * 64
    assert total.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("process, plain", [("masked", MDLM), ("uniform", UDLM)])
def test_one_block_is_plain_diffusion(process, plain):
    """block_size = model.length: the same draws and the same loss as mdlm / udlm (the x_0 half
    cannot reach the x_t half through the mask); BD3-LM's ignore_bos is the documented difference,
    so it is off here (digits have no BOS anyway)."""
    bd_cfg, data = config(f"algo.process={process}", "algo.ignore_bos=false")
    plain_cfg, _ = config(algo=plain.__name__.lower())
    bd3lm, other = BD3LM(bd_cfg), plain(plain_cfg)
    randomise(other.backbone)
    bd3lm.backbone.load_state_dict(other.backbone.state_dict())
    assert bd3lm.time_conditioning == other.time_conditioning
    x = batch(data)
    torch.manual_seed(3)
    ours = bd3lm.loss(x)
    torch.manual_seed(3)
    theirs = other.loss(x)
    assert ours[1] == theirs[1]
    assert ours[0].item() == pytest.approx(theirs[0].item(), rel=1e-5)


def test_ignore_bos_keeps_the_first_token_clean_and_unscored():
    cfg, data = config("block_size=16", "algo.ignore_bos=true")
    with pytest.raises(UserError, match=r"^algo.ignore_bos=true keeps position 0 as the data's BOS token, but "
                                        r"data=digits has none \(vocab.bos_id\)"):
        BD3LM(cfg)  # the sampler would have to draw the first token, which training never noised
    cfg["vocab"]["bos_id"] = 0  # as if token 0 were the digits' BOS
    algo = BD3LM(cfg)
    assert algo.sampler().first_token == 0
    x = batch(data)
    seen = {}
    forward = algo.backbone.forward
    algo.backbone.forward = lambda tokens, *a, **k: seen.setdefault("x", tokens) is None or forward(tokens, *a, **k)
    total, count = algo.loss(x)
    assert count == 4 * 63
    assert torch.equal(seen["x"][:, 0], x["input_ids"][:, 0])
    assert BD3LM(config("block_size=16")[0]).ignore_bos is False  # digits have no BOS: null = off


def test_times_are_per_block_and_antithetic_over_all_blocks():
    cfg, data = config("block_size=8")
    algo = BD3LM(cfg)
    t = algo.block_times(batch(data)["input_ids"])  # [4, 64]: 8 blocks of 8
    assert t.shape == (4, 64)
    per_block = t.view(4, 8, 8)
    assert (per_block == per_block[..., :1]).all()  # constant inside a block
    bins = torch.floor((per_block[..., 0].flatten() - EPS) / (1 - EPS) * 32).long()
    assert sorted(bins.tolist()) == list(range(32))  # one time per 1/32 bin over all B · n_blocks


# -- CPU training and the block size end to end -----------------------------------------------
@pytest.mark.parametrize("process", ["masked", "uniform"])
def test_block_size_reaches_model_loss_sampler_and_checkpoint(tmp_path, process):
    run_dir = tmp_path / process
    args = ["algo=bd3lm", f"algo.process={process}", "data=shakespeare", "debug=cpu", "model.length=16",
            "block_size=4", "trainer.max_steps=3", "sampling.num_samples=2", "sampling.steps=2", f"run_dir={run_dir}"]
    assert main(args) == 0
    ckpt = torch.load(run_dir / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=False)
    meta = ckpt["mdlm_dmmd"]
    assert meta["block_size"] == 4 and meta["cross_attn"] is True and meta["process"] == process
    assert ckpt["hyper_parameters"]["config"]["block_size"] == 4
    pipeline = Pipeline.from_checkpoint(run_dir / "checkpoints" / "final.ckpt")
    assert isinstance(pipeline.sampler, BlockSampler) and pipeline.block_size == 4
    assert pipeline.denoiser.block_size == 4 and pipeline.denoiser.time_conditioning == (process == "uniform")
    samples = pipeline.generate(3, steps=2, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, 16)
    assert torch.load(run_dir / "samples.pt", weights_only=False).shape[1] == 16
    report = (run_dir / "report.md").read_text()  # NFE per block and in all (4 blocks, 2 steps each)
    for row in ("| steps per block | 2 |", "| NFE (all blocks) | 8 |", "| NFE with KV-cache commits | 11 |"):
        assert row in report, row
    if process == "masked":  # sampling with another block size is refused, naming both
        for other, needle in ((8, "block_size=8 but checkpoint"), (16, "block_size=16 but checkpoint"), (4, None)):
            code = main(["mode=sample", f"checkpoint={run_dir / 'checkpoints' / 'final.ckpt'}", f"block_size={other}",
                         "model.length=16", "sampling.num_samples=1", f"run_dir={tmp_path / f'sample{other}'}"])
            assert code == (2 if needle else 0)
    if process == "masked":  # a sweep row of a block model: steps per block, nfe in all
        sweep_dir = tmp_path / "sweep"
        assert main(["mode=sweep", "data=shakespeare", "model.length=16", "sweep.num_samples=2", "sweep.reference_rows=false",
                     f"sweep.methods=[{{name: B, checkpoint: '{run_dir / 'checkpoints' / 'final.ckpt'}', steps: [3]}}]",
                     f"run_dir={sweep_dir}"]) == 0
        (row,) = list(csv.DictReader(open(sweep_dir / "results.csv")))
        assert row["steps"] == "3" and row["nfe"] == "12"
        assert main(["mode=sweep", "data=shakespeare", "model.length=16", "block_size=8", "sweep.num_samples=2",
                     f"sweep.methods=[{{name: B, checkpoint: '{run_dir / 'checkpoints' / 'final.ckpt'}', steps: [3]}}]",
                     f"run_dir={tmp_path / 'sweep8'}"]) == 2


def test_training_lowers_the_loss():
    cfg, data = config("block_size=16", "optim.lr=1e-3", "optim.warmup_steps=0")
    L.seed_everything(0, verbose=False)
    algo = BD3LM(cfg)
    held_out = batch(data, 32)

    def fixed_loss():
        torch.manual_seed(1)
        with torch.no_grad():
            total, count = algo.loss(held_out)
        return (total / count).item()

    before = fixed_loss()
    optimizer = torch.optim.AdamW(algo.backbone.parameters(), lr=1e-3)
    for step in range(30):
        torch.manual_seed(100 + step)
        total, count = algo.loss(batch(data, 32))
        optimizer.zero_grad()
        (total / count).backward()
        optimizer.step()
    assert fixed_loss() < 0.9 * before


# -- refusals ---------------------------------------------------------------------------------
def fails(capsys, args, *needles, run_dir):
    code = main([*args, f"run_dir={run_dir}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not run_dir.exists()


@pytest.mark.parametrize("extra, needles", [
    (["algo=bd3lm", "block_size=5"], ["block_size must be a positive int that divides model.length (64), got 5"]),
    (["algo=bd3lm", "block_size=0"], ["block_size must be a positive int", "got 0"]),
    (["algo=bd3lm", "block_size=128"], ["got 128"]),
    (["algo=bd3lm", "block_size=abc"], ["got 'abc'"]),
    (["algo=mdlm", "block_size=16"], ["block_size=16 (model.length 64) needs a block-diffusion algo", "algo=mdlm"]),
    (["algo=udlm", "block_size=16"], ["algo=udlm is not block diffusion"]),
    (["algo=bd3lm", "algo.process=absorbing"], ["algo.process must be one of masked, uniform, got 'absorbing'"]),
    (["algo=bd3lm", "algo.loss=ce"], ["algo.loss=ce is for algo.process=uniform"]),
    (["algo=bd3lm", "+algo.block=4"], ["algo.block is not a bd3lm key"]),
    (["algo=bd3lm", "algo.ignore_bos=maybe"], ["algo.ignore_bos must be true, false or null, got 'maybe'"]),
    (["algo=bd3lm", "algo.time_conditioning=2"], ["algo.time_conditioning must be true, false or null, got 2"]),
    (["algo=bd3lm", "sampling.first_hitting=3"], ["sampling.first_hitting must be true or false, got 3"]),
    (["algo=bd3lm", "sampling.entropy_redraw=yes"], ["sampling.entropy_redraw must be true or false, got 'yes'"]),
    (["algo=bd3lm", "sampling.nucleus=cut"], ["sampling.nucleus must be one of keep, drop, got 'cut'"]),
    (["algo=bd3lm", "sampling.kv_cache=maybe"], ["sampling.kv_cache must be true or false, got 'maybe'"]),
    (["algo=mdlm", "sampling.first_hitting=true", "trainer.max_steps=1"],
     ["sampling.first_hitting is an option of the block sampler; algo=mdlm is not block diffusion"]),
    (["algo=udlm", "sampling.stop_at_eos=true"], ["sampling.stop_at_eos is an option of the block sampler; algo=udlm"]),
    (["algo=bd3lm", "sampling.length=-3"], ["sampling.length must be null (model.length) or a positive int, got -3"]),
    (["algo=mdlm", "sampling.entropy_redraw=true"], ["sampling.entropy_redraw is an option of the block sampler"]),
])
def test_bad_input_is_one_line(tmp_path, capsys, extra, needles):
    fails(capsys, [*extra, "data=digits", "debug=cpu"], *needles, run_dir=tmp_path / "run")


def test_sampling_options_reach_the_block_sampler(tmp_path, monkeypatch):
    from mdlm_dmmd.diffusion import block_sampling

    seen = []
    real = block_sampling.sample_blocks
    monkeypatch.setattr(block_sampling, "sample_blocks", lambda *a, **k: seen.append(k) or real(*a, **k))
    run_dir = tmp_path / "run"
    assert main(["algo=bd3lm", "data=digits", "debug=cpu", "block_size=16", "trainer.max_steps=1", "sampling.num_samples=2",
                 "sampling.kv_cache=false", "sampling.first_hitting=true", "sampling.nucleus=drop", "sampling.top_p=0.9",
                 f"run_dir={run_dir}"]) == 0
    assert seen and seen[-1]["kv_cache"] is False and seen[-1]["first_hitting"] is True and seen[-1]["nucleus"] == "drop"


def test_a_block_checkpoint_without_cross_attn_is_refused(tmp_path):
    from mdlm_dmmd.checkpoint_meta import CheckpointMeta

    with pytest.raises(UserError, match="block_size=4 .* without cross_attn=true"):
        CheckpointMeta.from_dict({"block_size": 4}).refuse_unsupported("x", 16)
    with pytest.raises(UserError, match="block_size=3 must be a positive int dividing the model length 16"):
        CheckpointMeta.from_dict({"block_size": 3, "cross_attn": True}).refuse_unsupported("x", 16)
    CheckpointMeta.from_dict({"block_size": 4, "cross_attn": True}).refuse_unsupported("x", 16)


# -- BD3-LM's clipped, variance-minimising schedule ---------------------------------------------
def test_candidate_intervals_and_the_lowest_variance_pick():
    from mdlm_dmmd.algos.bd3lm import clip_intervals, lowest_variance, spreads

    # BD3-LM's valid_vars start with the unclipped interval, so the search may keep it
    assert clip_intervals([0.5], 0.25, 1e-3) == [(1e-3, 1.0), (1e-3, 0.5), (0.25, 0.75), (0.5, 1.0)]
    assert clip_intervals([1.0], 0.05, 1e-3) == [(1e-3, 1.0)] and clip_intervals([], 0.05, 1e-3) == []
    # per-batch variances summed (rows: intervals; one tensor per batch): 2 + 0 for the first,
    # 0.125 + 0.5 for the second; pooled over the batches it would be 3.67 against 6.23
    intervals = [(0.1, 0.6), (0.2, 0.7)]
    batches = [torch.tensor([[1.0, 3.0], [1.0, 1.5]]), torch.tensor([[5.0, 5.0], [5.0, 6.0]])]
    assert spreads(batches).tolist() == pytest.approx([2.0, 0.625])
    assert lowest_variance(intervals, batches) == (0.2, 0.7)
    pooled = torch.cat(batches, dim=1).var(dim=1)
    assert pooled[0] < pooled[1]  # the two rules differ here, so the test tells them apart
    # two processes: each batch's variance is over both shards' rows (BD3-LM's all-gather), not a
    # sum of each shard's own: shards [1, 3] and [5, 7] vary by 2 each, together by 6.67; one
    # collective carries every batch (the batch index as an extra row)
    shard = [torch.tensor([[1.0, 3.0], [1.0, 1.5]]), torch.tensor([[2.0], [4.0]])]
    other = [torch.tensor([[5.0, 7.0], [1.2, 1.4]]), torch.tensor([[3.0], [9.0]])]
    calls = []

    def gather(packed):
        calls.append(packed.shape)
        theirs = torch.cat([torch.tensor([[0.0, 0.0, 1.0]]), torch.cat(other, dim=1)])
        return torch.stack([packed, theirs])

    got = spreads(shard, gather)
    assert calls == [(3, 3)]
    assert got.tolist() == pytest.approx([torch.tensor([1.0, 3, 5, 7]).var().item() + torch.tensor([2.0, 3]).var().item(),
                                          torch.tensor([1.0, 1.5, 1.2, 1.4]).var().item() + torch.tensor([4.0, 9]).var().item()])
    assert lowest_variance(intervals, shard, gather) == (0.1, 0.6)  # 6.67 + 0.5 against 0.043 + 12.5


def test_times_stay_in_the_interval_and_validation_moves_it(monkeypatch):
    from mdlm_dmmd.data import make_loaders

    cfg, data = config("block_size=16", "algo.clip_search_widths=[0.5]", "algo.clip_search_delta=0.25")
    algo = BD3LM(cfg)
    randomise(algo.backbone)
    x = batch(data)["input_ids"]
    t = algo.block_times(x, (0.25, 0.75))
    assert t.min() >= 0.25 and t.max() <= 0.75 and t.shape == (4, 64)
    assert algo.intervals == [(1e-3, 1.0), (1e-3, 0.5), (0.25, 0.75), (0.5, 1.0)]

    collected = []  # one [n_intervals, rows] tensor per validation batch
    search = BD3LM.on_validation_epoch_end
    monkeypatch.setattr(BD3LM, "on_validation_epoch_end", lambda self: collected.extend(self._search) or search(self))
    _, valid_loader = make_loaders(data, batch_size=8, eval_batch_size=8, seed=0)
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              limit_val_batches=3).validate(algo, valid_loader, verbose=False)
    assert [tuple(b.shape) for b in collected] == [(len(algo.intervals), 8 * 4)] * 3
    best = min(algo.intervals, key=lambda k: sum(b[algo.intervals.index(k)].var().item() for b in collected))
    assert (float(algo.sampling_eps_min), float(algo.sampling_eps_max)) == best
    assert "sampling_eps_min" in algo.state_dict()  # saved with checkpoints
    t = algo.block_times(x)
    assert t.min() >= best[0] and t.max() <= best[1]


@pytest.mark.parametrize("extra, needle", [
    ("algo.clip_search_widths=[0]", "algo.clip_search_widths must be a list of numbers in (0, 1], got [0]"),
    ("algo.clip_search_delta=1.5", "algo.clip_search_delta must be a number in (0, 1), got 1.5"),
])
def test_bad_search_settings(extra, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        BD3LM(config(extra)[0])


def test_validation_scores_the_full_interval_and_groups_the_search_losses_by_block(monkeypatch):
    """val/nll is the NELBO over [sampling_eps, 1] even after the search moved the training
    interval; the search records each (sequence, block)'s mean token loss, in row-major order."""
    cfg, data = config("block_size=16", "algo.clip_search_widths=[0.5]", "algo.clip_search_delta=0.25")
    algo = BD3LM(cfg)
    algo.sampling_eps_min.fill_(0.5)  # as a search of an earlier validation would have left it
    per_token = torch.arange(4 * 64, dtype=torch.float32).view(4, 64)
    asked = []
    monkeypatch.setattr(algo, "token_losses", lambda batch, kind=None, interval=None: asked.append((kind, interval))
                        or (per_token.sum(), torch.tensor(256.0), per_token))
    algo.on_validation_epoch_start()
    algo.validation_step(batch(data), 0)
    assert asked[0] == ("elbo", (1e-3, 1.0)) and [i for _, i in asked[1:]] == algo.intervals
    expected = per_token.view(4, 4, 16).mean(-1).flatten().double()  # [B · n_blocks]: block j of row b at 4b + j
    (only,) = algo._search  # one batch: its losses under each interval, [n_intervals, B · n_blocks]
    assert only.shape == (len(algo.intervals), 16) and all(torch.equal(row, expected) for row in only)
