"""Generator noise for D-MMD's noise input (paper §6.5), drawn outside the network.

Text: white noise, standard normal per token. Images: a Gaussian noise pyramid over the token
grid `noise_grid` = [H, W] or [H, W, C] (tokens in (h, w, c) raster order, H·W·C = length), the
paper's choice for images, so that coarse levels give every token a shared source of randomness:

- the finest level is white noise per token (per channel of a pixel);
- the coarser levels halve H and W (rounding up) down to 1×1; each coarse cell's noise is copied
  to the pixels it covers (nearest upsampling) and shared by the C channels of each pixel.

Levels are stacked along the features, fine to coarse: [B, L, noise_dim · levels]. With C = 1
(or [H, W]) the draws are those of the 2-D pyramid exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mdlm_dmmd import rng


def pyramid_levels(height: int, width: int) -> list[tuple[int, int]]:
    """Grid sizes of the pyramid, fine to coarse, halving (rounding up) down to 1×1."""
    levels = [(height, width)]
    while levels[-1] != (1, 1):
        height, width = -(-height // 2), -(-width // 2)
        levels.append((height, width))
    return levels


def draw_noise(
    batch: int,
    length: int,
    dim: int,
    grid: list[int] | None,
    generator: torch.Generator | None,
    device: torch.device | str,
) -> Tensor:
    """Noise [B, L, dim] (white) or [B, L, dim · levels] (pyramid over `grid`)."""
    if grid is None:
        return rng.randn((batch, length, dim), generator, device=device)
    h, w = grid[0], grid[1]
    c = grid[2] if len(grid) == 3 else 1
    if h * w * c != length:
        shape = "x".join(str(n) for n in grid)
        raise ValueError(f"DiT: a noise pyramid over {shape} tokens needs length {h * w * c}, got {length}")
    # Draw order = the 2-D pyramid's (fine, then coarse); [B, dim, H, W, 1] holds the same numbers
    # as [B, dim, H, W], so C = 1 reproduces it.
    fine = rng.randn((batch, dim, h, w, c), generator, device=device)  # [B, dim, H, W, C]
    coarse = [rng.randn((batch, dim, *size), generator, device=device) for size in pyramid_levels(h, w)[1:]]
    upsampled = [F.interpolate(level, size=(h, w), mode="nearest")[..., None].expand(-1, -1, -1, -1, c)
                 for level in coarse]  # each [B, dim, H, W, C], shared over C
    return torch.cat([fine, *upsampled], dim=1).flatten(2).transpose(1, 2)  # [B, H·W·C, dim · levels]
