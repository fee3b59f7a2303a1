"""The resumable training loader: per-(seed, epoch) order, mid-epoch resume equal to the
uninterrupted pass, and Lightning resuming it without skipping or repeating a batch."""

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from mdlm_dmmd.data import DataBundle, EpochShuffle, ResumableLoader, TokenDataset, make_loaders

ROWS = 14  # row i holds [i, i]: a batch's first column names its rows


def rows(n: int = ROWS) -> TokenDataset:
    return TokenDataset(torch.arange(n)[:, None].repeat(1, 2))


def loader(seed: int = 0, batch_size: int = 4, **kwargs) -> ResumableLoader:
    return ResumableLoader(rows(), batch_size=batch_size, seed=seed, **kwargs)


def epoch_batches(data: ResumableLoader, epoch: int | None = None) -> list[list[int]]:
    if epoch is not None:
        data.sampler.set_epoch(epoch)
    return [batch["input_ids"][:, 0].tolist() for batch in data]


def test_order_is_a_permutation_fixed_by_seed_and_epoch():
    orders = {(seed, epoch): EpochShuffle(ROWS, seed).order(epoch).tolist() for seed in (0, 1, 2) for epoch in (0, 1)}
    assert all(sorted(order) == list(range(ROWS)) for order in orders.values())
    assert len({tuple(order) for order in orders.values()}) == len(orders)  # incl. seed 2/epoch 0 vs seed 1/epoch 1
    again = EpochShuffle(ROWS, 1)
    again.set_epoch(1)
    assert list(again) == orders[1, 1]  # a new sampler, straight to epoch 1: same order


def test_drop_last_and_a_full_pass_per_epoch():
    batches = epoch_batches(loader(), 0)
    assert len(batches) == len(loader()) == ROWS // 4 and all(len(b) == 4 for b in batches)
    assert len(set(sum(batches, []))) == 12
    assert epoch_batches(loader(), 0) == batches and epoch_batches(loader(), 1) != batches


@pytest.mark.parametrize("served", [0, 1, 2])
def test_resume_mid_epoch_serves_the_rest_of_the_uninterrupted_pass(served):
    straight = loader()
    straight.sampler.set_epoch(1)
    expected = epoch_batches(straight)
    next_epoch = epoch_batches(straight, 2)

    killed = loader()
    killed.sampler.set_epoch(1)
    it = iter(killed)
    assert [next(it)["input_ids"][:, 0].tolist() for _ in range(served)] == expected[:served]
    state = killed.state_dict()
    assert state == {"epoch": 1, "rows": 4 * served}

    resumed = loader()
    resumed.load_state_dict(state)
    assert epoch_batches(resumed) == expected[served:]
    assert resumed.state_dict() == {"epoch": 1, "rows": 4 * len(expected)}
    assert epoch_batches(resumed, 2) == next_epoch  # the skip applied to one pass only


def test_lightning_order_iter_before_set_epoch():
    """On resume Lightning calls iter() first and set_epoch after; the pass must follow the epoch
    set last, and skip only if that is still the saved epoch (not after limit_train_batches)."""
    expected = epoch_batches(loader(), 3)
    resumed = loader()
    resumed.load_state_dict({"epoch": 3, "rows": 4})
    it = iter(resumed)
    resumed.sampler.set_epoch(3)
    assert [b["input_ids"][:, 0].tolist() for b in it] == expected[1:]

    moved_on = loader()
    moved_on.load_state_dict({"epoch": 3, "rows": 4})
    it = iter(moved_on)
    moved_on.sampler.set_epoch(4)
    assert [b["input_ids"][:, 0].tolist() for b in it] == epoch_batches(loader(), 4)


def test_state_saved_at_the_end_of_an_epoch_resumes_at_the_top_of_the_next():
    resumed = loader()
    resumed.load_state_dict({"epoch": 0, "rows": ROWS // 4 * 4})
    assert epoch_batches(resumed) == epoch_batches(loader(), 1)
    resumed.load_state_dict({"epoch": 0, "rows": 11})  # 3 rows left: less than a batch
    assert epoch_batches(resumed) == epoch_batches(loader(), 1)


def test_state_between_passes():
    """Saved after set_epoch but before the new pass (e.g. a crash at epoch start), or right
    after a load: the position is still exact."""
    data = loader()
    epoch_batches(data, 0)
    assert data.state_dict() == {"epoch": 0, "rows": ROWS // 4 * 4}
    data.sampler.set_epoch(1)
    assert data.state_dict() == {"epoch": 1, "rows": 0}
    resumed = loader()
    resumed.load_state_dict({"epoch": 2, "rows": 4})
    assert resumed.state_dict() == {"epoch": 2, "rows": 4}


def test_batches_are_counted_as_served_not_as_prefetched_by_workers():
    data = loader(num_workers=2)
    it = iter(data)
    next(it)
    assert data.state_dict() == {"epoch": 0, "rows": 4}  # workers have fetched further ahead
    del it


def test_a_state_from_before_rows_were_kept_resumes_by_batches():
    expected = epoch_batches(loader(), 1)
    resumed = loader()
    resumed.load_state_dict({"epoch": 1, "batches": 2})
    assert epoch_batches(resumed) == expected[2:]


def as_process(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setattr("mdlm_dmmd.ranks.current", lambda: (rank, world))


@pytest.mark.parametrize("world, batch, then_world, then_batch", [
    (2, 2, 1, 4),  # fewer processes, the same global batch
    (2, 2, 1, 2),  # fewer processes, half the global batch
    (1, 2, 2, 3),  # more processes, another batch: 4 rows served, so each process skips 2
    (1, 3, 4, 1),  # 6 rows served, 4 processes: each skips 2 (rounded up), rows 6 and 7 are never served
])
def test_a_position_in_rows_survives_another_number_of_processes(monkeypatch, world, batch, then_world, then_batch):
    """Stopped after 2 batches per process, resumed on `then_world` processes with `then_batch`
    rows each: the epoch goes on with rows of the global order not served yet, every process
    serving as many batches (else DDP would hang), and fewer than `then_world` rows left out."""
    order = EpochShuffle(ROWS, 0).order(1).tolist()  # one process: the global order
    served = 2 * batch * world
    seen, state = [], None
    for rank in range(world):
        as_process(monkeypatch, rank, world)
        data = loader(batch_size=batch)
        data.sampler.set_epoch(1)
        it = iter(data)
        seen += [row for _ in range(2) for row in next(it)["input_ids"][:, 0].tolist()]
        state = data.state_dict()
    assert state == {"epoch": 1, "rows": served} and sorted(seen) == sorted(order[:served])
    rest = []
    for rank in range(then_world):
        as_process(monkeypatch, rank, then_world)
        resumed = loader(batch_size=then_batch)
        resumed.load_state_dict(state)
        batches = epoch_batches(resumed)
        assert len(batches) == (ROWS // then_world - -(-served // then_world)) // then_batch  # the same on every rank
        rest += sum(batches, [])
    assert set(rest) <= set(order[served:])  # no row twice in the epoch
    assert min(order.index(row) for row in rest) - served < then_world  # left out: the rounding up only


def test_loaders_leave_the_global_rng_alone():
    bundle = DataBundle(rows(), rows(6), vocab_size=ROWS, tokenizer=None, modality="image", bos_id=None, eos_id=None)
    train, valid = make_loaders(bundle, batch_size=4, eval_batch_size=4, seed=3)
    state = torch.get_rng_state()
    for data in (train, valid, train):
        list(data)
    assert torch.equal(state, torch.get_rng_state())


# -- through Lightning ---------------------------------------------------------------------
class Recorder(L.LightningModule):
    """Records the rows of every training batch; trains nothing."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[int]] = []
        self.epochs: list[int] = []  # the sampler's epoch of each batch

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"][:, 0].tolist())
        self.epochs.append(self.trainer.train_dataloader.sampler.epoch)
        return self.weight * 0.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


STEPS = 7  # 3 batches per epoch: the run crosses two epoch boundaries


def fit(directory, resume=None, batch_size=4, steps=STEPS, module=None) -> list[list[int]]:
    module = module or Recorder()
    trainer = L.Trainer(
        max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, default_root_dir=str(directory), accelerator="cpu",
        callbacks=[ModelCheckpoint(dirpath=str(directory), filename="step{step}", auto_insert_metric_name=False,
                                   every_n_train_steps=1, save_top_k=-1)],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader(seed=5, batch_size=batch_size), ckpt_path=resume)
    assert not [w for w in caught if "not resumable" in str(w.message)]
    return module.seen


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    directory = tmp_path_factory.mktemp("straight")
    return directory, fit(directory)


@pytest.mark.parametrize("step", [2, 3, 4])  # mid epoch 0, end of epoch 0, mid epoch 1
def test_lightning_resume_neither_skips_nor_repeats_batches(straight, tmp_path, step):
    directory, seen = straight
    assert len(seen) == STEPS and seen[:3] == epoch_batches(loader(seed=5), 0)
    assert seen[3:6] == epoch_batches(loader(seed=5), 1)
    assert fit(tmp_path, resume=str(directory / f"step{step}.ckpt")) == seen[step:]


@pytest.mark.parametrize("batch, step, then_batch", [
    (2, 6, 4),  # 12 of 14 rows served: no batch of 4 left in that epoch
    (2, 5, 4),  # 10 served: one batch of 4 left
    (4, 3, 2),  # the end of an epoch, then smaller batches
])
def test_lightning_resume_with_another_batch_serves_no_row_twice_in_an_epoch(tmp_path, batch, step, then_batch):
    """Resumed with another batch size (e.g. on more processes), Lightning still counts the
    epoch's batches in the old size; whatever epoch it sets, no row comes twice within one."""
    first, then = Recorder(), Recorder()
    fit(tmp_path / "first", batch_size=batch, steps=step, module=first)
    fit(tmp_path / "then", resume=str(tmp_path / "first" / f"step{step}.ckpt"), batch_size=then_batch,
        steps=step + 4, module=then)
    assert len(then.seen) == 4
    rows_by_epoch: dict[int, list[int]] = {}
    for epoch, rows in zip(first.epochs + then.epochs, first.seen + then.seen):
        rows_by_epoch.setdefault(epoch, []).extend(rows)
    assert all(len(rows) == len(set(rows)) for rows in rows_by_epoch.values()), rows_by_epoch
