"""MDLM: the loss against a brute-force NELBO, antithetic times, a short training run on digits,
EMA and sampling from the EMA weights, and the checkpoint metadata `load_backbone` relies on."""

import copy

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from mdlm_dmmd.algos.mdlm import MDLM
from mdlm_dmmd.checkpoints import load_backbone
from mdlm_dmmd.cli import compose
from mdlm_dmmd.data import build_data, make_loaders
from mdlm_dmmd.pipeline import Pipeline
from mdlm_dmmd.training import vocab_info

EPS = 1e-3  # training.sampling_eps
V_DATA = 17  # digits: pixel values 0..16; the mask id is 17


def digits_config(*overrides) -> tuple[dict, object]:
    cfg = compose(["algo=mdlm", "debug=cpu", "data=digits", "model.length=64", *overrides])
    data = build_data(cfg.data, cfg.model.length)
    config = OmegaConf.to_container(cfg, resolve=True)
    config["vocab"] = vocab_info(data)
    return config, data


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random, so the zero-initialised head does not make logits constant."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def trainer(max_steps: int) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     num_sanity_val_steps=0)


# -- the loss ----------------------------------------------------------------------------------
@pytest.mark.parametrize("time_conditioning", [False, True])
def test_loss_equals_brute_force_nelbo(time_conditioning):
    config, data = digits_config(f"algo.time_conditioning={time_conditioning}")
    algo = MDLM(config)
    randomise(algo.backbone)
    x = torch.stack([data.train[i]["input_ids"] for i in range(4)])  # [B, L]
    valid = torch.ones_like(x)
    valid[1, 50:] = 0  # a padded tail is not scored
    B, L_ = x.shape

    torch.manual_seed(123)
    total, count = algo.loss({"input_ids": x, "attention_mask": valid})

    # Replay the same draws: one uniform per sequence (then stratified), one per token.
    torch.manual_seed(123)
    u = torch.rand(B)
    r = torch.rand(B, L_)
    expected = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for b in range(B):
            t = EPS + (1 - EPS) * ((b + u[b].item()) / B)  # the b-th of B bins
            alpha = 1 - (1 - EPS) * t
            z = torch.where(r[b] < alpha, x[b], torch.tensor(V_DATA))
            sigma = -torch.log1p(torch.tensor([-(1 - EPS) * t])) if time_conditioning else torch.zeros(1)
            logits = algo.backbone(z[None], sigma)[0]  # [L, V+1]
            for i in range(L_):
                if z[i] == V_DATA and valid[b, i]:
                    log_p = torch.log_softmax(logits[i, :V_DATA].double(), dim=-1)  # SUBS: never the mask
                    expected += -log_p[x[b, i]] / t  # w(t) = (1 - eps) / (1 - alpha_t) = 1/t
    assert count == valid.sum()
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert expected > 0


def test_loss_is_zero_where_nothing_is_masked():
    config, data = digits_config()
    algo = MDLM(config)
    randomise(algo.backbone)
    x = data.train[0]["input_ids"][None]
    z = algo.process.corrupt(x, torch.zeros(1))  # alpha_0 = 1: nothing masked
    assert torch.equal(z, x)
    log_p = algo.denoiser(algo.backbone)(z, torch.zeros(1))
    assert algo.process.nelbo(log_p, x, z, torch.full((1,), 0.5)).abs().sum() == 0


def test_antithetic_times_are_stratified():
    n = 16
    algo = MDLM(digits_config()[0])
    for seed in range(5):
        torch.manual_seed(seed)
        t = algo.data_times(torch.zeros(n, 64, dtype=torch.long))
        assert t.shape == (n,)
        assert t.min() >= EPS and t.max() <= 1
        bins = torch.floor((t - EPS) / (1 - EPS) * n).long()
        assert sorted(bins.tolist()) == list(range(n))  # one time per 1/n bin
    plain = MDLM(digits_config("training.antithetic_sampling=false")[0])
    torch.manual_seed(0)
    t = plain.data_times(torch.zeros(1000, 64, dtype=torch.long))
    assert t.min() >= EPS and t.max() <= 1 and 0.45 < t.mean() < 0.55


# -- a short run on digits -----------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """30 AdamW steps of a tiny MDLM on digits, its fixed-draw loss before/after, and a ckpt."""
    config, data = digits_config("optim.lr=1e-3", "loader.batch_size=32")
    L.seed_everything(0, verbose=False)
    algo = MDLM(config)
    train_loader, valid_loader = make_loaders(data, batch_size=32, eval_batch_size=64, seed=0)
    held_out = next(iter(valid_loader))

    def fixed_loss():
        torch.manual_seed(1)  # the same t and z_t every time: only the weights change
        with torch.no_grad():
            total, count = algo.loss(held_out)
        return (total / count).item()

    before = fixed_loss()
    fit = trainer(30)
    fit.fit(algo, train_loader)
    after = fixed_loss()
    path = tmp_path_factory.mktemp("mdlm") / "tiny.ckpt"
    fit.save_checkpoint(str(path), weights_only=False)
    return {"algo": algo, "before": before, "after": after, "ckpt": path, "steps": fit.global_step}


def test_training_lowers_the_loss(trained):
    assert trained["steps"] == 30
    assert trained["after"] < 0.9 * trained["before"], (trained["before"], trained["after"])


def test_ema_tracks_but_differs_from_live_weights(trained):
    algo = trained["algo"]
    assert algo.ema.num_updates == 30  # one update per optimiser step
    shadow = algo.ema.shadow
    live = dict(algo.backbone.named_parameters())
    assert set(shadow) == set(live)
    assert any(not torch.equal(shadow[n], live[n].detach()) for n in shadow)


def test_ema_updates_once_per_optimizer_step():
    """Not once per micro-batch: 3 steps of 2 accumulated batches are 3 EMA updates."""
    config, data = digits_config()
    algo = MDLM(config)
    train_loader, _ = make_loaders(data, batch_size=8, eval_batch_size=8, seed=0)
    fit = L.Trainer(max_steps=3, accumulate_grad_batches=2, accelerator="cpu", devices=1, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    limit_val_batches=0, num_sanity_val_steps=0)
    fit.fit(algo, train_loader)
    assert fit.global_step == 3 and algo.ema.num_updates == 3


def test_evaluation_weights_swap_in_ema_and_restore_live(trained):
    algo = trained["algo"]
    algo.backbone.train()
    live = {n: p.detach().clone() for n, p in algo.backbone.named_parameters()}
    with algo.evaluation_weights() as network:
        assert network is algo.backbone and not network.training
        for n, p in network.named_parameters():
            assert torch.equal(p, algo.ema.shadow[n])
    assert algo.backbone.training
    for n, p in algo.backbone.named_parameters():
        assert torch.equal(p, live[n])


def test_generate_samples_from_the_ema_weights(trained):
    algo = trained["algo"]
    live = {n: p.detach().clone() for n, p in algo.backbone.named_parameters()}
    samples = algo.generate(6, steps=8, generator=torch.Generator().manual_seed(7))
    assert samples.shape == (6, 64) and samples.dtype == torch.long
    assert samples.min() >= 0 and samples.max() < V_DATA  # every mask revealed

    ema_network = copy.deepcopy(algo.backbone).eval()
    algo.ema.copy_to(ema_network)
    reference = Pipeline.diffusion(ema_network, algo.process).generate(6, steps=8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(samples, reference)
    for n, p in algo.backbone.named_parameters():  # live weights are back after sampling
        assert torch.equal(p, live[n])


def test_checkpoint_metadata(trained):
    ckpt = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    meta = ckpt["mdlm_dmmd"]
    assert meta["process"] == "masked" and meta["mask_id"] == V_DATA
    assert meta["schedule"] == "loglinear" and meta["schedule_eps"] == pytest.approx(1e-3)
    assert meta["time_conditioning"] is False
    assert meta["backbone_prefix"] == "backbone."
    assert meta["backbone_config"]["vocab_size"] == V_DATA + 1
    assert meta["backbone_config"]["hidden_dim"] == 32
    assert meta["vocab"]["size"] == V_DATA and meta["vocab"]["modality"] == "image"
    assert meta["data"]["name"] == "digits"
    assert ckpt["ema"]["num_updates"] == 30


def test_load_backbone_gives_the_ema_network(trained):
    algo = trained["algo"]
    loaded = load_backbone(trained["ckpt"])
    assert loaded.meta.ema is True
    model = loaded.model.eval()
    z = torch.randint(0, V_DATA + 1, (3, 64), generator=torch.Generator().manual_seed(0))
    sigma = torch.zeros(3)
    with torch.no_grad(), algo.evaluation_weights() as network:
        expected = network(z, sigma)
        got = model(z, sigma)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    with torch.no_grad():  # and not the live network (the EMA lags after 30 steps)
        assert not torch.allclose(got, algo.backbone.eval()(z, sigma), atol=1e-4)
    algo.backbone.train()


def test_validation_nll_divides_the_summed_tokens_of_every_process():
    """Under DDP the validation NELBO is Σ losses / Σ tokens over the processes, not the mean of
    each process's ratio (100 tokens at 6.0 and 300 at 3.33: 4.0, where averaging gives 4.67)."""
    from types import SimpleNamespace

    cfg, _ = digits_config()
    algo = MDLM(cfg)
    algo._val_sum = torch.tensor(600.0, dtype=torch.float64)  # this process: 100 tokens at 6.0
    algo._val_count = torch.tensor(100.0, dtype=torch.float64)
    other = torch.tensor([1000.0, 300.0], dtype=torch.float64)  # the other process: 300 tokens at 3.33

    def reduce(tensor, reduce_op):  # (loss sum, token count) of this process, summed with the other's
        assert reduce_op == "sum"
        return tensor + other

    assert float(algo.validation_nll()) == 6.0  # one process
    algo._trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(reduce=reduce))
    assert float(algo.validation_nll()) == pytest.approx(1600.0 / 400.0)


def test_adamw_takes_the_optim_keys_and_warms_up_linearly():
    """Update k takes lr · min(1, (k + 1)/(W + 1)): 0.1, 0.2, 0.3, 0.3 for lr 0.3 and W = 2."""
    cfg, _ = digits_config("optim.lr=0.3", "optim.warmup_steps=2", "optim.weight_decay=0.05", "optim.beta1=0.8",
                           "optim.beta2=0.95", "optim.eps=1e-6")
    algo = MDLM(cfg)
    built = algo.build_optimizer(algo.backbone.parameters(), OmegaConf.create(cfg["optim"]))
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    assert (optimizer.defaults["betas"], optimizer.defaults["weight_decay"], optimizer.defaults["eps"]) == (
        (0.8, 0.95), 0.05, 1e-6)
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.1, 0.2, 0.3, 0.3])


def test_validation_sums_losses_and_counts_tokens():
    """Validation adds each batch's loss sum and its token count (3 + 5 rows of 64 tokens: 512),
    so val/nll is a per-token mean, not a per-batch one."""
    cfg, data = digits_config()
    algo = MDLM(cfg)
    algo._val_sum = torch.zeros((), dtype=torch.float64)
    algo._val_count = torch.zeros((), dtype=torch.float64)
    rows = torch.stack([data.valid[i]["input_ids"] for i in range(8)])
    expected = 0.0
    for part in (rows[:3], rows[3:]):
        torch.manual_seed(0)
        expected += float(algo.loss({"input_ids": part})[0])
        torch.manual_seed(0)
        algo.validation_step({"input_ids": part}, 0)
    assert float(algo._val_count) == 512 and float(algo._val_sum) == pytest.approx(expected, rel=1e-6)


def validate(algo, rows) -> float:
    """val/nll of one validation epoch over `rows`, as Lightning runs its hooks (the end hook,
    which logs through a trainer, is replaced by its own exits)."""
    algo.on_validation_epoch_start()
    algo.validation_step({"input_ids": rows}, 0)
    total, count = float(algo._val_sum), float(algo._val_count)
    algo._val_rng.__exit__(None, None, None)
    algo._val_weights.__exit__(None, None, None)
    return total / count


def test_validation_draws_from_the_seed_wherever_training_is():
    """Every validation draws its t and masks from the run's seed alone: the same NELBO after
    any amount of training randomness, and the training RNG continues as if it had not run.
    A fresh run's training draws start from seed + 1, not validation's first draws."""
    cfg, data = digits_config("seed=5")
    algo = MDLM(cfg)
    randomise(algo.backbone)
    rows = torch.stack([data.valid[i]["input_ids"] for i in range(8)])
    torch.manual_seed(123)
    first = validate(algo, rows)
    torch.rand(1000)  # training moved the global RNG on
    before = torch.random.get_rng_state()
    assert validate(algo, rows) == first
    assert torch.equal(torch.random.get_rng_state(), before)  # training's next draw is untouched
    torch.manual_seed(5)  # validation's own draws, by hand: the seed itself, with the EMA weights
    with algo.evaluation_weights():
        expected = algo.loss({"input_ids": rows})
    assert first == pytest.approx(float(expected[0]) / float(expected[1]), rel=1e-6)
    algo.on_train_start()  # a fresh run (nothing to restore)
    assert torch.equal(torch.random.get_rng_state(), torch.manual_seed(6).get_state())
