"""AR baseline: the loss against a hand-built next-token cross-entropy, causality, greedy decoding
by hand, a short training run, and sampling back from its checkpoint."""

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from mdlm_dmmd.algos.ar import AR
from mdlm_dmmd.cli import compose
from mdlm_dmmd.data import build_data, make_loaders
from mdlm_dmmd.pipeline import Pipeline
from mdlm_dmmd.training import vocab_info

V_DATA = 17  # digits; the start token is id 17


def digits_config(*overrides) -> tuple[dict, object]:
    cfg = compose(["algo=ar", "debug=cpu", "data=digits", "model.length=64", *overrides])
    data = build_data(cfg.data, cfg.model.length)
    config = OmegaConf.to_container(cfg, resolve=True)
    config["vocab"] = vocab_info(data)
    return config, data


def random_ar(seed: int = 0) -> tuple[AR, object]:
    config, data = digits_config()
    algo = AR(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in algo.backbone.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    algo.init_ema(algo.backbone)  # `generate` samples the EMA weights: start them here too
    return algo.eval(), data


def shifted(x: torch.Tensor) -> torch.Tensor:
    """[start, x_0, ..., x_{L-2}] built by hand."""
    out = torch.full_like(x, V_DATA)
    out[:, 1:] = x[:, :-1]
    return out


def test_loss_is_next_token_cross_entropy_with_start_shift():
    algo, data = random_ar()
    x = torch.stack([data.train[i]["input_ids"] for i in range(3)])
    valid = torch.ones_like(x)
    valid[2, 40:] = 0
    total, count = algo.loss({"input_ids": x, "attention_mask": valid})

    expected = 0.0
    with torch.no_grad():
        logits = algo.backbone(shifted(x), torch.zeros(3)).double()  # [B, L, V+1]
        for b in range(3):
            for i in range(64):
                if valid[b, i]:
                    log_p = torch.log_softmax(logits[b, i, :V_DATA], dim=-1)  # the start id is never predicted
                    expected -= log_p[x[b, i]].item()
    assert count == valid.sum()
    assert total.item() == pytest.approx(expected, rel=1e-5)


def test_causal_future_tokens_do_not_change_past_log_probs():
    algo, data = random_ar()
    pipe = algo.denoiser(algo.backbone)
    x = data.train[0]["input_ids"][None].clone()
    for j in (0, 17, 62):
        changed = x.clone()
        changed[0, j] = (x[0, j] + 5) % V_DATA
        with torch.no_grad():
            a = pipe.next_token_log_probs(shifted(x))
            b = pipe.next_token_log_probs(shifted(changed))
        # position i predicts x_i from x_<i: x_j is seen from position j + 1 on
        torch.testing.assert_close(a[:, : j + 1], b[:, : j + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(a[:, j + 1], b[:, j + 1], atol=1e-4)


def test_greedy_generation_equals_argmax_decoding_by_hand():
    algo, _ = random_ar()
    samples = algo.generate(2, steps=1, temperature=0.0)
    x = torch.zeros(2, 64, dtype=torch.long)
    with torch.no_grad():
        for i in range(64):
            logits = algo.backbone(shifted(x), torch.zeros(2))[:, i, :V_DATA]
            x[:, i] = logits.argmax(-1)
    assert torch.equal(samples, x)


def test_generate_shape_and_range():
    algo, _ = random_ar()
    samples = algo.generate(5, steps=1, generator=torch.Generator().manual_seed(0), batch_size=2)
    assert samples.shape == (5, 64) and samples.dtype == torch.long
    assert samples.min() >= 0 and samples.max() < V_DATA


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    config, data = digits_config("optim.lr=3e-3", "loader.batch_size=32")
    L.seed_everything(0, verbose=False)
    algo = AR(config)
    train_loader, valid_loader = make_loaders(data, batch_size=32, eval_batch_size=64, seed=0)
    held_out = next(iter(valid_loader))

    def held_out_loss():  # deterministic: AR draws no noise
        with torch.no_grad():
            total, count = algo.loss(held_out)
        return (total / count).item()

    before = held_out_loss()
    trainer = L.Trainer(max_steps=30, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    trainer.fit(algo, train_loader)
    path = tmp_path_factory.mktemp("ar") / "tiny.ckpt"
    trainer.save_checkpoint(str(path), weights_only=False)
    return {"algo": algo, "before": before, "after": held_out_loss(), "ckpt": path}


def test_training_lowers_the_loss(trained):
    assert trained["after"] < 0.9 * trained["before"], (trained["before"], trained["after"])


def test_checkpoint_samples_like_the_algo(trained):
    algo = trained["algo"]
    meta = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)["mdlm_dmmd"]
    assert meta["process"] == "autoregressive" and meta["start_id"] == V_DATA
    assert meta["backbone_config"]["causal"] is True
    pipe = Pipeline.from_checkpoint(trained["ckpt"])
    assert pipe.is_autoregressive and pipe.denoiser.vocab_size == V_DATA == pipe.sampler.start_id
    expected = algo.generate(3, steps=1, generator=torch.Generator().manual_seed(5))
    got = pipe.generate(3, steps=1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, expected)
