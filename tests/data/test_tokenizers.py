"""Tokenizers: GPT-2 ids from the offline files, deterministic cached BPE, text8 characters."""

import pytest

from mdlm_dmmd.data import tokenizers as tk
from mdlm_dmmd.errors import UserError

CORPUS = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"] * 20


def test_gpt2_known_ids():
    tok = tk.gpt2_tokenizer()
    assert len(tok) == 50257
    assert tok.bos_token_id == tok.eos_token_id == 50256
    # Reference ids of OpenAI's GPT-2 BPE.
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]
    assert tok(" the", add_special_tokens=False)["input_ids"] == [262]
    assert tok("<|endoftext|>", add_special_tokens=False)["input_ids"] == [50256]
    text = "Ünïcode, emoji 🙂 and CJK 漢字\r\n"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_bpe_is_deterministic_and_cached(tmp_path, monkeypatch):
    a = tk.train_bpe(CORPUS, 300, tmp_path / "a")
    b = tk.train_bpe(CORPUS, 300, tmp_path / "b")
    text = "the cat sat on the log"
    assert a(text)["input_ids"] == b(text)["input_ids"]
    assert a.decode(a(text)["input_ids"]) == text
    assert a.bos_token == a.eos_token == "<|endoftext|>"
    assert a.bos_token_id == a.eos_token_id == 0
    files = list((tmp_path / "a" / "tokenizers").glob("bpe-300-*.json"))
    assert len(files) == 1

    # A second call with the same corpus loads the file instead of training again.
    from tokenizers import ByteLevelBPETokenizer

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(ByteLevelBPETokenizer, "train_from_iterator", no_training)
    c = tk.train_bpe(CORPUS, 300, tmp_path / "a")
    assert c(text)["input_ids"] == a(text)["input_ids"]
    # Another corpus or size is another cache key.
    with pytest.raises(AssertionError):
        tk.train_bpe(CORPUS + ["new"], 300, tmp_path / "a")
    with pytest.raises(AssertionError):
        tk.train_bpe(CORPUS, 301, tmp_path / "a")


def test_bpe_vocab_size_error(tmp_path):
    with pytest.raises(UserError, match="data.bpe_vocab_size"):
        tk.train_bpe(CORPUS, 100, tmp_path)


def test_char_tokenizer():
    tok = tk.CharTokenizer()
    assert len(tok) == 27
    ids = tok.encode("a z b")
    assert ids == [1, 0, 26, 0, 2]
    assert tok.decode(ids) == "a z b"
    assert tok.batch_decode([[1, 27, 2]]) == ["a_b"]  # 27 = the mask id appended later
    with pytest.raises(UserError, match="text8"):
        tok.encode("A")


def test_special_ids_fallback_and_error():
    class Bert:
        bos_token_id = eos_token_id = None
        cls_token_id, sep_token_id = 101, 102

    assert tk.special_ids(Bert(), "bert") == (101, 102)
    Bert.cls_token_id = None
    with pytest.raises(UserError, match="data.tokenizer 'bert'"):
        tk.special_ids(Bert(), "bert")


def test_bpe_cache_key_keeps_text_boundaries(tmp_path):
    """Two corpora with the same concatenation ("ab ab ab c c") but other documents are two caches."""
    tk.train_bpe(["ab ab ab", " c c"], 300, tmp_path)
    tk.train_bpe(["ab ab a", "b c c"], 300, tmp_path)
    assert len(list((tmp_path / "tokenizers").glob("bpe-300-*.json"))) == 2
