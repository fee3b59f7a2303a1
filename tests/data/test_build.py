"""build_data dispatch, unknown names, config access and the loaders."""

import pytest
import torch
from omegaconf import OmegaConf

from mdlm_dmmd.data import TokenDataset, DataBundle, available_datasets, build_data, make_loaders
from mdlm_dmmd.errors import UserError


def test_available_datasets():
    assert available_datasets() == sorted([
        "cifar10_pixels", "digits", "shakespeare", "text_files", "openwebtext", "openwebtext-split", "wikitext103",
        "wikitext2", "lm1b", "text8"])


def test_unknown_name_suggests():
    with pytest.raises(UserError) as err:
        build_data({"name": "shakspeare"}, 64)
    message = str(err.value)
    assert message.startswith("unknown data 'shakspeare'; available: cifar10_pixels, digits, lm1b, ")
    assert message.endswith("(did you mean 'shakespeare'?)")
    assert "\n" not in message
    with pytest.raises(UserError, match=r"available: .*text_files, wikitext103, wikitext2$"):
        build_data({"name": "zzzz"}, 64)
    with pytest.raises(UserError, match="data.name is required"):
        build_data({}, 64)


def test_bad_length():
    with pytest.raises(UserError, match="model.length must be a positive int, got 0"):
        build_data({"name": "digits"}, 0)


def test_dictconfig_nulls_mean_defaults():
    cfg = OmegaConf.create({"name": "digits", "valid_fraction": None, "split_seed": None})
    bundle = build_data(cfg, 64)
    assert (len(bundle.train), len(bundle.valid)) == (1617, 180)


def _bundle(n=10, length=4):
    ids = torch.arange(n * length).view(n, length)
    return DataBundle(train=TokenDataset(ids), valid=TokenDataset(ids[:3]), vocab_size=n * length,
                      tokenizer=None, modality="text", bos_id=None, eos_id=None)


def _order(loader):
    return torch.cat([batch["input_ids"][:, 0] for batch in loader]).tolist()


def test_loaders_are_seeded_and_drop_last():
    bundle = _bundle()
    train, valid = make_loaders(bundle, batch_size=3, eval_batch_size=2, seed=1)
    assert len(train) == 3  # 10 // 3, the last partial batch dropped
    first = _order(train)
    assert len(first) == 9 and len(set(first)) == 9
    assert _order(make_loaders(bundle, batch_size=3, eval_batch_size=2, seed=1)[0]) == first
    others = [_order(make_loaders(bundle, batch_size=3, eval_batch_size=2, seed=s)[0])
              for s in range(2, 6)]
    assert any(o != first for o in others)
    assert _order(valid) == [0, 4, 8]  # fixed order, tail kept
    assert not train.persistent_workers


def test_batch_larger_than_data():
    with pytest.raises(UserError, match="batch size 11 is larger than the 10 training"):
        make_loaders(_bundle(), batch_size=11, eval_batch_size=2)


def test_train_shards_are_disjoint_and_cover_the_training_split():
    full = build_data({"name": "digits"}, 64)
    shards = [build_data({"name": "digits", "train_shard": [i, 3]}, 64) for i in range(3)]
    rows = [torch.stack([s.train[j]["input_ids"] for j in range(len(s.train))]) for s in shards]
    assert [len(r) for r in rows] == [539, 539, 539]  # 1617 training images in three parts
    assert torch.equal(torch.cat(rows), torch.stack([full.train[j]["input_ids"] for j in range(len(full.train))]))
    for shard in shards:  # the validation split does not move
        assert torch.equal(shard.valid[0]["input_ids"], full.valid[0]["input_ids"]) and len(shard.valid) == len(full.valid)


@pytest.mark.parametrize("shard", [[1, 1], [-1, 2], [0], [0.5, 2], [True, 2]])
def test_bad_train_shard(shard):
    with pytest.raises(UserError, match=r"data.train_shard must be \[index, count\] with 0 <= index < count"):
        build_data({"name": "digits", "train_shard": shard}, 64)
