"""The process protocol: both built-in processes meet it, its soft paths agree with the hard ones
and with sampling, and a third-party process written here works with the built-in samplers."""

import math
import typing
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from scipy.stats import chisquare

from mdlm_dmmd.algos.dmmd import DMMDConfig
from mdlm_dmmd.checkpoint_meta import CheckpointMeta
from mdlm_dmmd.diffusion import MaskedProcess, Process, UniformProcess, missing_members
from mdlm_dmmd.diffusion.process import MEMBERS
from mdlm_dmmd.diffusion.sampling import sample, step
from mdlm_dmmd.diffusion.schedules import DuoSchedule, LogLinear
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.models.dit import DiT, DiTConfig
from mdlm_dmmd.pipeline import Pipeline

V = 7  # data tokens
MASKED = MaskedProcess(LogLinear(), mask_id=V)
UNIFORM = UniformProcess(DuoSchedule(V), vocab_size=V)
BUILT_IN = [MASKED, UNIFORM]


def test_member_list_is_the_protocol():
    assert sorted(MEMBERS) == sorted(typing._get_protocol_attrs(Process))


@pytest.mark.parametrize("process", BUILT_IN, ids=["masked", "uniform"])
def test_built_in_processes_meet_the_protocol(process):
    assert isinstance(process, Process) and missing_members(process) == []


def test_capabilities_by_hand():
    assert (MASKED.deterministic_prior, MASKED.posterior_linear_in_x, MASKED.has_elbo_weight) == (True, True, True)
    assert (UNIFORM.deterministic_prior, UNIFORM.posterior_linear_in_x, UNIFORM.has_elbo_weight) == (False, False, False)
    assert not MASKED.soft_corruption and UNIFORM.soft_corruption
    assert not UniformProcess(LogLinear(), vocab_size=V).soft_corruption
    assert MASKED.network_vocab(V) == V + 1 and UNIFORM.network_vocab(V) == V


@pytest.mark.parametrize("process", BUILT_IN, ids=["masked", "uniform"])
def test_marginal_is_the_law_of_corrupt_and_soft_x_agrees_with_hard(process):
    n, t = 60000, torch.tensor([0.4])
    x = torch.full((n, 1), 2)
    z = process.corrupt(x, t.expand(n), generator=torch.Generator().manual_seed(0))
    classes = process.network_vocab(V)
    hard = process.marginal_probs(x[:1], t)[0, 0]
    soft = process.marginal_probs(torch.nn.functional.one_hot(x[:1], classes).float(), t)[0, 0]
    assert torch.allclose(hard, soft) and hard.sum().item() == pytest.approx(1.0)
    counts = torch.bincount(z.flatten(), minlength=classes).double()
    expected = hard * n
    keep = expected > 0
    assert counts[~keep].sum() == 0
    assert chisquare(counts[keep].numpy(), expected[keep].numpy()).pvalue > 1e-3


@pytest.mark.parametrize("process", BUILT_IN, ids=["masked", "uniform"])
def test_posterior_of_token_ids_equals_that_of_their_one_hot(process):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (3, 5), generator=g)
    z_t = process.corrupt(x, torch.full((3,), 0.7), generator=g)
    t, s = torch.full((3,), 0.7), torch.full((3,), 0.3)
    onehot = torch.nn.functional.one_hot(x, process.network_vocab(V)).double()
    assert torch.equal(process.posterior_probs(z_t, x, t, s), process.posterior_probs(z_t, onehot, t, s))


def test_masked_log_probs_of_a_soft_z_match_the_hard_case_and_carry_gradients():
    g = torch.Generator().manual_seed(2)
    z = torch.tensor([[V, 3, V, 0]])
    logits = torch.randn(1, 4, V + 1, generator=g)
    hard = MASKED.log_probs(logits, z).exp()
    soft_z = torch.nn.functional.one_hot(z, V + 1).float().requires_grad_(True)
    soft = MASKED.log_probs(logits, soft_z).exp()
    assert torch.allclose(hard, soft, atol=1e-6)
    assert torch.equal(MASKED.denoising_positions(soft_z.detach()), MASKED.denoising_positions(z))
    soft[0, 0, 1].backward()  # a masked position's prediction depends on how masked it is
    assert soft_z.grad[0, 0, V] != 0


def test_duo_soft_corruption_has_the_argmax_law_of_q_and_is_differentiable():
    n, t = 40000, torch.full((40000,), 0.5)
    x = torch.full((n, 1), 4)
    z = UNIFORM.corrupt_soft(x, t, generator=torch.Generator().manual_seed(3))
    assert z.shape == (n, 1, V) and torch.allclose(z.sum(-1), torch.ones(n, 1))
    expected = UNIFORM.marginal_probs(x[:1], t[:1])[0, 0] * n
    counts = torch.bincount(z.argmax(-1).flatten(), minlength=V).double()
    assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3
    soft_x = torch.full((2, 3, V), 1 / V, requires_grad=True)
    UNIFORM.corrupt_soft(soft_x, torch.full((2,), 0.5), generator=torch.Generator().manual_seed(4))[..., 0].sum().backward()
    assert soft_x.grad.abs().sum() > 0


def test_soft_corruption_is_refused_where_the_process_has_none():
    with pytest.raises(UserError, match="no reparameterised soft corruption"):
        MASKED.corrupt_soft(torch.zeros(1, 2, dtype=torch.long), torch.ones(1))
    with pytest.raises(UserError, match="noise=duo"):
        UniformProcess(LogLinear(), vocab_size=V).corrupt_soft(torch.zeros(1, 2, dtype=torch.long), torch.ones(1))


def test_uniform_elbo_weight_is_a_clear_error():
    with pytest.raises(UserError, match="no scalar ELBO weight"):
        UNIFORM.elbo_weight(torch.ones(1))


# -- a third party's process: absorbing state at id 0, real tokens 1..V ------------------------
@dataclass(frozen=True)
class FirstIdMasking:
    """Masking with the mask as the *first* id, written from the protocol alone (no subclassing)."""

    schedule: LogLinear
    name: str = "first_id_masking"
    deterministic_prior: ClassVar[bool] = True
    posterior_linear_in_x: ClassVar[bool] = True
    has_elbo_weight: ClassVar[bool] = True
    soft_corruption: ClassVar[bool] = False

    def meta(self):
        return {"process": self.name}

    def network_vocab(self, data_vocab):
        return data_vocab + 1

    def _alpha(self, t, like):
        return self.schedule.alpha(t[:, None].expand(like.shape[:2]) if t.dim() == 1 else t).double()

    def corrupt(self, x, t, generator=None):
        u = torch.rand(x.shape, generator=generator, dtype=torch.float64)
        return torch.where(u < self._alpha(t, x), x, 0)

    def marginal_probs(self, x, t):
        probs = self._alpha(t, x)[..., None] * torch.nn.functional.one_hot(x, V + 1).double()
        probs[..., 0] += 1 - self._alpha(t, x)
        return probs

    def corrupt_soft(self, x, t, generator=None, temperature=1.0):
        raise NotImplementedError

    def prior(self, shape, device="cpu", generator=None):
        return torch.zeros(shape, dtype=torch.long, device=device)

    def _reveal(self, z_t, t, s):
        a_t, a_s = self._alpha(t, z_t), self._alpha(s, z_t)
        return ((a_s - a_t) / (1 - a_t).clamp_min(1e-12)).clamp(0, 1)

    def posterior_probs(self, z_t, x, t, s):
        x = x.double() if x.is_floating_point() else torch.nn.functional.one_hot(x, V + 1).double()
        reveal = self._reveal(z_t, t, s)[..., None]
        probs = reveal * x
        probs[..., 0] = 1 - reveal[..., 0]
        carry = torch.nn.functional.one_hot(z_t, V + 1).double()
        return torch.where((z_t != 0)[..., None], carry, probs)

    def sample_posterior(self, z_t, x, t, s, generator=None):
        u = torch.rand(z_t.shape, generator=generator, dtype=torch.float64)
        return torch.where((z_t == 0) & (u < self._reveal(z_t, t, s)), x, z_t)

    def draw_updated_positions(self, z_t, t, s, generator=None):
        return None  # this third party takes the full path

    def denoising_positions(self, z):
        return z == 0

    def log_probs(self, logits, z_t):
        logits = logits.float().clone()
        logits[..., 0] = -1e6
        log_p = torch.log_softmax(logits, -1)
        carry = torch.full_like(log_p, -1e6).scatter_(-1, z_t[..., None], 0.0)
        return torch.where((z_t != 0)[..., None], carry, log_p)

    def elbo_weight(self, t):
        return 1 / t

    def nelbo(self, log_p, x, z_t, t):
        return torch.where(z_t == 0, -log_p.gather(-1, x[..., None])[..., 0] / t[:, None], 0.0)


THIRD = FirstIdMasking(LogLinear())


def test_third_party_process_meets_the_protocol():
    assert isinstance(THIRD, Process) and missing_members(THIRD) == []
    assert missing_members(object()) == list(MEMBERS)


@pytest.mark.parametrize("rule", ["ancestral", "generator"])
def test_third_party_process_samples_its_denoiser_law_with_the_built_in_sampler(rule):
    """One step from the prior to s = 0 reveals every token as a draw of x̂: chi-square on x̂."""
    x_hat = torch.tensor([0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.15, 0.1])  # id 0 is the mask
    n = 20000

    def denoise(z_t, t):
        return THIRD.log_probs(torch.log(x_hat.clamp_min(1e-30)).expand(*z_t.shape, V + 1), z_t)

    out = sample(denoise, THIRD, steps=1, shape=(n, 1), generator=torch.Generator().manual_seed(5), rule=rule)
    counts = torch.bincount(out.flatten(), minlength=V + 1).double()
    assert counts[0] == 0
    assert chisquare(counts[1:].numpy(), (x_hat[1:] * n).double().numpy()).pvalue > 1e-3
    z = step(THIRD, denoise(torch.zeros(4, 3, dtype=torch.long), torch.ones(4)), torch.zeros(4, 3, dtype=torch.long),
             torch.ones(4), torch.full((4,), 0.5), rule=rule, generator=torch.Generator().manual_seed(6))
    assert z.shape == (4, 3)


def test_third_party_process_runs_in_a_pipeline_and_sets_distillation_defaults():
    network = DiT(DiTConfig(vocab_size=V + 1, length=6, hidden_dim=16, cond_dim=8, n_blocks=1, n_heads=2)).eval()
    samples = Pipeline.diffusion(network, THIRD).generate(5, steps=3, generator=torch.Generator().manual_seed(7))
    assert samples.shape == (5, 6) and int(samples.min()) >= 1 and int(samples.max()) <= V
    resolved = DMMDConfig().for_teacher(THIRD, CheckpointMeta())
    assert resolved.noise_input is True and resolved.aux_target == "soft" and resolved.loss_space == "x0"
    resolved = DMMDConfig().for_teacher(UNIFORM, CheckpointMeta(loss="elbo"))
    assert resolved.noise_input is False and resolved.aux_target == "hard" and resolved.loss_space == "posterior"
    assert math.isclose(float(THIRD.elbo_weight(torch.tensor(0.5))), 2.0)
