"""Rows of token ids from documents, shared by the local (`text.py`) and hub (`hub.py`) corpora:
the tokenizer a `data.tokenizer` names, tokenizing without special tokens, MDLM wrapping or
per-document padding, and the seeded document split. Pure functions; `text.py` re-exports them.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from mdlm_dmmd.data import option
from mdlm_dmmd.data.tokenizers import gpt2_tokenizer, hub_tokenizer, special_ids, train_bpe
from mdlm_dmmd.errors import UserError

# ---------------------------------------------------------------------------------------------
# Rows from token streams


def wrap_documents(docs: Sequence[Sequence[int]], length: int, bos_id: int, eos_id: int) -> Tensor:
    """MDLM wrapping: EOS after each document, concatenate, cut rows [BOS] chunk [EOS]."""
    if length < 3:
        raise UserError(f"model.length must be at least 3 with data.wrap=true "
                        f"(BOS + tokens + EOS), got {length}")
    body = length - 2
    stream = np.fromiter(
        itertools.chain.from_iterable(itertools.chain(d, (eos_id,)) for d in docs if len(d)),
        dtype=np.int64)
    n = len(stream) // body
    rows = np.empty((n, length), dtype=np.int64)
    rows[:, 0] = bos_id
    rows[:, 1:-1] = stream[: n * body].reshape(n, body)  # [N, L-2]; the tail is dropped
    rows[:, -1] = eos_id
    return torch.from_numpy(rows)


def pad_documents(docs: Sequence[Sequence[int]], length: int, bos_id: int,
                  eos_id: int) -> tuple[Tensor, Tensor]:
    """One row per document: [BOS] doc[:length-2] [EOS], padded with EOS; (ids, attention_mask)."""
    if length < 2:
        raise UserError(f"model.length must be at least 2 with data.wrap=false, got {length}")
    docs = [d for d in docs if len(d)]
    ids = torch.full((len(docs), length), eos_id, dtype=torch.long)
    mask = torch.zeros((len(docs), length), dtype=torch.long)
    for i, doc in enumerate(docs):
        row = [bos_id, *doc[: length - 2], eos_id]
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def split_indices(n: int, valid_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of n documents (or images) into sorted (train, valid) index lists, both
    non-empty: the valid split takes round(n · valid_fraction) of them, at least 1 and at most n − 1."""
    if not 0.0 < valid_fraction < 1.0:
        raise UserError(f"data.valid_fraction must be in (0, 1), got {valid_fraction}")
    if n < 2:
        raise UserError(f"data: {n} document(s) or image(s) cannot be split into non-empty train and valid splits")
    n_valid = min(n - 1, max(1, round(n * valid_fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_valid:]), sorted(perm[:n_valid])


# ---------------------------------------------------------------------------------------------
# Tokenizers and the cache


def cache_root(cfg: Mapping) -> Path:
    """`data.cache_dir`, else $MDLM_DMMD_CACHE, else ~/.cache/mdlm_dmmd."""
    root = option(cfg, "cache_dir") or os.environ.get("MDLM_DMMD_CACHE") or "~/.cache/mdlm_dmmd"
    return Path(str(root)).expanduser()


def tokenize_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    # verbose=False: documents longer than model_max_length are fine here, they get chunked.
    return tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]


def text_tokenizer(cfg: Mapping, name: str, train_docs: Sequence[str] | None):
    """(tokenizer, bos, eos) for `data.tokenizer`; bpe is trained on `train_docs` only."""
    tokenizer_name = str(option(cfg, "tokenizer", "gpt2"))
    if tokenizer_name == "gpt2":
        tokenizer = gpt2_tokenizer()
    elif tokenizer_name == "bpe":
        if train_docs is None:
            raise UserError(f"data.tokenizer=bpe is only for local corpora (shakespeare, "
                            f"text_files); use gpt2 or a hub id for data={name}")
        tokenizer = train_bpe(train_docs, option(cfg, "bpe_vocab_size", 4096), cache_root(cfg))
    else:
        tokenizer = hub_tokenizer(tokenizer_name)
    return (tokenizer, *special_ids(tokenizer, tokenizer_name))
