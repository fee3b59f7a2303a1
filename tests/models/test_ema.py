"""The EMA of a module's weights: its state round trip."""

import torch
from torch import nn

from mdlm_dmmd.models.ema import EMA


def test_a_loaded_ema_continues_the_warm_up():
    """load_state_dict restores num_updates: after 3 updates the 4th decays by min(0.99, 5/14)
    in the loaded copy as in the original, not by a fresh EMA's 2/11."""
    net = nn.Linear(2, 2)
    ema = EMA(net, 0.99)
    for step in range(3):
        with torch.no_grad():
            net.weight.add_(1.0 + step)
        ema.update(net)
    loaded = EMA(nn.Linear(2, 2), 0.5)
    loaded.load_state_dict(ema.state_dict())
    assert (loaded.decay, loaded.num_updates) == (0.99, 3)
    before = ema.shadow["weight"].clone()
    with torch.no_grad():
        net.weight.add_(10.0)
    ema.update(net)
    loaded.update(net)
    assert all(torch.equal(loaded.shadow[k], ema.shadow[k]) for k in ema.shadow)
    by_hand = before + (1 - 5 / 14) * (net.weight.detach() - before)
    torch.testing.assert_close(loaded.shadow["weight"], by_hand)
