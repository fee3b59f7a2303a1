"""`rng.BatchShare`: each rank keeps its rows of draws made for the global batch."""

import torch

from mdlm_dmmd import rng


def test_a_share_keeps_its_rows_of_the_global_draw():
    for draw in (lambda g: rng.rand((3, 5), g), lambda g: rng.randn((3, 2, 2), g), lambda g: rng.randint(0, 9, (3, 4), g)):
        torch.manual_seed(0)
        whole = draw(None)  # one process, 3 rows
        torch.manual_seed(0)
        assert torch.equal(draw(rng.BatchShare()), whole)  # a share of one process draws the same
        torch.manual_seed(0)
    torch.manual_seed(0)
    global_rows = torch.rand(6, 5)  # 2 ranks x 3 rows: global row j·2 + r is row j of rank r
    for rank in (0, 1):
        torch.manual_seed(0)
        mine = rng.rand((3, 5), rng.BatchShare(2, rank))
        assert torch.equal(mine, global_rows[rank::2])
        index, total = rng.positions(3, rng.BatchShare(2, rank))
        assert index.tolist() == [rank, 2 + rank, 4 + rank] and total == 6
