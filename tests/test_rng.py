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


def test_permuted_positions_are_one_permutation_of_the_global_batch_on_any_number_of_ranks():
    torch.manual_seed(0)
    whole, total = rng.positions(6, None, permuted=True)  # one process, 6 rows
    assert sorted(whole.tolist()) == list(range(6)) and total == 6
    torch.manual_seed(0)
    assert torch.equal(rng.positions(6, rng.BatchShare(), permuted=True)[0], whole)
    for rank in (0, 1):  # 2 ranks x 3 rows: row j of rank r is global row j·2 + r
        torch.manual_seed(0)
        mine, total = rng.positions(3, rng.BatchShare(2, rank), permuted=True)
        assert torch.equal(mine, whole[rank::2]) and total == 6


def test_a_masked_step_with_a_share_draws_each_rows_own_tokens():
    """A masked step gathers the revealed positions before the categorical draw ([N, V], not
    batch-first); with a share its uniforms are still drawn per batch row, so each rank's rows of
    a step equal the rows of the step on one process (SDTT's teacher steps under DDP)."""
    from mdlm_dmmd.diffusion.masked import MaskedProcess
    from mdlm_dmmd.diffusion.sampling import step
    from mdlm_dmmd.diffusion.schedules import LogLinear

    process = MaskedProcess(LogLinear(), mask_id=6)
    generator = torch.Generator().manual_seed(1)
    z_t = torch.where(torch.rand(4, 9, generator=generator) < 0.7, 6, torch.randint(0, 6, (4, 9), generator=generator))
    log_p = process.log_probs(torch.randn(4, 9, 7, generator=generator), z_t)
    t, s = torch.full((4,), 0.8), torch.full((4,), 0.3)
    torch.manual_seed(0)
    whole = step(process, log_p, z_t, t, s, generator=rng.BatchShare())
    assert (whole != z_t).any() and (whole != 6).any()  # the step reveals something
    for rank in (0, 1):
        torch.manual_seed(0)
        mine = step(process, log_p[rank::2], z_t[rank::2], t[rank::2], s[rank::2], generator=rng.BatchShare(2, rank))
        assert torch.equal(mine, whole[rank::2])


def test_every_draw_of_a_share_keeps_its_rows_of_the_global_draw():
    """randn, randint and rand with a dtype on 2 ranks: rank r's row j is global row j·2 + r."""
    draws = {"randn": (lambda g: rng.randn((3, 2, 2), g), lambda: torch.randn(6, 2, 2)),
             "randint": (lambda g: rng.randint(0, 9, (3, 4), g), lambda: torch.randint(0, 9, (6, 4))),
             "rand64": (lambda g: rng.rand((3, 5), g, dtype=torch.float64), lambda: torch.rand(6, 5, dtype=torch.float64))}
    for name, (draw, whole) in draws.items():
        torch.manual_seed(0)
        global_rows, after = whole(), torch.rand(3)
        for rank in (0, 1):
            torch.manual_seed(0)
            mine = draw(rng.BatchShare(2, rank))
            assert mine.dtype == global_rows.dtype and torch.equal(mine, global_rows[rank::2]), (name, rank)
            assert torch.equal(torch.rand(3), after), (name, rank)  # every rank's generator moved alike


def test_a_plain_generator_is_used_for_permuted_positions():
    where, total = rng.positions(6, torch.Generator().manual_seed(3), permuted=True)
    assert torch.equal(where, torch.randperm(6, generator=torch.Generator().manual_seed(3))) and total == 6


def test_a_share_refuses_a_rank_outside_its_world():
    import pytest

    for rank in (-1, 2):
        with pytest.raises(ValueError, match=rf"rank {rank} is not in 0..1"):
            rng.BatchShare(2, rank)
