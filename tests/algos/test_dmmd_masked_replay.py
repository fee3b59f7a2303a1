"""Masked D-MMD with a time-conditioned teacher (the times each network sees matter: teacher and
auxiliary at (z_s, s), the generator at (z_t, t)), the teacher's temperature and nucleus by hand
(§3.3), δ ~ U(0, 1/k) of Algorithm 1, the first update and the EMA following generator updates
only. Each was written against a mutation the other tests let through."""
import math

import pytest
import torch

from mdlm_dmmd.algos.dmmd import DMMD, distillation_times, modified_teacher
from mdlm_dmmd.checkpoints import save_backbone
from mdlm_dmmd.diffusion.sampling import sample_categorical
from mdlm_dmmd.models.dit import DiTConfig

from conftest import host_config, random_model

VOCAB, LENGTH = 17, 64


@pytest.fixture(scope="module")
def tc_teacher(tmp_path_factory):
    """A time-conditioned masked teacher: x̂(z, s) ≠ x̂(z, t), so the times each network sees matter."""
    model = random_model(DiTConfig(vocab_size=VOCAB + 1, length=LENGTH, hidden_dim=32, cond_dim=16, n_blocks=1,
                                   n_heads=2, dropout=0.0), seed=0)
    meta = {"process": "masked", "mask_id": VOCAB, "schedule": "loglinear", "schedule_eps": 1e-3,
            "time_conditioning": True}
    return save_backbone(tmp_path_factory.mktemp("tc_teacher"), model, meta)


def cfg(teacher, **algo):
    return host_config({"name": "dmmd", "teacher": str(teacher), "sampling_steps": 4, "noise_dim": 8, **algo},
                       vocab=VOCAB, length=LENGTH, ema=0.5)


@pytest.mark.parametrize("phase", ["gen", "aux"])
def test_time_conditioned_replay_with_temperature(tc_teacher, phase):
    """Replay the draws; eqs. 11-12 per token with w(s) = 1/s (ELBO weighting), teacher tempered
    (0.7) and Δ-lowered outside its top-0.8 nucleus, on the positions still masked in z_s."""
    algo = DMMD(cfg(tc_teacher, aux_target="hard", weighting="elbo", teacher_top_p=0.8, teacher_temperature=0.7))
    for seed, network in enumerate((algo.generator, algo.aux), start=1):
        network.load_state_dict(random_model(network.config, seed=seed).state_dict())
    x_data = torch.randint(0, VOCAB, (4, LENGTH), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(11)
    loss, _ = algo.phase_loss({"input_ids": x_data}, phase)
    torch.manual_seed(11)
    process = algo.process
    s, t = distillation_times(4, 4, "cpu")
    z_t = process.corrupt(x_data, t)
    with torch.no_grad():
        p_gen = algo.log_probs(algo.generator, z_t, t).exp()
        masked = z_t == VOCAB
        revealed = masked & (torch.rand(z_t.shape, dtype=torch.float64) < process.reveal_probability(z_t, t, s))
        drawn = masked if phase == "aux" else revealed
        x = z_t.clone()
        u = torch.rand(z_t.shape, dtype=torch.float64)
        x[drawn] = sample_categorical(p_gen[drawn], uniforms=u[drawn])
        z_s = torch.where(revealed, x, z_t)
        log_teacher = modified_teacher(algo.log_probs(algo.teacher, z_s, s), 0.7, 0.8, 2.0)
        log_aux = algo.log_probs(algo.aux, z_s, s)
    w = 1 / s.clamp_min(1e-3)[:, None]
    if phase == "gen":
        per_token = -w * (p_gen * (log_teacher - log_aux)).sum(-1)
    else:
        target = torch.nn.functional.one_hot(x, VOCAB + 1).float()
        per_token = -w * ((target + log_teacher.exp()) * log_aux).sum(-1)
    expected = (per_token * (z_s == VOCAB)).sum() / z_t.numel()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


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
