"""Generator noise pyramid over [H, W] and [H, W, C] token grids (D-MMD §6.5, issue 12 item 7)."""

import pytest
import torch
import torch.nn.functional as F

from mdlm_dmmd.errors import UserError
from mdlm_dmmd.models.dit import DiT, DiTConfig
from mdlm_dmmd.models.noise_input import draw_noise, pyramid_levels


def tiny_config(**overrides) -> DiTConfig:
    fields = dict(vocab_size=13, length=12, hidden_dim=32, cond_dim=16, n_blocks=1, n_heads=4, dropout=0.0)
    fields.update(overrides)
    return DiTConfig(**fields)


def two_d_pyramid(batch, h, w, dim, generator):
    """The [H, W] pyramid written out as the code before channels drew it: every level a normal
    [B, dim, h_l, w_l], fine to coarse, nearest-upsampled to H x W, stacked on features."""
    levels, size = [], (h, w)
    while True:
        levels.append(torch.randn(batch, dim, *size, generator=generator))
        if size == (1, 1):
            break
        size = (-(-size[0] // 2), -(-size[1] // 2))
    up = [F.interpolate(level, size=(h, w), mode="nearest") for level in levels]
    return torch.cat(up, dim=1).flatten(2).transpose(1, 2)  # [B, H·W, dim · levels]


@pytest.mark.parametrize("grid", [[3, 4], [3, 4, 1], [5, 2], [1, 1], [8, 8]])
def test_two_d_and_single_channel_grids_equal_the_2d_pyramid(grid):
    h, w = grid[:2]
    config = tiny_config(length=h * w, noise_dim=2, noise_grid=grid)
    noise = DiT(config).draw_noise(3, h * w, generator=torch.Generator().manual_seed(7))
    assert torch.equal(noise, two_d_pyramid(3, h, w, 2, torch.Generator().manual_seed(7)))


def test_white_noise_is_a_plain_normal_draw():
    noise = draw_noise(2, 5, 3, None, torch.Generator().manual_seed(1), "cpu")
    assert torch.equal(noise, torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(1)))


def test_channel_grid_shapes_and_sharing():
    """[3, 4, 2]: tokens in (h, w, c) raster order. The finest level is one value per token; each
    coarser level is one value per cell, shared by all channels of the pixels it covers."""
    H, W, C, dim = 3, 4, 2, 2
    config = tiny_config(length=H * W * C, noise_dim=dim, noise_grid=[H, W, C])
    assert config.noise_levels == [(3, 4), (2, 2), (1, 1)] and config.noise_features == 6
    noise = DiT(config).draw_noise(5, H * W * C, generator=torch.Generator().manual_seed(0))
    assert noise.shape == (5, H * W * C, 6)
    grid = noise.view(5, H, W, C, 6)
    fine, mid, top = grid[..., 0:2], grid[..., 2:4], grid[..., 4:6]
    assert torch.equal(mid[:, :, :, 0], mid[:, :, :, 1])  # shared by the channels of a pixel
    assert not torch.equal(mid[:, 0, 0], mid[:, 2, 2])
    # Brute force: the draws, in order, are the finest level [B, dim, H, W, C], then the 2x2 and
    # 1x1 levels; a coarse cell (h // 2, w // 2) covers pixel (h, w) (nearest upsampling).
    g = torch.Generator().manual_seed(0)
    fine_ref = torch.randn(5, dim, H, W, C, generator=g)
    mid_ref = torch.randn(5, dim, 2, 2, generator=g)
    top_ref = torch.randn(5, dim, 1, 1, generator=g)
    for h in range(H):
        for w in range(W):
            for c in range(C):
                assert torch.equal(fine[:, h, w, c], fine_ref[:, :, h, w, c])
                assert torch.equal(mid[:, h, w, c], mid_ref[:, :, h // 2, w // 2])
                assert torch.equal(top[:, h, w, c], top_ref[:, :, 0, 0])


def test_channel_grid_needs_matching_length():
    config = tiny_config(length=24, noise_dim=2, noise_grid=[3, 4, 2])
    with pytest.raises(ValueError, match="noise pyramid over 3x4x2 tokens needs length 24"):
        DiT(config).draw_noise(1, 12)


@pytest.mark.parametrize("grid", [[3, 4, 3], [3, 4, 1, 1], [3, 0, 4], [2.0, 6]])
def test_bad_grids_name_the_key(grid):
    with pytest.raises(UserError, match=r"model.noise_grid must be \[H, W\] .* or \[H, W, C\] with H·W·C"):
        tiny_config(noise_dim=2, noise_grid=grid).validate()


def test_pyramid_levels_halve_rounding_up():
    assert pyramid_levels(5, 3) == [(5, 3), (3, 2), (2, 1), (1, 1)]
    assert pyramid_levels(1, 1) == [(1, 1)]


def test_zero_init_channel_pyramid_generator_equals_model_without_noise():
    base = DiT(tiny_config(length=24)).eval()
    noisy = DiT(tiny_config(length=24, noise_dim=2, noise_grid=[3, 4, 2])).eval()
    noisy.load_state_dict(base.state_dict(), strict=False)
    x = torch.randint(0, 13, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(noisy(x, torch.zeros(2), noisy.draw_noise(2, 24)), base(x, torch.zeros(2)))
