"""`entropy`: each sample's unigram entropy in nats, their mean and its standard error, by hand."""

import math
import statistics
from collections import Counter

import pytest
import torch

from mdlm_dmmd.metrics.entropy import sample_entropy


def test_entropy_value_and_stderr_by_hand():
    rows = [[0, 0, 0, 0], [0, 1, 0, 1], [0, 1, 2, 3], [5, 5, 5, 6]]
    by_hand = [-sum(c / 4 * math.log(c / 4) for c in Counter(r).values()) for r in rows]
    assert by_hand[1] == pytest.approx(math.log(2)) and by_hand[2] == pytest.approx(math.log(4))
    out = sample_entropy(torch.tensor(rows))
    assert out["value"] == pytest.approx(sum(by_hand) / 4, rel=1e-12)
    assert out["stderr"] == pytest.approx(statistics.stdev(by_hand) / math.sqrt(4), rel=1e-12)
    assert out["per_sample"] == pytest.approx(by_hand, rel=1e-12)
