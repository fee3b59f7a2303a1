"""Hub corpora without the hub: the offline error, the save_to_disk cache, a faked download."""

import os

import datasets
import pytest
import torch

from mdlm_dmmd.data import build_data
from mdlm_dmmd.data import text
from mdlm_dmmd.errors import UserError


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Force offline mode even if the environment forgot to (a hub retry takes ~48 s)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


def test_offline_error_names_the_cache(tmp_path):
    cfg = {"name": "wikitext103", "cache_dir": str(tmp_path)}
    with pytest.raises(UserError) as err:
        build_data(cfg, 16)
    message = str(err.value)
    expected = text.hub_cache_path(cfg, 16, "train")
    assert message.startswith(f"data 'wikitext103' needs the Hugging Face hub or a cache at "
                              f"{expected}; ")
    assert "\n" not in message
    assert expected == tmp_path / "wikitext103_train_gpt2_L16_wrapped"


def test_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MDLM_DMMD_CACHE", str(tmp_path))
    assert text.hub_cache_path({"name": "lm1b", "wrap": False}, 128, "valid") == \
        tmp_path / "lm1b_valid_gpt2_L128_unwrapped"
    assert text.hub_cache_path({"name": "lm1b", "cache_dir": "/x", "tokenizer": "org/tok"},
                               128, "train") == text.Path("/x/lm1b_train_org-tok_L128_wrapped")


def test_rows_never_depend_on_the_machines_cpu_count(monkeypatch):
    """`map` restarts its 1000-document wrap batches at each process's share, so wrapped rows
    depend on data.num_proc (measured: 2500 documents, L = 16, 1 vs 2 processes: the same 1689
    rows in number, different rows). null is 8 on every machine; another value names the cache."""
    from mdlm_dmmd.data import hub

    for cpus in (1, 2, 64):
        monkeypatch.setattr(os, "cpu_count", lambda cpus=cpus: cpus)
        assert hub.tokenizing_processes({"name": "lm1b"}) == 8
        assert hub.hub_cache_path({"name": "lm1b", "cache_dir": "/x"}, 128, "train") == text.Path(
            "/x/lm1b_train_gpt2_L128_wrapped")
    assert hub.hub_cache_path({"name": "lm1b", "cache_dir": "/x", "num_proc": 2}, 128, "train") == text.Path(
        "/x/lm1b_train_gpt2_L128_wrapped_proc2")
    assert hub.hub_cache_path({"name": "lm1b", "cache_dir": "/x", "num_proc": 8}, 128, "train").name.endswith("wrapped")
    # one row per document (unwrapped) and text8's character chunks do not depend on it
    assert hub.hub_cache_path({"name": "lm1b", "cache_dir": "/x", "num_proc": 2, "wrap": False}, 128,
                              "valid").name == "lm1b_valid_gpt2_L128_unwrapped"
    assert hub.hub_cache_path({"name": "text8", "cache_dir": "/x", "num_proc": 2}, 256, "train").name == \
        "text8_train_char_L256_wrapped"
    for bad in (0, -1, 1.5, True, "four"):
        with pytest.raises(UserError, match=r"data.num_proc must be an int >= 1 \(or null for 8\), got"):
            hub.hub_cache_path({"name": "lm1b", "num_proc": bad}, 128, "train")


def test_openwebtext_split_keeps_a_training_document(tmp_path, monkeypatch):
    """valid_fraction close to 1 leaves one document to train on; one document cannot be split."""
    docs = [f"document {i}" for i in range(3)]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict({"text": docs}))
    cfg = {"name": "openwebtext-split", "cache_dir": str(tmp_path), "wrap": False, "num_proc": 1,
           "valid_fraction": 0.9}
    bundle = build_data(cfg, 8)
    assert len(bundle.train) == 1 and len(bundle.valid) == 2
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict({"text": docs[:1]}))
    with pytest.raises(UserError, match="openwebtext-split: 1 document"):
        build_data({**cfg, "cache_dir": str(tmp_path / "one")}, 8)


def _save(cfg, length, split, rows):
    datasets.Dataset.from_dict({"input_ids": rows}).save_to_disk(
        str(text.hub_cache_path(cfg, length, split)))


def test_loads_from_cache_without_network(tmp_path):
    cfg = {"name": "wikitext103", "cache_dir": str(tmp_path)}
    train = [[50256, i, i + 1, 50256] for i in range(5)]
    _save(cfg, 4, "train", train)
    _save(cfg, 4, "valid", [[50256, 7, 8, 50256]])
    bundle = build_data(cfg, 4)
    assert (bundle.vocab_size, bundle.bos_id, bundle.eos_id) == (50257, 50256, 50256)
    assert len(bundle.train) == 5 and len(bundle.valid) == 1
    assert set(bundle.train[2]) == {"input_ids"}
    assert bundle.train[2]["input_ids"].tolist() == train[2]
    assert bundle.valid[0]["input_ids"].dtype == torch.long
    with pytest.raises(UserError, match="holds rows of 4 tokens but model.length=8"):
        cfg8 = {"name": "wikitext103", "cache_dir": str(tmp_path)}
        for split in ("train", "valid"):
            text.hub_cache_path(cfg8, 8, split).symlink_to(text.hub_cache_path(cfg, 4, split))
        build_data(cfg8, 8)


def test_text8_from_cache(tmp_path):
    cfg = {"name": "text8", "cache_dir": str(tmp_path)}
    for split in ("train", "valid"):
        _save(cfg, 6, split, [[1, 2, 0, 3, 4, 5]])
    bundle = build_data(cfg, 6)
    assert (bundle.vocab_size, bundle.bos_id, bundle.eos_id) == (27, None, None)
    assert bundle.decode(bundle.train[0]["input_ids"]) == ["ab cde"]


def test_bpe_refused_for_hub(tmp_path):
    with pytest.raises(UserError, match="data.tokenizer=bpe is only for local corpora"):
        build_data({"name": "lm1b", "tokenizer": "bpe", "cache_dir": str(tmp_path)}, 16)


def test_faked_download_is_tokenized_then_cached(tmp_path, monkeypatch):
    calls = []

    def fake_load_dataset(path, config=None, split=None, revision=None):
        calls.append((path, config, split, revision))
        lines = [" = Title = \n", "", " a well @-@ known town , he said . \n"] * 4
        return datasets.Dataset.from_dict({"text": lines})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = {"name": "wikitext2", "cache_dir": str(tmp_path), "num_proc": 1}
    bundle = build_data(cfg, 8)
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "train", None),
                     ("Salesforce/wikitext", "wikitext-2-raw-v1", "validation", None)]
    rows = bundle.train.with_format(None)["input_ids"]
    assert all(r[0] == 50256 and r[-1] == 50256 and len(r) == 8 for r in rows)
    stream = torch.tensor(rows)[:, 1:-1].reshape(1, -1)  # the rows without their BOS/EOS frame
    decoded = bundle.decode(stream)[0]
    assert " = Title =\n<|endoftext|> a well-known town, he said.\n<|endoftext|>" in decoded

    def no_network(*args, **kwargs):
        raise AssertionError("hub called although cached")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    again = build_data(cfg, 8)
    assert again.train.with_format(None)["input_ids"] == rows


def test_openwebtext_split_and_text8_rows(tmp_path, monkeypatch):
    docs = [f"document {i}" for i in range(100)]
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **k: datasets.Dataset.from_dict({"text": docs}))
    cfg = {"name": "openwebtext-split", "cache_dir": str(tmp_path), "wrap": False, "num_proc": 1}
    bundle = build_data(cfg, 8)
    assert len(bundle.train) == 98 and len(bundle.valid) == 2  # the last 2% validate
    last = bundle.decode(bundle.valid[1]["input_ids"][:4])
    assert last == ["<|endoftext|>document 99<|endoftext|>"]
    assert set(bundle.valid[0]) == {"input_ids", "attention_mask"}

    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **k: datasets.Dataset.from_dict({"text": ["ab cd efg h"]}))
    text8 = build_data({"name": "text8", "cache_dir": str(tmp_path)}, 3)
    assert text8.train.with_format(None)["input_ids"] == [[1, 2, 0], [3, 4, 0], [5, 6, 7]]


def test_cache_name_holds_max_documents_valid_fraction_and_revision():
    """Each of them changes the rows, so each is in the cache's name (hub_cache_path's docstring)."""
    def name(**cfg):
        return text.hub_cache_path({"cache_dir": "/x", **cfg}, 16, "train").name

    assert name(name="openwebtext-split", max_documents=3) == "openwebtext-split_train_gpt2_L16_wrapped_max3_valid0.02"
    assert name(name="openwebtext-split", valid_fraction=0.05) == "openwebtext-split_train_gpt2_L16_wrapped_valid0.05"
    assert name(name="lm1b", hub_revision="v2") == "lm1b_train_gpt2_L16_wrapped_v2"


def test_revision_override_and_max_documents_reach_the_download(tmp_path, monkeypatch):
    """data.hub_revision is what load_dataset is asked for; max_documents keeps the first N rows."""
    revisions = []

    def fake_load_dataset(path, config=None, split=None, revision=None):
        revisions.append(revision)
        return datasets.Dataset.from_dict({"text": [f"document {i}" for i in range(10)]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    bundle = build_data({"name": "wikitext2", "cache_dir": str(tmp_path), "max_documents": 2,
                         "hub_revision": "r1", "wrap": False, "num_proc": 1}, 8)
    assert revisions == ["r1", "r1"]
    assert (len(bundle.train), len(bundle.valid)) == (2, 2)


def test_a_local_tokenizer_directory_names_the_cache_by_its_files(tmp_path, monkeypatch):
    """Directories whose names slug alike (tok_v1, tok-v1) or one edited in place get their own
    cache; a hub id keeps its slug."""
    from mdlm_dmmd.data import hub

    monkeypatch.chdir(tmp_path)
    for name, vocab in (("tok_v1", "a b"), ("tok-v1", "a c")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "vocab.txt").write_text(vocab)
    names = {hub.hub_cache_path({"name": "lm1b", "tokenizer": d, "cache_dir": "/x"}, 16, "train").name
             for d in ("tok_v1", "tok-v1", str(tmp_path / "tok_v1"))}
    assert len(names) == 2 and all(n.startswith("lm1b_train_tok-v1-") for n in names)  # relative = absolute
    before = hub.tokenizer_tag("tok_v1")
    (tmp_path / "tok_v1" / "vocab.txt").write_text("a b d")
    assert hub.tokenizer_tag("tok_v1") != before
    assert hub.tokenizer_tag("org/tok") == "org-tok"  # no such directory: a hub id
