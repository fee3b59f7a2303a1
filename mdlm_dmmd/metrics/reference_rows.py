"""Feeding a reference causal LM (shared by gradient_moment.py and gen_ppl.py): calling it,
turning token rows into its inputs (retokenisation, BOS, context truncation, right padding) and
scoring them (per-token NLL).

Loading and checking the reference is `reference.py`, which re-exports every name here.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mdlm_dmmd.errors import UserError

# ----------------------------------------------------------------------------- calling the reference


def is_hf_model(model: Any) -> bool:
    """True for a transformers `PreTrainedModel` (checked without importing transformers)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def reference_logits(model: nn.Module, ids: Tensor) -> Tensor:
    """Logits [B, T, V] of a HF causal LM (`.logits`) or of any module ids -> logits."""
    out = model(ids, use_cache=False) if is_hf_model(model) else model(ids)
    return getattr(out, "logits", out)


def context_length(model: nn.Module) -> int | None:
    """Longest input the reference accepts (`n_positions` / `max_position_embeddings`), or None."""
    for owner in (model, getattr(model, "config", None)):
        for name in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(owner, name, None) if owner is not None else None
            if isinstance(value, int) and value > 0:
                return value
    return None



# ----------------------------------------------------------------------------- token rows as its inputs


def as_rows(x: Any, what: str, metric: str) -> list[list[int]]:
    """Token rows as lists of ints: a LongTensor [N, L] or a sequence of 1-D id sequences."""
    if isinstance(x, Tensor):
        if x.dim() != 2 or x.is_floating_point() or x.dtype == torch.bool:
            raise UserError(f"{metric}: {what} must be integer token ids [N, L], got "
                            f"{x.dtype} of shape {tuple(x.shape)}")
        return x.detach().cpu().long().tolist()
    try:
        return [[int(v) for v in torch.as_tensor(row).reshape(-1).tolist()] for row in x]
    except (TypeError, ValueError, RuntimeError) as err:
        raise UserError(f"{metric}: {what} must be token ids, a LongTensor [N, L] or a list of id "
                        f"lists") from err


def same_tokenizer(a: Any, b: Any) -> bool:
    """Whether two tokenizers map text to the same ids (same object or equal vocabularies)."""
    if a is b:
        return True
    if hasattr(a, "get_vocab") and hasattr(b, "get_vocab"):
        return a.get_vocab() == b.get_vocab()
    return type(a) is type(b) and vars(a) == vars(b)


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # No special tokens: the BOS is prepended by `prepare_rows`, the same way for every tokenizer.
    transformers = sys.modules.get("transformers")
    if transformers is not None and isinstance(tokenizer, transformers.PreTrainedTokenizerBase):
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return [list(tokenizer.encode(text)) for text in texts]


def retokenize_rows(rows: list[list[int]], tokenizer: Any, reference_tokenizer: Any, *,
                    prefix_lengths: list[int] | None, what: str, metric: str
                    ) -> tuple[list[list[int]], list[int] | None]:
    """Decode rows with `tokenizer.batch_decode` and re-encode with the reference tokenizer.

    Special tokens are kept in the text (Duo's convention), so a generated <|endoftext|> comes
    back as the reference's EOS when both tokenizers spell it the same. A prompt is decoded and
    re-encoded apart from its continuation, so the prompt length in reference tokens is exact
    (the boundary token may differ from a joint encoding, alike for samples and data).
    Rows whose (continuation) text is empty or whitespace only are refused.
    """
    prefixes = prefix_lengths or [0] * len(rows)
    heads = tokenizer.batch_decode([row[:p] for row, p in zip(rows, prefixes)]) if prefix_lengths else None
    texts = tokenizer.batch_decode([row[p:] for row, p in zip(rows, prefixes)])
    blank = sum(1 for text in texts if not text.strip())
    if blank:
        part = "continuations" if prefix_lengths else "rows"
        raise UserError(f"{metric}: {blank} of {len(rows)} {what} {part} decode to empty or "
                        f"whitespace-only text; the reference has nothing to score")
    bodies = _encode(reference_tokenizer, texts)
    if heads is None:
        return bodies, None
    heads_ids = _encode(reference_tokenizer, heads)
    return [h + b for h, b in zip(heads_ids, bodies)], [len(h) for h in heads_ids]


def special_id(model: nn.Module, reference_tokenizer: Any, which: str, vocab_size: int) -> int | None:
    """The reference's BOS (`which="bos"`) or EOS id, or None where it has none.

    Taken from the reference tokenizer; without one (same ids), from the model: the `ar`
    adapter's start id, or the HF config's id when it lies inside the model's vocabulary (a
    tiny test GPT-2 keeps GPT-2's default 50256, which is not a token of its own).
    """
    if reference_tokenizer is not None:
        value = getattr(reference_tokenizer, f"{which}_token_id", None)
        if value is None and which == "bos":  # GPT-2 style: EOS doubles as BOS
            value = getattr(reference_tokenizer, "eos_token_id", None)
        return value
    value = getattr(model, f"{which}_token_id", None)
    if value is not None:
        return int(value)
    value = getattr(getattr(model, "config", None), f"{which}_token_id", None)
    if isinstance(value, int) and 0 <= value < vocab_size:
        return value
    return None


@dataclass
class PreparedRows:
    """Rows as fed to the reference: BOS prepended, truncated to its context."""

    rows: list[list[int]]
    first_scored: list[int]  # first position whose token enters the loss (>= 1)


def prepare_rows(rows: list[list[int]], *, bos: int | None, context: int | None,
                 prefix_lengths: list[int] | None, what: str, metric: str) -> PreparedRows:
    """Prepend BOS, mark where scoring starts, truncate to the context (one warning per call).

    BOS: prepended to every row that does not already start with it, so the first real token is
    scored given BOS. A row that starts with BOS (MDLM-wrapped rows do) is left as is, which is
    exactly Duo's gen-PPL input. Without a BOS the first token is context only.
    Prompts (`prefix_lengths`) are context: scoring starts at the first continuation token.
    """
    out, first, too_long = [], [], []
    for i, row in enumerate(rows):
        p = prefix_lengths[i] if prefix_lengths else 0
        if bos is not None and (not row or row[0] != bos):
            row, p = [bos] + row, p + 1
        if context is not None and len(row) > context:
            too_long.append(len(row))
            row = row[:context]
        out.append(row)
        first.append(max(1, p))
    if too_long:
        warnings.warn(f"{metric}: {len(too_long)} {what} rows of up to {max(too_long)} reference "
                      f"tokens are longer than the reference context of {context}; truncated to "
                      f"{context}", stacklevel=3)
    empty = sum(1 for row, f in zip(out, first) if f >= len(row))
    if empty:
        reason = "all prompt, or cut by the context" if prefix_lengths else "empty"
        raise UserError(f"{metric}: {empty} of {len(rows)} {what} rows have no token to score "
                        f"({reason})")
    return PreparedRows(out, first)


@dataclass
class ReferenceBatch:
    ids: Tensor  # [B, T] right-padded
    scored: Tensor  # bool [B, T-1]: target ids[:, 1:] enters the loss


def make_batch(prepared: PreparedRows, indices: list[int], *, pad_id: int,
               device: torch.device, eos_id: int | None = None) -> ReferenceBatch:
    """Right-pad the chosen rows to their longest; pads are never scored.

    No attention mask is passed: under causal attention a right pad cannot influence any real
    position, so the logits of real tokens equal those of the unpadded row.
    With `eos_id` (gen-PPL), targets are further limited to Duo's mask: every non-EOS token plus
    the first EOS of the row as fed (a prepended BOS = EOS counts as that first EOS).
    """
    rows = [prepared.rows[i] for i in indices]
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    scored = torch.zeros(len(rows), width, dtype=torch.bool)
    real = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, (i, row) in enumerate(zip(indices, rows)):
        ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        real[b, : len(row)] = True
        scored[b, prepared.first_scored[i]: len(row)] = True
    if eos_id is not None:
        is_eos = (ids == eos_id) & real
        first_eos = is_eos & (is_eos.cumsum(dim=1) == 1)
        scored &= ~is_eos | first_eos
    return ReferenceBatch(ids.to(device), scored[:, 1:].to(device))


def token_nll(model: nn.Module, batch: ReferenceBatch) -> Tensor:
    """NLL of every target ids[:, 1:] given its prefix, in nats, zero where not scored. [B, T-1]"""
    logits = reference_logits(model, batch.ids)[:, :-1]  # [B, T-1, V]
    if logits.dtype != torch.float64:
        logits = logits.float()
    nll = F.cross_entropy(logits.transpose(1, 2), batch.ids[:, 1:], reduction="none")  # [B, T-1]
    return nll * batch.scored.to(nll.dtype)


def check_ids(rows: list[list[int]], vocab_size: int, what: str, metric: str) -> None:
    """Ids fed without retokenization must be tokens of the reference."""
    high = max((max(row) for row in rows if row), default=0)
    low = min((min(row) for row in rows if row), default=0)
    if low < 0 or high >= vocab_size:
        raise UserError(f"{metric}: {what} hold token id {high if high >= vocab_size else low}, "
                        f"outside the reference's {vocab_size} ids; pass tokenizer= and "
                        f"reference_tokenizer= to retokenize (or a mask id was left in the samples)")


def effective_context(model: nn.Module, max_length: int | None, metric: str) -> int | None:
    """The longest row fed to the reference: its context, capped by `max_length` if given."""
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                   or max_length < 2):
        raise UserError(f"{metric}: max_length must be an int >= 2, got {max_length!r}")
    limits = [v for v in (context_length(model), max_length) if v is not None]
    return min(limits) if limits else None


def pad_token(model: nn.Module, reference_tokenizer: Any, vocab_size: int) -> int:
    """Id used for right padding: the reference's EOS (Duo's pad) or 0; pads are never scored."""
    eos = special_id(model, reference_tokenizer, "eos", vocab_size)
    return eos if eos is not None and 0 <= eos < vocab_size else 0
