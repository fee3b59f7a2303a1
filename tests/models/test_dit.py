"""DiT backbone: public-fixture logits, soft input, causality, attention backends, noise input, config.

Attention kernels: test_attention.py; positions, per-position sigma and the KV cache: test_block_inputs.py;
the public BD3-LM fixture: test_bd3lm_fixture.py; public config.json names: tests/test_public_config.py."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mdlm_dmmd.errors import UserError
from mdlm_dmmd.models.attention import flash_attn_available
from mdlm_dmmd.models.dit import DiT, DiTConfig, Rotary
from mdlm_dmmd.models.kv_cache import KVCache

from conftest import fixture_path, random_model

REPO_ROOT = Path(__file__).resolve().parents[2]


def fixture_dir() -> Path:
    """`tests/fixtures/mdlm-dit/`, in the repository (tests/fixtures/README.md says how it was made)."""
    return fixture_path("mdlm-dit")


def tiny_config(**overrides) -> DiTConfig:
    fields = dict(vocab_size=13, length=10, hidden_dim=32, cond_dim=16, n_blocks=2, n_heads=4, dropout=0.0)
    fields.update(overrides)
    return DiTConfig(**fields)


def tokens(config: DiTConfig, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, config.length), generator=g)


# ---------------------------------------------------------------------------------------------
# Reference fixture from the public MDLM code


def load_fixture():
    folder = fixture_dir()
    state_dict = load_file(str(folder / "mdlm_tiny_state_dict.safetensors"))
    io = load_file(str(folder / "mdlm_tiny_io.safetensors"))
    config = DiTConfig(vocab_size=101, length=32, hidden_dim=64, cond_dim=32, n_blocks=2, n_heads=4, dropout=0.0)
    return config, state_dict, io


@pytest.mark.parametrize("backend", ["sdpa", "flex", "auto"])
def test_reproduces_public_mdlm_logits(backend):
    config, state_dict, io = load_fixture()
    config.attn_backend = backend
    model = DiT(config).eval()
    model.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        logits = model(io["indices"], io["sigma"])
    assert logits.dtype == torch.float32
    # 5e-5 on logits up to 8.5: fp32 summation order differs between kernels, thread counts and
    # devices (1.2e-5 seen on an H100, 2026-11-26); a wrong formula is off by far more.
    assert (logits - io["logits"]).abs().max().item() <= 5e-5


def test_state_dict_keys_and_parameter_order_are_public():
    config, state_dict, _ = load_fixture()
    model = DiT(config)
    assert set(model.state_dict()) == set(state_dict)
    names = [name for name, _ in model.named_parameters()]
    # Upstream registration order (EMA shadow_params lists depend on it), host-pattern §3.1.
    assert names[:5] == ["vocab_embed.embedding", "sigma_map.mlp.0.weight", "sigma_map.mlp.0.bias",
                         "sigma_map.mlp.2.weight", "sigma_map.mlp.2.bias"]
    assert names[5:16] == [f"blocks.0.{n}" for n in ["norm1.weight", "attn_qkv.weight", "attn_out.weight",
                                                     "norm2.weight", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight",
                                                     "mlp.2.bias", "adaLN_modulation.weight",
                                                     "adaLN_modulation.bias"]] + ["blocks.1.norm1.weight"]
    assert names[-5:] == ["output_layer.norm_final.weight", "output_layer.linear.weight", "output_layer.linear.bias",
                          "output_layer.adaLN_modulation.weight", "output_layer.adaLN_modulation.bias"]


def test_init_is_adaln_zero():
    model = DiT(tiny_config())
    for block in model.blocks:
        assert not block.adaLN_modulation.weight.any() and not block.adaLN_modulation.bias.any()
    assert not model.output_layer.linear.weight.any() and not model.output_layer.linear.bias.any()
    assert model.vocab_embed.embedding.std() > 0


# ---------------------------------------------------------------------------------------------
# Inputs


def test_one_hot_soft_input_equals_hard_input():
    config = tiny_config()
    model = random_model(config)
    x = tokens(config)
    sigma = torch.tensor([0.0, 2.0])
    probs = F.one_hot(x, config.vocab_size).float()  # [B, L, V]
    with torch.no_grad():
        assert torch.equal(model(probs, sigma), model(x, sigma))


def test_soft_input_is_differentiable():
    config = tiny_config()
    model = random_model(config)
    logits = torch.randn(2, config.length, config.vocab_size, requires_grad=True)
    model(logits.softmax(-1), torch.zeros(2)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_scalar_sigma_broadcasts():
    config = tiny_config()
    model = random_model(config)
    x = tokens(config)
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor(0.5)), model(x, torch.full((2,), 0.5)))


@pytest.mark.parametrize("per_token_sigma", [False, True])
def test_logits_at_some_positions_are_those_rows_of_the_full_logits(per_token_sigma):
    config = tiny_config()
    model = random_model(config)
    x = tokens(config)
    g = torch.Generator().manual_seed(2)
    sigma = torch.rand(2, config.length, generator=g) if per_token_sigma else torch.tensor([0.3, 1.2])
    with torch.no_grad():
        at = torch.rand(2, config.length, generator=g) < 0.4
        full, some = model(x, sigma), model(x, sigma, logits_at=at)
    assert 0 < at.sum() < at.numel() and some.shape == (int(at.sum()), config.vocab_size)
    torch.testing.assert_close(some, full[at], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"logits_at must be bool \[B, S\]"):
        model(x, sigma, logits_at=at[:, :3])


def test_activation_checkpointing_gives_the_same_loss_and_gradients_with_dropout():
    """Blocks recomputed in backward replay their dropout masks (non-reentrant checkpoint)."""
    config = tiny_config(dropout=0.3)

    def run(recompute: bool):
        model = random_model(config).train()
        model.activation_checkpointing = recompute
        torch.manual_seed(4)
        loss = model(tokens(config), torch.tensor([0.3, 1.2])).logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()]

    (loss_a, grads_a), (loss_b, grads_b) = run(False), run(True)
    assert torch.equal(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bad_input_shapes_raise():
    config = tiny_config()
    model = random_model(config)
    with pytest.raises(ValueError, match="soft input"):
        model(torch.rand(2, config.length, config.vocab_size + 1), torch.zeros(2))
    with pytest.raises(ValueError, match="sigma"):
        model(tokens(config), torch.zeros(3))


def test_bf16_params_return_fp32_logits():
    config = tiny_config()
    model = random_model(config).to(torch.bfloat16)
    logits = model(tokens(config), torch.zeros(2))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_bf16_rotary_keeps_positions_apart():
    """Cast to bf16, rotary still tells positions 256/257 and 1000/1001 apart: its angles and
    inv_freq stay float32 (bf16 would round the positions together)."""
    positions = torch.tensor([256, 257, 1000, 1001])
    cos32, sin32 = Rotary(16)(positions)
    cast = Rotary(16).to(torch.bfloat16)
    assert cast.inv_freq.dtype == torch.float32
    cos, sin = cast(positions)
    assert torch.equal(cos, cos32) and torch.equal(sin, sin32)
    model = random_model(tiny_config()).to(torch.bfloat16)
    assert model.rotary_emb.inv_freq.dtype == torch.float32 and model.blocks[0].attn_qkv.weight.dtype == torch.bfloat16


def test_a_fresh_rotary_has_the_public_frequencies():
    """inv_freq = 1 / 10000^(2i / hd), as the public checkpoints store it (the fixture's)."""
    public = load_file(str(fixture_path("bd3lm-dit") / "bd3lm_tiny_state_dict.safetensors"))["rotary_emb.inv_freq"]
    fresh = DiT(DiTConfig(vocab_size=101, length=16, hidden_dim=64, cond_dim=32, n_blocks=2, n_heads=4)).rotary_emb.inv_freq
    torch.testing.assert_close(fresh, torch.tensor([1 / 10000 ** (2 * i / 16) for i in range(8)]))
    torch.testing.assert_close(fresh, public.float())


def test_dropout_runs_on_both_branch_outputs():
    config = tiny_config(dropout=0.3)
    model = random_model(config).train()
    calls = []
    for block in model.blocks:
        block.dropout.register_forward_hook(lambda module, inputs, output: calls.append(tuple(inputs[0].shape)))
    model(tokens(config), torch.zeros(2))
    assert calls == [(2, config.length, config.hidden_dim)] * 4  # attention and MLP branch of each of 2 blocks


def test_the_dit_tells_resolve_backend_about_masks_and_cached_keys(monkeypatch):
    """A masked call, the first call on an empty cache and a call with cached keys: flash takes
    none but the second (the backend rule itself is in test_attention.py)."""
    from mdlm_dmmd.models import dit as module

    seen = []
    real = module.resolve_backend
    monkeypatch.setattr(module, "resolve_backend",
                        lambda *a, **k: seen.append((k["has_mask"], k["same_length"])) or real(*a, **k))
    config = tiny_config()
    model, cache, x = random_model(config), KVCache(), tokens(config)[:, :4]
    with torch.no_grad():
        model(x, torch.zeros(2), attn_mask=torch.ones(4, 4, dtype=torch.bool))
        model(x, torch.zeros(2), kv_cache=cache)
        cache.commit()
        model(x, torch.zeros(2), kv_cache=cache)
    assert seen == [(True, True), (False, True), (False, False)]


# ---------------------------------------------------------------------------------------------
# Attention


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_causal_position_ignores_later_positions(backend):
    config = tiny_config(causal=True, attn_backend=backend)
    model = random_model(config)
    x = tokens(config)
    j = 6
    x_perturbed = x.clone()
    x_perturbed[:, j:] = (x[:, j:] + 1) % config.vocab_size
    with torch.no_grad():
        a, b = model(x, torch.zeros(2)), model(x_perturbed, torch.zeros(2))
    assert torch.equal(a[:, :j], b[:, :j])
    assert not torch.allclose(a[:, j:], b[:, j:])


def test_non_causal_positions_see_the_future():
    config = tiny_config()
    model = random_model(config)
    x = tokens(config)
    x_perturbed = x.clone()
    x_perturbed[:, -1] = (x[:, -1] + 1) % config.vocab_size
    with torch.no_grad():
        assert not torch.allclose(model(x, torch.zeros(2))[:, 0], model(x_perturbed, torch.zeros(2))[:, 0])


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_explicit_mask_hook(backend):
    """A lower-triangular attn_mask on a bidirectional model equals the causal model."""
    config = tiny_config(attn_backend=backend)
    model = random_model(config)
    causal_model = random_model(tiny_config(causal=True))
    x, sigma = tokens(config), torch.zeros(2)
    tril = torch.ones(config.length, config.length, dtype=torch.bool).tril()
    with torch.no_grad():
        torch.testing.assert_close(model(x, sigma, attn_mask=tril), causal_model(x, sigma), atol=1e-5, rtol=1e-5)


def test_flex_matches_sdpa_on_a_model():
    x, sigma = tokens(tiny_config()), torch.tensor([0.1, 3.0])
    for causal in (False, True):
        sdpa = random_model(tiny_config(causal=causal, attn_backend="sdpa"))
        flex = random_model(tiny_config(causal=causal, attn_backend="flex"))
        with torch.no_grad():
            torch.testing.assert_close(flex(x, sigma), sdpa(x, sigma), atol=1e-5, rtol=1e-5)


def test_flex_training_on_cpu_is_a_clear_error():
    model = random_model(tiny_config(attn_backend="flex"))
    x, sigma = tokens(tiny_config()), torch.tensor([0.1, 3.0])
    with pytest.raises(UserError, match="model.attn_backend=flex cannot train on CPU"):
        model(x, sigma)
    with torch.no_grad():  # inference is fine
        model(x, sigma)


def test_flash_is_refused_without_cuda_or_flash_attn():
    config = tiny_config(attn_backend="flash")
    if not flash_attn_available():
        with pytest.raises(UserError, match="flash-attn"):
            DiT(config)
    elif not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA"):
            DiT(config)(tokens(config), torch.zeros(2))
    else:
        pytest.skip("flash-attn and CUDA present; covered by the GPU run")


# ---------------------------------------------------------------------------------------------
# Generator noise input (D-MMD §6.5)


def test_zero_init_noise_input_equals_model_without_noise():
    base = random_model(tiny_config())
    noisy = DiT(tiny_config(noise_dim=5)).eval()
    missing, unexpected = noisy.load_state_dict(base.state_dict(), strict=False)
    assert missing == ["noise_proj.weight"] and unexpected == []
    x, sigma = tokens(base.config), torch.tensor([0.3, 1.0])
    noise = noisy.draw_noise(2, base.config.length, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(noisy(x, sigma, noise), base(x, sigma))
        noisy.noise_proj.weight.normal_()
        assert not torch.allclose(noisy(x, sigma, noise), base(x, sigma))


def test_noise_is_required_and_refused_as_declared():
    config = tiny_config(noise_dim=3)
    noisy, plain = DiT(config), DiT(tiny_config())
    x, sigma = tokens(config), torch.zeros(2)
    with pytest.raises(ValueError, match="noise=None"):
        noisy(x, sigma)
    with pytest.raises(ValueError, match="noise must have shape"):
        noisy(x, sigma, torch.randn(2, config.length, 4))
    with pytest.raises(ValueError, match="noise_dim=0"):
        plain(x, sigma, torch.randn(2, config.length, 3))


def test_draw_noise():
    noisy = DiT(tiny_config(noise_dim=3))
    a = noisy.draw_noise(4, 7, generator=torch.Generator().manual_seed(5))
    b = noisy.draw_noise(4, 7, generator=torch.Generator().manual_seed(5))
    assert a.shape == (4, 7, 3) and torch.equal(a, b)
    assert DiT(tiny_config()).draw_noise(4, 7) is None


def test_noise_pyramid_levels_share_noise_over_their_cells():
    """3x4 grid: levels 3x4, 2x2, 1x1. A coarse cell's noise is copied to the tokens it covers
    (nearest upsampling: rows 0,1 | 2 and columns 0,1 | 2,3 for the 2x2 level)."""
    config = tiny_config(length=12, noise_dim=2, noise_grid=[3, 4])
    assert config.noise_levels == [(3, 4), (2, 2), (1, 1)] and config.noise_features == 6
    noise = DiT(config).draw_noise(5, 12, generator=torch.Generator().manual_seed(0))
    assert noise.shape == (5, 12, 6)
    grid = noise.view(5, 3, 4, 6)  # raster order
    fine, mid, top = grid[..., 0:2], grid[..., 2:4], grid[..., 4:6]
    assert torch.equal(top, top[:, :1, :1].expand_as(top))  # one value for the whole image
    cells = {(0, 0): [(0, 0), (0, 1), (1, 0), (1, 1)], (0, 1): [(0, 2), (0, 3), (1, 2), (1, 3)],
             (1, 0): [(2, 0), (2, 1)], (1, 1): [(2, 2), (2, 3)]}
    for members in cells.values():
        for r, c in members:
            assert torch.equal(mid[:, r, c], mid[:, members[0][0], members[0][1]])
    assert not torch.equal(mid[:, 0, 0], mid[:, 2, 2])
    assert len({tuple(fine[0, r, c].tolist()) for r in range(3) for c in range(4)}) == 12  # white per token
    with pytest.raises(ValueError, match="needs length 12"):
        DiT(config).draw_noise(1, 10)


def test_zero_init_pyramid_generator_equals_model_without_noise():
    base = random_model(tiny_config(length=12)).eval()
    noisy = DiT(tiny_config(length=12, noise_dim=2, noise_grid=[3, 4])).eval()
    noisy.load_state_dict(base.state_dict(), strict=False)
    x, sigma = tokens(base.config), torch.tensor([0.1, 1.0])
    with torch.no_grad():
        assert torch.equal(noisy(x, sigma, noisy.draw_noise(2, 12)), base(x, sigma))


# ---------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hidden_dim=96, n_heads=5), r"model.hidden_dim \(96\) must be divisible by model.n_heads \(5\)"),
        (dict(length=-3), "model.length must be a positive int, got -3"),
        (dict(attn_backend="xformers"), "model.attn_backend must be one of auto, sdpa, flash, flex; got 'xformers'"),
        (dict(dropout=1.5), "model.dropout"),
        (dict(noise_dim=-1), "model.noise_dim"),
        (dict(noise_dim=2, noise_grid=[3, 3]), r"model.noise_grid must be \[H, W\] with H·W = model.length \(10\)"),
        (dict(noise_grid=[2, 5]), r"model.noise_grid needs a noise input"),
        (dict(hidden_dim=36, n_heads=4), "must be even for rotary"),
        (dict(n_blocks=True), "model.n_blocks must be a positive int"),
    ],
)
def test_validate_names_the_key(overrides, message):
    with pytest.raises(UserError, match=message):
        tiny_config(**overrides).validate()
    with pytest.raises(UserError, match=message):
        DiT(tiny_config(**overrides))


def test_validate_reports_every_problem_on_one_line():
    with pytest.raises(UserError) as err:
        tiny_config(length=0, vocab_size=-1).validate()
    assert "model.length" in str(err.value) and "model.vocab_size" in str(err.value)
    assert "\n" not in str(err.value)
