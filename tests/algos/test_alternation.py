"""`Alternation.step`: with a fused optimiser the skip of a non-finite update is decided on the
device (fused AdamW's `found_inf`), with no host sync; on either path it must equal not taking
that update."""

import pytest
import torch
from torch import nn

from mdlm_dmmd.algos.distillation import Alternation, PhaseSchedule
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.models.ema import EMA


def parts(fused: bool):
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1, fused=fused)
    return net, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def loss_of(net, x, finite=True):
    loss = net(x).pow(2).mean()
    return loss if finite else loss * float("nan")


def two_clipped_updates(x, fused: bool) -> nn.Module:
    """The network after two finite AdamW updates on `x`, each clipped to norm 0.05 by hand."""
    reference, optimizer, _ = parts(fused=fused)
    for _ in range(2):
        optimizer.zero_grad()
        loss_of(reference, x).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        optimizer.step()
    return reference


def test_a_nonfinite_update_is_skipped_on_the_device_as_if_it_never_happened():
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    net, optimizer, scheduler = parts(fused=True)
    ema = EMA(net, 0.5)
    alternation = Alternation(PhaseSchedule("gen", 1), accumulate=1, clip=0.05, max_nonfinite=5, check_every=10)
    shadows = []
    for finite in (True, False, True):
        kept = alternation.step(loss_of(net, x, finite), backward=lambda loss: loss.backward(), network=net,
                                optimizer=optimizer, scheduler=scheduler,
                                after_update=lambda keep=None: ema.update(net, keep))
        assert isinstance(kept, torch.Tensor) and bool(kept) is finite  # the device flag
        shadows.append({k: v.clone() for k, v in ema.shadow.items()})
    assert all(torch.equal(shadows[1][k], shadows[0][k]) for k in shadows[0])  # the EMA did not move either
    assert ema.num_updates == 3  # its warm-up count advances, as on the host path (below)
    assert alternation.guard.total == 0 and float(alternation.guard.count()) == 1.0  # counted on the device
    alternation.guard.check()
    assert (alternation.guard.total, alternation.guard.in_a_row) == (1, 0)

    # the same two finite updates alone, clipped by hand: the same weights, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), two_clipped_updates(x, fused=True).parameters()))
    assert optimizer.state[net.weight]["step"] == 2  # the skipped update left AdamW's step count alone


def test_the_host_path_skips_a_nonfinite_update_as_the_device_path_does():
    """Without a fused optimiser (CPU users, every test run): the same kept flags, the EMA
    unmoved by the skipped update with its warm-up count advanced, the schedule stepped every
    update, and the weights of the two finite updates alone, clipped by hand."""
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    net, optimizer, scheduler = parts(fused=False)
    ema = EMA(net, 0.5)
    alternation = Alternation(PhaseSchedule("gen", 1), accumulate=1, clip=0.05, max_nonfinite=5, check_every=10)
    kept, shadows = [], []
    for finite in (True, False, True):
        kept.append(alternation.step(loss_of(net, x, finite), backward=lambda loss: loss.backward(), network=net,
                                     optimizer=optimizer, scheduler=scheduler,
                                     after_update=lambda keep=None: ema.update(net, keep)))
        shadows.append({k: v.clone() for k, v in ema.shadow.items()})
    assert kept == [True, False, True] and ema.num_updates == 3 and scheduler.last_epoch == 3
    assert all(torch.equal(shadows[1][k], shadows[0][k]) for k in shadows[0])
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), two_clipped_updates(x, fused=False).parameters()))


def test_too_many_nonfinite_updates_stop_at_the_next_check():
    x = torch.randn(5, 4)
    net, optimizer, scheduler = parts(fused=True)
    alternation = Alternation(PhaseSchedule("gen", 1), accumulate=1, clip=None, max_nonfinite=3, check_every=2)
    step = lambda: alternation.step(loss_of(net, x, False), backward=lambda loss: loss.backward(),  # noqa: E731
                                    network=net, optimizer=optimizer, scheduler=scheduler)
    step(), step(), step()  # checked after 2: 2 in a row, under the limit
    with pytest.raises(UserError, match="NaN/Inf for 4 steps in a row"):
        step()  # checked after 4


def test_the_nonfinite_counts_survive_a_checkpoint_and_saving_never_stops_training():
    """state_dict folds the device counts (without the stop a check would raise: a crash
    checkpoint must still be written) and load_state_dict restores the total and the run."""
    x = torch.randn(5, 4)
    net, optimizer, scheduler = parts(fused=True)
    alternation = Alternation(PhaseSchedule("gen", 1), accumulate=1, clip=None, max_nonfinite=2, check_every=10)
    for _ in range(3):
        alternation.step(loss_of(net, x, False), backward=lambda loss: loss.backward(), network=net,
                         optimizer=optimizer, scheduler=scheduler)
    state = alternation.state_dict()  # 3 in a row, over the limit of 2: saved, not raised
    assert (state["nonfinite_total"], state["nonfinite_in_a_row"]) == (3, 3)
    resumed = Alternation(PhaseSchedule("gen", 1), accumulate=1, clip=None, max_nonfinite=2, check_every=10)
    resumed.load_state_dict(state)
    assert (resumed.guard.total, resumed.guard.in_a_row) == (3, 3)
    with pytest.raises(UserError, match="NaN/Inf for 3 steps in a row"):
        alternation.guard.check()


def test_micro_batches_average_their_gradients():
    """accumulate = 2: one update with the gradient of the mean of the two micro-batch losses
    (plain SGD, so that the scale shows: Adam would hide a factor 2)."""
    x1, x2 = torch.randn(5, 4, generator=torch.Generator().manual_seed(2)), torch.randn(5, 4)
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    reference = nn.Linear(4, 3)
    reference.load_state_dict(net.state_dict())
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(sgd, lambda step: 1.0)
    alternation = Alternation(PhaseSchedule("gen", 1), accumulate=2, clip=None, max_nonfinite=5, check_every=10)
    for x in (x1, x2):
        alternation.step(loss_of(net, x), backward=lambda loss: loss.backward(), network=net, optimizer=sgd,
                         scheduler=scheduler)
    ((loss_of(reference, x1) + loss_of(reference, x2)) / 2).backward()
    for mine, theirs in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, theirs - 0.1 * theirs.grad)


def test_a_finite_loss_with_an_infinite_gradient_is_skipped_on_the_device():
    x = torch.randn(5, 4)
    net, optimizer, scheduler = parts(fused=True)
    before = [p.detach().clone() for p in net.parameters()]
    net.weight.register_hook(lambda grad: grad * float("inf"))
    alternation = Alternation(PhaseSchedule("gen", 1), accumulate=1, clip=None, max_nonfinite=5, check_every=10)
    kept = alternation.step(loss_of(net, x), backward=lambda loss: loss.backward(), network=net, optimizer=optimizer,
                            scheduler=scheduler)
    assert not bool(kept) and all(torch.equal(a, b) for a, b in zip(net.parameters(), before))
