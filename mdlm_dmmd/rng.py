"""Training randomness that does not depend on how many processes share the batch.

Under data parallelism Lightning seeds every rank alike, so drawing each rank's t, masks and
noise from that seed would give every rank the same draws for its own rows: the global batch
would repeat its noise W times, and a run on W processes would differ from the same run on one.
`BatchShare` draws for the whole global batch of W·B rows on every rank (all ranks hold the same
generator state and make the same calls) and keeps this rank's rows. The loaders give rank r the
rows r, W + r, 2W + r, ... of each global batch (`data.EpochShuffle`), so row j of rank r takes
the draws of global row j·W + r: every example gets the draws it would get on one process.

Draws go through `rand`, `randn` and `randint` below, which take a `torch.Generator`, None (the
global generator) or a `BatchShare`, so the diffusion processes, the noise input and the
categorical draw serve samplers (a plain generator) and training (a share) alike. Every shape's
first dimension is the batch. With one process a share draws exactly what a plain call draws.
"""

from __future__ import annotations

import torch
from torch import Tensor


class BatchShare:
    """Rank `rank` of `world` processes: draws for all `world` · B rows, keeps rows rank::world."""

    def __init__(self, world: int = 1, rank: int = 0, generator: torch.Generator | None = None):
        if not 0 <= rank < world:
            raise ValueError(f"BatchShare: rank {rank} is not in 0..{world - 1}")
        self.world, self.rank, self.generator = int(world), int(rank), generator

    def _mine(self, draw: Tensor) -> Tensor:
        return draw if self.world == 1 else draw[self.rank:: self.world]

    def _global(self, shape) -> tuple[int, ...]:
        shape = tuple(shape)
        return (shape[0] * self.world, *shape[1:])

    def rand(self, shape, *, device=None, dtype=None) -> Tensor:
        return self._mine(torch.rand(self._global(shape), generator=self.generator, device=device, dtype=dtype))

    def randn(self, shape, *, device=None, dtype=None) -> Tensor:
        return self._mine(torch.randn(self._global(shape), generator=self.generator, device=device, dtype=dtype))

    def randint(self, low: int, high: int, shape, *, device=None) -> Tensor:
        return self._mine(torch.randint(low, high, self._global(shape), generator=self.generator, device=device))

    def permuted_positions(self, rows: int, device=None) -> Tensor:
        """Where a random permutation of the global batch's rows sends each of this rank's rows
        (every rank draws the same permutation)."""
        permutation = torch.randperm(self.total(rows), generator=self.generator, device=device)
        return self._mine(permutation)

    def positions(self, rows: int, device=None) -> Tensor:
        """The global row index of each of this rank's `rows` rows."""
        return torch.arange(rows, device=device) * self.world + self.rank

    def total(self, rows: int) -> int:
        """Rows in the global batch when each rank holds `rows`."""
        return rows * self.world



def rand(shape, generator=None, *, device=None, dtype=None) -> Tensor:
    """`torch.rand(shape)` from a generator, the global one (None) or a `BatchShare`."""
    if isinstance(generator, BatchShare):
        return generator.rand(shape, device=device, dtype=dtype)
    return torch.rand(tuple(shape), generator=generator, device=device, dtype=dtype)


def randn(shape, generator=None, *, device=None, dtype=None) -> Tensor:
    if isinstance(generator, BatchShare):
        return generator.randn(shape, device=device, dtype=dtype)
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def randint(low: int, high: int, shape, generator=None, *, device=None) -> Tensor:
    if isinstance(generator, BatchShare):
        return generator.randint(low, high, shape, device=device)
    return torch.randint(low, high, tuple(shape), generator=generator, device=device)


def positions(rows: int, generator=None, device=None, *, permuted: bool = False) -> tuple[Tensor, int]:
    """(global index of each local row, global row count): the share's, or 0..rows-1 and rows.
    `permuted`: the rows' places under a random permutation of the global batch instead."""
    if isinstance(generator, BatchShare):
        where = generator.permuted_positions(rows, device) if permuted else generator.positions(rows, device)
        return where, generator.total(rows)
    if permuted:
        return torch.randperm(rows, generator=generator, device=device), rows
    return torch.arange(rows, device=device), rows
