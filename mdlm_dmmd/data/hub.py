"""Hub corpora (openwebtext, openwebtext-split, wikitext103, wikitext2, lm1b, text8) as rows of
token ids, through `datasets.load_dataset`; `text.py` re-exports these names.

They need the network or the HF cache the first time. Their tokenized splits are saved with
`save_to_disk` under `data.cache_dir` (see `hub_cache_path`) and loaded from there first: that
is the fully offline path. Like upstream, one remainder is dropped per `map` batch of 1000
documents. `map` gives each of its `data.num_proc` processes a contiguous share of the documents
and starts its batches at the share's start, so wrapped rows depend on the number of processes:
it is 8 unless set (never the machine's CPU count, so that every machine builds the same rows),
and any other value is part of the cache's name. wikitext and lm1b are detokenized (their spacing
undone) before GPT-2 sees them.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from mdlm_dmmd.data import DataBundle, option
from mdlm_dmmd.data.once import build_once
from mdlm_dmmd.data.rows import cache_root, pad_documents, text_tokenizer, tokenize_texts, wrap_documents
from mdlm_dmmd.data.tokenizers import CharTokenizer
from mdlm_dmmd.errors import UserError

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
NUM_PROC = 8  # tokenizing processes when data.num_proc is null (the same on every machine)


def _source(cfg: Mapping, name: str) -> HubSource:
    source = HUB_SOURCES[name]
    return replace(source, path=str(option(cfg, "hub_id", source.path)),
                   config=option(cfg, "hub_config", source.config),
                   revision=option(cfg, "hub_revision", source.revision))


def _slug(value) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", str(value)).strip("-")


def tokenizer_tag(value: str) -> str:
    """The tokenizer's part of a cache name: a hub id's slug (`org/tok` → `org-tok`), or for a
    local directory (as `AutoTokenizer` reads it) its name and a hash of its files, so that two
    directories whose names slug alike, or one edited in place, never share a cache."""
    folder = Path(value)
    if value == "gpt2" or not folder.is_dir():  # gpt2: the package's own files (`text_tokenizer`)
        return _slug(value)
    digest = hashlib.sha256()
    for file in sorted(f for f in folder.rglob("*") if f.is_file()):
        digest.update(f"{file.relative_to(folder)}\0{file.stat().st_size}\0".encode())
        digest.update(file.read_bytes())
    return f"{_slug(folder.name)}-{digest.hexdigest()[:12]}"


def hub_cache_path(cfg: Mapping, length: int, split: str) -> Path:
    """Directory of the tokenized `split` ("train" | "valid") of a hub dataset, in `save_to_disk`
    format with an `input_ids` column (and `attention_mask` when unwrapped).

    The name holds everything that changes the rows: dataset, split, tokenizer (`tokenizer_tag`),
    length, wrap, and the optional overrides, e.g. `wikitext103_valid_gpt2_L1024_wrapped`.
    """
    name = option(cfg, "name")
    char_level = name == "text8"
    parts = [name, split, "char" if char_level else tokenizer_tag(str(option(cfg, "tokenizer", "gpt2"))),
             f"L{length}", "wrapped" if char_level or option(cfg, "wrap", True) else "unwrapped"]
    if option(cfg, "max_documents") is not None:
        parts.append(f"max{int(option(cfg, 'max_documents'))}")
    if name == "openwebtext-split":
        parts.append(f"valid{float(option(cfg, 'valid_fraction', 0.02)):g}")
    for key in ("hub_id", "hub_config", "hub_revision"):
        if option(cfg, key) is not None:
            parts.append(_slug(option(cfg, key)))
    processes = tokenizing_processes(cfg)
    if not char_level and option(cfg, "wrap", True) and processes != NUM_PROC:
        parts.append(f"proc{processes}")  # wrapped rows depend on it (module docstring)
    return cache_root(cfg) / "_".join(parts)


def tokenizing_processes(cfg: Mapping) -> int:
    """`data.num_proc`, `NUM_PROC` when null; one line naming the key when it is not an int ≥ 1."""
    value = option(cfg, "num_proc")
    if value is None:
        return NUM_PROC
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"data.num_proc must be an int >= 1 (or null for {NUM_PROC}), got {value!r}")
    return value


def is_hub_failure(err: Exception) -> bool:
    """Errors that mean "the hub or its cache could not give us the data"."""
    from datasets.exceptions import DatasetsError

    # huggingface_hub 1.x+ talks through httpx, whose errors are not OSErrors.
    module = type(err).__module__ or ""
    return isinstance(err, (OSError, DatasetsError)) or module.startswith(
        ("httpx", "huggingface_hub", "requests"))


def failure_reason(err: Exception) -> str:
    """The first line of a hub or `datasets` error, for a one-line UserError."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _load_raw(cfg: Mapping, name: str, split: str, cache_path: Path):
    """The raw `split` of a hub corpus as a `datasets.Dataset`, or a one-line UserError."""
    import datasets

    source = _source(cfg, name)
    hub_split = source.train_split if split == "train" else source.valid_split
    try:
        raw = datasets.load_dataset(source.path, source.config, split=hub_split,
                                    revision=source.revision)
    except Exception as err:  # noqa: BLE001 - narrowed by is_hub_failure, re-raised otherwise
        if not is_hub_failure(err):
            raise
        raise UserError(f"data '{name}' needs the Hugging Face hub or a cache at {cache_path}; "
                        f"load_dataset('{source.path}') failed: {failure_reason(err)}") from err
    if name == "openwebtext-split":
        fraction = float(option(cfg, "valid_fraction", 0.02))
        if not 0.0 < fraction < 1.0:
            raise UserError(f"data.valid_fraction must be in (0, 1), got {fraction}")
        if len(raw) < 2:
            raise UserError(f"data=openwebtext-split: {len(raw)} document(s) cannot be split into train and valid")
        n_valid = min(len(raw) - 1, max(1, round(len(raw) * fraction)))
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
        ids = tokenize_texts(tokenizer, texts)
        if wrap:
            return {"input_ids": wrap_documents(ids, length, bos, eos).tolist()}
        input_ids, mask = pad_documents(ids, length, bos, eos)
        return {"input_ids": input_ids.tolist(), "attention_mask": mask.tolist()}

    num_proc = tokenizing_processes(cfg)
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
        tokenizer, bos, eos = text_tokenizer(cfg, name, None)
    wrap = name == "text8" or bool(option(cfg, "wrap", True))
    splits = {}
    for split in ("train", "valid"):
        path = hub_cache_path(cfg, length, split)

        def build(tmp: Path, split: str = split, path: Path = path) -> None:
            raw = _load_raw(cfg, name, split, path)
            rows = (_text8_rows(raw, length) if name == "text8"
                    else _tokenize_hub(raw, name, cfg, length, tokenizer, bos, eos))
            rows.save_to_disk(str(tmp))

        # one process per machine tokenizes; an interrupted run leaves no half-written cache
        build_once(path, build)
        ds = datasets.load_from_disk(str(path))
        _check_rows(ds, path, length)
        columns = ["input_ids"] + (["attention_mask"] if not wrap
                                   and "attention_mask" in ds.column_names else [])
        splits[split] = ds.with_format("torch", columns=columns)
    return DataBundle(train=splits["train"], valid=splits["valid"], vocab_size=len(tokenizer),
                      tokenizer=tokenizer, modality="text", bos_id=bos, eos_id=eos)
