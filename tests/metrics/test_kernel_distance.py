"""KID: the unbiased estimator against a loop over pairs, ≈ 0 for two halves of one sample,
clearly positive for a shifted one, and disjoint subsets."""

import itertools
import math
import statistics

import pytest
import torch

from mdlm_dmmd.errors import UserError
from mdlm_dmmd.metrics.kernel_distance import kernel_distance, mmd2_unbiased


def test_unbiased_mmd2_equals_a_loop_over_pairs():
    x = torch.tensor([[0.0, 1.0], [2.0, -1.0], [1.0, 1.0]])
    y = torch.tensor([[1.0, 0.0], [0.5, 0.5]])

    def k(a, b):  # (aᵀb / d + 1)³ with d = 2, by hand
        return (sum(float(p) * float(q) for p, q in zip(a, b)) / 2 + 1) ** 3

    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(3), 2)) / (3 * 2)
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(2), 2)) / (2 * 1)
    xy = sum(k(a, b) for a in x for b in y) / (3 * 2)
    assert mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
    a, b = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [2.0]])
    # d = 1: k(x,y) = (xy + 1)^3; XX: 2·k(0,1)/2 = 1; YY: 2·k(0,2)/2 = 1; XY: (1 + 1 + 1 + 27)/4 = 7.5
    assert mmd2_unbiased(a, b) == pytest.approx(1 + 1 - 15)


def test_two_halves_of_one_sample_score_zero_within_three_stderr_and_a_shift_does_not():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(4000, 16, generator=g)
    same = kernel_distance(data[:2000], data[2000:], subset_size=200, generator=g)
    assert same["subsets"] == 10 and same["subset_size"] == 200
    assert abs(same["value"]) < 3 * same["stderr"]
    shifted = kernel_distance(data[:2000] + 0.5, data[2000:], subset_size=200, generator=g)
    assert shifted["value"] > 10 * shifted["stderr"] and shifted["value"] > 20 * abs(same["value"])


def test_subsets_shrink_to_fit_and_bad_input_is_refused():
    g = torch.Generator().manual_seed(1)
    small = kernel_distance(torch.randn(10, 3, generator=g), torch.randn(30, 3, generator=g), subset_size=1000)
    assert small["subset_size"] == 5 and small["subsets"] == 2 and small["reference_subset_size"] == 15
    with pytest.raises(UserError, match="one d"):
        kernel_distance(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(UserError, match="at least 2"):
        kernel_distance(torch.zeros(1, 3), torch.zeros(4, 3))


def _k(a, b, d):
    return (sum(p * q for p, q in zip(a, b)) / d + 1) ** 3


def test_kid_pairs_disjoint_reference_subsets_and_its_stderr_is_the_pairs_standard_error():
    """x: 4 copies of the origin, so a pair's MMD²_u depends on its reference subset only:
    k(0, y) = 1, hence MMD²_u(x_pair, {y_a, y_b}) = 1 + k(y_a, y_b) − 2 = k(y_a, y_b) − 1.
    The 4 reference rows are cut into 2 disjoint pairs (3 possible partitions, whichever the
    shuffle picks): value = the mean of the two pairs' MMD², stderr = stdev(ddof=1) / √2."""
    x = [[0.0, 0.0]] * 4
    y = [[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [-1.0, 3.0]]
    f = {frozenset(p): _k(y[p[0]], y[p[1]], 2) - 1 for p in itertools.combinations(range(4), 2)}
    partitions = []
    for a in ((0, 1), (0, 2), (0, 3)):
        b = tuple(i for i in range(4) if i not in a)
        fa, fb = f[frozenset(a)], f[frozenset(b)]
        partitions.append(((fa + fb) / 2, statistics.stdev([fa, fb]) / math.sqrt(2)))
    for seed in range(6):
        out = kernel_distance(torch.tensor(x), torch.tensor(y), subset_size=2,
                              generator=torch.Generator().manual_seed(seed))
        assert out["subsets"] == 2 and out["subset_size"] == 2 and out["reference_subset_size"] == 2
        assert any(out["value"] == pytest.approx(v, rel=1e-12) and out["stderr"] == pytest.approx(s, rel=1e-12)
                   for v, s in partitions), (out, partitions)
