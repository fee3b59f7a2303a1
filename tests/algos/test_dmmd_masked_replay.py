"""Masked D-MMD: the teacher's temperature and nucleus by hand (§3.3), δ ~ U(0, 1/k) of
Algorithm 1, the first update and the EMA following generator updates only. Each was written
against a mutation the other tests let through (the time-conditioned replay of the phase losses
is in test_dmmd.py's dense-formula test)."""

import math

import pytest
import torch

from mdlm_dmmd.algos.dmmd import DMMD, distillation_times, modified_teacher

from conftest import host_config
from test_dmmd import LENGTH, VOCAB, make_teacher


@pytest.fixture(scope="module")
def tc_teacher(tmp_path_factory):
    return make_teacher(tmp_path_factory.mktemp("tc_teacher"), time_conditioning=True)


def cfg(teacher, **algo):
    return host_config({"name": "dmmd", "teacher": str(teacher), "sampling_steps": 4, "noise_dim": 8, **algo},
                       vocab=VOCAB, length=LENGTH, ema=0.5)


def test_tempered_nucleus_by_hand():
    """The nucleus is taken on the tempered teacher (τ = 2: three tokens; untempered: two)."""
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = modified_teacher(p.log(), temperature=2.0, top_p=0.75, delta=2.0)
    tempered = p.sqrt() / p.sqrt().sum()  # [0.379, 0.294, 0.208, 0.120]: cumulative 0, .379, .672, .880
    lowered = tempered * torch.tensor([[1, 1, 1, math.exp(-2)]])  # nucleus of the tempered: first three
    torch.testing.assert_close(out.exp(), lowered / lowered.sum(), rtol=1e-5, atol=1e-6)


def test_delta_is_uniform_on_0_1_over_k():
    s, t = distillation_times(200_000, 4, "cpu", torch.Generator().manual_seed(0))
    d = (t - s)[s < 0.75]  # no clipping there: δ itself
    assert abs(d.mean().item() - 1 / 8) < 2e-3 and d.max().item() > 0.249
    assert abs((d > 0.125).float().mean().item() - 0.5) < 0.01


def test_default_first_update_is_the_generator(tc_teacher):
    algo = DMMD(host_config({"name": "dmmd", "teacher": str(tc_teacher)}, vocab=VOCAB, length=LENGTH))
    assert algo.alternation.phase() == "gen"


def test_ema_follows_generator_updates_only(tc_teacher):
    """An auxiliary update, then a generator update: the EMA (decay 0.5, warm-up (1 + n)/(10 + n))
    took exactly one step, toward the generator."""
    import lightning as L

    algo = DMMD(cfg(tc_teacher, first_step="aux", lr_generator=1e-2, lr_aux=1e-2))
    init = {k: v.clone() for k, v in algo.generator.named_parameters()}
    data = [{"input_ids": torch.randint(0, VOCAB, (8, LENGTH), generator=torch.Generator().manual_seed(i))} for i in range(2)]
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(algo, torch.utils.data.DataLoader(data, batch_size=None))  # update 0 aux, update 1 gen
    assert algo.ema.num_updates == 1
    decay = min(0.5, 2 / 11)
    moved = False
    for name, p in algo.generator.named_parameters():
        want = init[name] + (1 - decay) * (p.detach() - init[name])
        torch.testing.assert_close(algo.ema.shadow[name], want)
        moved |= not torch.equal(p.detach(), init[name])
    assert moved
