"""Denoiser + sampler = pipeline: the same denoiser object serves losses and samplers, the
sampler is picked once, and the pipeline runs diffusion and AR models through one path."""

import pytest
import torch

from mdlm_dmmd.denoiser import BlockDenoiser, CausalDenoiser, Denoiser
from mdlm_dmmd.diffusion.block_sampling import BlockSampler, sample_blocks
from mdlm_dmmd.diffusion import MaskedProcess
from mdlm_dmmd.diffusion.sampling import AutoregressiveSampler, DiffusionSampler, sample, sample_autoregressive
from mdlm_dmmd.diffusion.schedules import LogLinear
from mdlm_dmmd.models.dit import DiT, DiTConfig
from mdlm_dmmd.pipeline import Pipeline

V, L = 9, 6
PROCESS = MaskedProcess(LogLinear(), mask_id=V)


def network(**extra) -> DiT:
    torch.manual_seed(0)
    return DiT(DiTConfig(vocab_size=V + 1, length=L, hidden_dim=16, cond_dim=8, n_blocks=1, n_heads=2, **extra)).eval()


def test_diffusion_pipeline_is_the_sampler_applied_to_the_denoiser():
    net = network()
    pipeline = Pipeline.diffusion(net, PROCESS, rule="generator")
    assert pipeline.sampler == DiffusionSampler(PROCESS, "generator") and not pipeline.is_autoregressive
    got = pipeline.generate(4, steps=3, generator=torch.Generator().manual_seed(1))
    want = sample(Denoiser(net, PROCESS), PROCESS, steps=3, shape=(4, L), rule="generator",
                  generator=torch.Generator().manual_seed(1))
    assert torch.equal(got, want)


def test_autoregressive_pipeline_goes_through_the_same_generate():
    net = network(causal=True)
    pipeline = Pipeline.autoregressive(net, V)
    assert pipeline.is_autoregressive and pipeline.sampler == AutoregressiveSampler(V)
    got = pipeline.generate(3, steps=999, generator=torch.Generator().manual_seed(2))  # steps: unused by AR
    want = sample_autoregressive(CausalDenoiser(net, V).next_token_log_probs, shape=(3, L), start_id=V,
                                 generator=torch.Generator().manual_seed(2))
    assert torch.equal(got, want) and int(got.max()) < V


def test_block_pipeline_hands_the_denoiser_itself_to_the_block_sampler():
    net = network()
    pipeline = Pipeline.block(net, PROCESS, False, 2)
    assert pipeline.sampler == BlockSampler(PROCESS, 2) and pipeline.block_size == 2
    got = pipeline.generate(3, steps=2, generator=torch.Generator().manual_seed(3))
    want = sample_blocks(BlockDenoiser(net, PROCESS, block_size=2), PROCESS, block_size=2, steps=2, shape=(3, L),
                         generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, want)


def test_noise_input_is_drawn_fresh_on_every_call():
    net = network(noise_dim=4)
    for parameter in net.parameters():  # the zero-initialised output and noise layers would hide the noise
        torch.nn.init.normal_(parameter, std=0.3)
    denoiser = Denoiser(net, PROCESS)
    z, t = torch.full((2, L), V), torch.ones(2)
    with torch.no_grad():
        assert not torch.allclose(denoiser(z, t), denoiser(z, t))
        a = denoiser(z, t, generator=torch.Generator().manual_seed(4))
        b = denoiser(z, t, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)


def test_a_block_denoisers_noise_input_reaches_the_noisy_half_only():
    """Training ([z_t, x_0]) equals sampling block by block with the clean prefix (zero noise on
    it, as the KV cache's commit) for the same noise on the noisy tokens: noise fed to the x_0
    half too would change the keys and values every later block attends to."""
    net = network(noise_dim=4)
    for parameter in net.parameters():  # the zero-initialised output and noise layers would hide the noise
        torch.nn.init.normal_(parameter, std=0.3)
    denoiser, K = BlockDenoiser(net, PROCESS, block_size=2), 2
    x0 = torch.randint(0, V, (3, L), generator=torch.Generator().manual_seed(0))
    z_t = torch.where(torch.rand(3, L, generator=torch.Generator().manual_seed(1)) < 0.5, x0, V)
    noise = net.draw_noise(3, L, generator=torch.Generator().manual_seed(2), device="cpu")
    draws = iter([noise] + [noise[:, j:j + K] for j in range(0, L, K)])  # training's draw, then each block's
    net.draw_noise = lambda *args, **kwargs: next(draws)
    t = torch.ones(3)
    with torch.no_grad():
        training = denoiser.log_probs(z_t, t, clean=x0)
        by_block = torch.cat([denoiser.block_log_probs(z_t[:, j:j + K], t, prefix=x0[:, :j] if j else None)
                              for j in range(0, L, K)], dim=1)
    torch.testing.assert_close(training, by_block, rtol=1e-5, atol=1e-5)


def test_time_conditioning_feeds_sigma_or_zero():
    t = torch.tensor([0.25, 0.75])
    assert torch.equal(Denoiser(network(), PROCESS).sigma(t), torch.zeros(2))
    assert torch.allclose(Denoiser(network(), PROCESS, time_conditioning=True).sigma(t), -torch.log1p(-(1 - 1e-3) * t))  # LogLinear(eps=1e-3)


def test_only_block_pipelines_sample_past_the_model_length():
    import pytest

    from mdlm_dmmd.errors import UserError

    net = network()
    block = Pipeline.block(net, PROCESS, False, 2)
    assert block.generate(2, steps=2, length=3 * L, generator=torch.Generator().manual_seed(0)).shape == (2, 3 * L)
    with pytest.raises(UserError, match="sampling.length must be a positive multiple of the block size 2, got 7"):
        block.generate(1, steps=2, length=7)
    with pytest.raises(UserError, match="sampling.length is an option of the block sampler"):
        Pipeline.diffusion(net, PROCESS).generate(1, steps=2, length=2 * L)


def test_the_masked_process_reuses_handed_over_logits_only_without_gradient():
    """`overwrite=True` (the Denoiser hands over the network's fresh logits): without gradient the
    mask's logit is set in place (no [.., V] copy); with gradient, or by default, the caller's
    tensor is left alone. The log-probs are the same either way."""
    z = torch.tensor([[V, 3, V]])
    logits = torch.randn(1, 3, V + 1)
    want = PROCESS.log_probs(logits, z)
    assert logits[..., V].abs().max() < 10  # untouched by default
    handed = logits.clone()
    assert torch.equal(PROCESS.log_probs(handed, z, overwrite=True), want)
    assert (handed[..., V] < -1e5).all()  # masked in place
    tracked = logits.clone().requires_grad_()
    assert torch.equal(PROCESS.log_probs(tracked, z, overwrite=True), want)
    assert tracked[..., V].abs().max() < 10


def test_the_denoiser_hands_logits_over_only_to_processes_that_take_them():
    calls = []

    class Plain(MaskedProcess):  # a plugin process with the protocol's two-argument log_probs
        def log_probs(self, logits, z_t):
            calls.append("plain")
            return super().log_probs(logits, z_t)

    class Recording(MaskedProcess):
        def log_probs(self, logits, z_t, *, overwrite=False):
            calls.append(overwrite)
            return super().log_probs(logits, z_t, overwrite=overwrite)

    z, t = torch.full((2, L), V), torch.full((2,), 0.5)
    with torch.no_grad():
        plain = Denoiser(network(), Plain(LogLinear(), mask_id=V))(z, t)
        handed = Denoiser(network(), Recording(LogLinear(), mask_id=V))(z, t)
    assert calls == ["plain", True] and torch.equal(plain, handed)


def test_the_causal_denoiser_scores_the_real_tokens_columns():
    """An AR network's head has a start token's column after the V real ones: x̂ is over 0..V−1."""
    net = DiT(DiTConfig(vocab_size=V + 1, length=L, hidden_dim=16, cond_dim=8, n_blocks=1, n_heads=2, causal=True))
    with torch.no_grad():
        net.output_layer.linear.weight.zero_()
        net.output_layer.linear.bias.copy_(torch.tensor([0.0] * 3 + [50.0] + [0.0] * (V - 3)))  # token 3 always
    log_p = CausalDenoiser(net, V)(torch.zeros(2, L, dtype=torch.long))
    assert log_p.shape == (2, L, V) and (log_p.argmax(-1) == 3).all()


def test_a_block_denoiser_needs_its_block_size():
    for bad in (0, -4, 2.0, True):
        with pytest.raises(ValueError, match="BlockDenoiser needs block_size, a positive int"):
            BlockDenoiser(network(), PROCESS, block_size=bad)
    assert BlockDenoiser(network(), PROCESS, block_size=3).block_size == 3


def test_log_probs_at_positions_equal_the_full_ones_there_clean_tokens_included():
    """`at` may cover clean tokens too: each gathered row gets its own z_t (SUBS carries a clean
    token over), so x̂ at `at` is the full x̂ read there."""
    net = network()
    for parameter in net.parameters():  # the zero-initialised output layer would make every row alike
        torch.nn.init.normal_(parameter, std=0.3)
    denoiser = Denoiser(net, PROCESS)
    z = torch.tensor([[1, V, 2, V, 3, 4], [V, 5, V, 6, 7, V]])
    at = torch.tensor([[True, True, True, False, True, False], [True, True, False, True, False, True]])
    t = torch.full((2,), 0.5)
    with torch.no_grad():
        full = denoiser(z, t)
        part = denoiser(z, t, at=at)
    torch.testing.assert_close(part, full[at], rtol=1e-5, atol=1e-5)
    assert (part[:, :V].exp().sum(-1) - 1).abs().max() < 1e-5


def test_block_log_probs_refuses_a_partial_prefix_or_both_prefix_and_cache():
    denoiser = BlockDenoiser(network(), PROCESS, block_size=2)
    z = torch.full((1, 2), V)
    with pytest.raises(ValueError, match="must be whole blocks of 2"):
        denoiser.block_log_probs(z, torch.ones(1), prefix=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="not both"):
        denoiser.block_log_probs(z, torch.ones(1), prefix=torch.zeros(1, 2, dtype=torch.long),
                                 kv_cache=denoiser.new_cache())
