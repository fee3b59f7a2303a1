"""UDLM: construction and config checks, loss modes, the loss against Duo's `nll_per_token`
written out by hand (random weights and padding: the zero-initialised head of the other tests
gives every token −log V, where gathering at the wrong index or swapping x and z_t changes
nothing), a short training run on digits, generation through the shared sampler, checkpoint
metadata."""

import math

import pytest
import torch

from mdlm_dmmd.algos.udlm import UDLM
from mdlm_dmmd.data.images import digits_arrays
from mdlm_dmmd.diffusion.sampling import DiffusionSampler
from mdlm_dmmd.diffusion.uniform import UniformProcess
from mdlm_dmmd.errors import UserError

VOCAB = 17  # digits pixel values; uniform diffusion adds no mask slot
LENGTH = 64


def udlm_config(*, length=LENGTH, vocab=VOCAB, **algo):
    return {
        "algo": {"name": "udlm", "time_conditioning": True, "loss": "elbo", **algo},
        "model": {"length": length, "hidden_dim": 32, "cond_dim": 16, "n_blocks": 1, "n_heads": 2, "dropout": 0.0},
        "training": {"ema": 0.0, "antithetic_sampling": True, "sampling_eps": 1e-3},
        "optim": {"lr": 3e-3, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "warmup_steps": 0},
        "noise": {"type": "loglinear", "eps": 1e-3},
        "vocab": {"size": vocab},
        "data": {"name": "digits"},
    }


def digits_batches(n_batches, batch_size=32):
    pixels, _ = digits_arrays("train")
    x = torch.from_numpy(pixels[: n_batches * batch_size]).reshape(n_batches, batch_size, LENGTH)
    return [{"input_ids": b} for b in x]


def test_builds_a_uniform_process_without_mask_slot():
    algo = UDLM(udlm_config())
    assert isinstance(algo.process, UniformProcess) and algo.process.vocab_size == VOCAB
    assert algo.backbone.config.vocab_size == VOCAB
    pipeline = algo.pipeline(algo.backbone)
    t = torch.tensor([0.5])
    assert pipeline.denoiser.sigma(t).item() == pytest.approx(-torch.log(algo.process.schedule.alpha(t)).item())


def test_loss_modes():
    x = digits_batches(1, 4)[0]
    torch.manual_seed(0)
    elbo_total, count = UDLM(udlm_config()).loss(x)
    assert count == 4 * LENGTH and torch.isfinite(elbo_total) and elbo_total > 0
    ce = UDLM(udlm_config(loss="ce"))
    torch.manual_seed(0)
    total, _ = ce.loss(x)
    torch.manual_seed(0)  # same t and z_t: ce is the unweighted −log p(x | z_t)
    t = ce.data_times(x["input_ids"])
    z_t = ce.process.corrupt(x["input_ids"], t)
    log_p = ce.denoiser(ce.backbone)(z_t, t)
    assert total.item() == pytest.approx(-log_p.gather(-1, x["input_ids"][..., None]).sum().item(), rel=1e-5)


def run_steps(algo, batches):
    import lightning as L

    trainer = L.Trainer(max_steps=len(batches), accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(algo, torch.utils.data.DataLoader(batches, batch_size=None))
    return trainer


def test_training_on_digits_lowers_the_nelbo():
    algo = UDLM(udlm_config())
    held_out = digits_batches(1, 64)

    def mean_nelbo():
        torch.manual_seed(0)
        with torch.no_grad():
            totals = [algo.loss(b) for b in held_out for _ in range(3)]
        return sum(t for t, _ in totals).item() / sum(c for _, c in totals).item()

    before = mean_nelbo()
    run_steps(algo, digits_batches(30, 16))
    after = mean_nelbo()
    assert after < 0.9 * before, (before, after)


def test_validation_reports_the_nelbo_also_for_ce():
    algo = UDLM(udlm_config(loss="ce"))
    batch = digits_batches(1, 8)[0]
    algo.on_validation_epoch_start()
    torch.manual_seed(1)
    algo.validation_step(batch, 0)
    algo._val_weights.__exit__(None, None, None)
    torch.manual_seed(1)
    expected, count = algo.loss(batch, "elbo")
    assert algo._val_sum.item() == pytest.approx(expected.item(), rel=1e-6) and algo._val_count.item() == count


@pytest.mark.parametrize("rule", ["ancestral", "generator"])
def test_generate_returns_valid_ids(rule):
    algo = UDLM(udlm_config())
    pipeline = algo.pipeline(algo.backbone.eval())
    pipeline.sampler = DiffusionSampler(algo.process, rule)
    samples = pipeline.generate(5, steps=4, generator=torch.Generator().manual_seed(0), batch_size=3)
    assert samples.shape == (5, LENGTH) and samples.dtype == torch.long
    assert samples.min() >= 0 and samples.max() < VOCAB
    assert algo.generate(2, steps=3).shape == (2, LENGTH)


def test_checkpoint_meta():
    meta = UDLM(udlm_config()).checkpoint_meta()
    assert meta["process"] == "uniform" and meta["vocab_size"] == VOCAB
    assert meta["schedule"] == "loglinear" and meta["schedule_eps"] == pytest.approx(1e-3)
    assert meta["time_conditioning"] is True and meta["algo"] == "udlm"
    assert "mask_id" not in meta and meta["backbone_config"]["vocab_size"] == VOCAB


@pytest.mark.parametrize(
    "override,message",
    [({"loss": "mse"}, "algo.loss"), ({"time_conditioning": "yes"}, "algo.time_conditioning"),
     ({"bogus_key": 1}, "algo.bogus_key")],
)
def test_bad_algo_settings(override, message):
    with pytest.raises(UserError, match=message):
        UDLM(udlm_config(**override))


@pytest.mark.parametrize("loss,rule", [("elbo", "ancestral"), ("ce", "generator")])
def test_ce_teacher_samples_with_the_mixture_step(tmp_path, loss, rule):
    """Fix c: a CE-trained x̂ is E[x | z_t]; its reverse step is Σ_x x̂(x) q(z_s | z_t, x), not the
    plug-in posterior q(z_s | z_t, x̂). Chi-square of one step against the dense mixture."""
    from scipy.stats import chisquare

    from mdlm_dmmd.checkpoints import save_backbone
    from mdlm_dmmd.diffusion.sampling import step
    from mdlm_dmmd.pipeline import Pipeline

    algo = UDLM(udlm_config(loss=loss))
    pipeline = algo.pipeline(algo.backbone.eval())
    assert pipeline.sampler.rule == rule and algo.checkpoint_meta()["sampling_rule"] == rule
    meta = {k: v for k, v in algo.checkpoint_meta().items() if k not in ("backbone_config", "sampling_rule")}
    save_backbone(tmp_path / "old", algo.backbone, meta)  # written before the rule was recorded
    assert Pipeline.from_checkpoint(tmp_path / "old").sampler.rule == rule
    if loss != "ce":
        return
    n, z_t, t, s = 40000, 3, 0.6, 0.3
    x_hat = torch.softmax(2 * torch.randn(VOCAB, generator=torch.Generator().manual_seed(0), dtype=torch.float64), -1)
    process = algo.process
    tt, ss = torch.full((n,), t), torch.full((n,), s)
    z = step(process, x_hat.log().expand(n, 1, VOCAB), torch.full((n, 1), z_t), tt, ss, rule=pipeline.sampler.rule,
             generator=torch.Generator().manual_seed(1))
    onehot = torch.eye(VOCAB, dtype=torch.float64)
    post = lambda x: process.posterior_probs(torch.tensor([[z_t]]), x[None, None], tt[:1], ss[:1])[0, 0]  # noqa: E731
    mixture = sum(x_hat[c] * post(onehot[c]) for c in range(VOCAB))
    counts = torch.bincount(z.flatten(), minlength=VOCAB).double()
    assert chisquare(counts.numpy(), (mixture * n).numpy()).pvalue > 1e-4
    plug_in = post(x_hat)
    assert chisquare(counts.numpy(), (plug_in * n).numpy()).pvalue < 1e-6


def _duo_nll_per_token(log_p, x, z, alpha, dalpha, V):
    """Duo `DUO_BASE.nll_per_token` for one token, float64 (host-pattern §5.3), written out."""
    xbar_theta = [V * alpha * math.exp(lp) + 1 - alpha for lp in log_p]
    eq = 1.0 if x == z else 0.0
    term1 = V * (1 / ((1 - alpha) + V * alpha * eq) - 1 / xbar_theta[z])
    const = (1 - alpha) / (V * alpha + 1 - alpha)
    term2 = (-(eq * const + (1 - eq)) * (sum(math.log(v) for v in xbar_theta) - V * math.log(xbar_theta[z]))
             - V * alpha / (1 - alpha) * (math.log(xbar_theta[x]) - math.log(xbar_theta[z])) * (1 - eq)
             + ((V - 1) * const * eq - (1 - eq) / const) * math.log(const))
    return dalpha / (V * alpha) * (term1 - term2)


@pytest.mark.parametrize("loss", ["elbo", "ce"])
def test_udlm_loss_equals_the_replayed_duo_nelbo_or_cross_entropy(loss):
    """Random weights (the zero-initialised head makes every token's log-prob −log V, so any
    gathered index passes), padding, replayed t and z_t: Σ valid · Duo's nll_per_token(x, z_t)
    for elbo, Σ valid · −log x̂(x | z_t) for ce."""
    V, B, L, eps = 7, 4, 16, 1e-3
    algo = UDLM(udlm_config(loss=loss, length=L, vocab=V))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in algo.backbone.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    x = torch.randint(0, V, (B, L), generator=g)
    valid = torch.ones_like(x)
    valid[1, 10:] = 0

    torch.manual_seed(7)
    total, count = algo.loss({"input_ids": x, "attention_mask": valid})

    torch.manual_seed(7)  # draws: one time uniform per sequence (stratified), one keep-uniform and one noise id per token
    u = torch.rand(B, 1)
    r = torch.rand(B, L)
    noise = torch.randint(0, V, (B, L))
    expected = 0.0
    with torch.no_grad():
        for b in range(B):
            t = eps + (1 - eps) * ((b + u[b, 0].item()) / B)
            alpha, dalpha = 1 - (1 - eps) * t, -(1 - eps)
            z = torch.where(r[b] < alpha, x[b], noise[b])
            sigma = torch.tensor([-math.log(alpha)])
            log_p = torch.log_softmax(algo.backbone(z[None], sigma)[0].double(), -1)  # [L, V]
            for i in range(L):
                if not valid[b, i]:
                    continue
                if loss == "ce":
                    expected += -log_p[i, x[b, i]].item()
                else:
                    expected += _duo_nll_per_token(log_p[i].tolist(), x[b, i].item(), z[i].item(), alpha, dalpha, V)
    assert count == valid.sum()
    assert total.item() == pytest.approx(expected, rel=2e-4)
