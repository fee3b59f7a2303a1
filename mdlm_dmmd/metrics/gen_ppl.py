"""Generative perplexity: the reference LM's perplexity on samples (MDLM / Duo convention).

Duo's `record_generative_perplexity` (research/host-pattern.md §6), step by step:
1. decode the samples with their tokenizer (special tokens kept) and re-encode them with the
   reference tokenizer (gpt2-large by default);
2. NLL of every token given its prefix, logits[:, :-1] against ids[:, 1:];
3. valid targets = every non-EOS token + the first EOS of the row;
4. gen-PPL = exp(Σ nll · valid / Σ valid) over all samples: token-weighted, not a mean of
   per-sample perplexities.

Differences from Duo, each deliberate:
- no sample is dropped (Duo keeps N // batch_size full batches only);
- pads are excluded by their own mask (Duo pads with EOS, so a row without any EOS has its first
  pad counted as "the first EOS");
- the reference BOS is prepended to rows that do not start with it, so their first token is
  scored (MDLM-wrapped samples start with BOS already and are scored exactly as Duo does);
- rows longer than the reference context are truncated with a warning instead of split into
  context-sized chunks;
- when the samples already are reference ids (an `ar` checkpoint as reference, or no tokenizers
  given), nothing is retokenized.

Beyond the value, per-sample NLLs give a standard error of the token-weighted mean NLL (ratio
estimator, delta method); `stderr` of the perplexity is value · nll_stderr (delta method again).
A low gen-PPL is not a sign of good samples on its own (D-MMD paper §5): repetitive samples
score well; read it next to the sample entropy and the gradient moment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mdlm_dmmd.errors import UserError
from mdlm_dmmd.metrics.gradient_moment import check_samples, reference_for
from mdlm_dmmd.metrics.run_data import data_bundle
from mdlm_dmmd.metrics.reference import (
    as_rows,
    check_causal,
    check_ids,
    effective_context,
    make_batch,
    pad_token,
    prepare_rows,
    retokenize_rows,
    special_id,
    token_nll,
)
from mdlm_dmmd.metrics.references import under_each_reference

_NAME = "gen_ppl"


@dataclass
class GenPPLResult:
    value: float  # exp(nll)
    stderr: float  # value * nll_stderr
    nll: float  # token-weighted mean NLL, nats per token
    nll_stderr: float  # standard error of `nll` over samples; nan for one sample
    per_sample_nll: list[float]  # mean NLL of each sample's valid tokens
    num_tokens: int  # valid tokens over all samples


def generative_perplexity(
    reference: nn.Module,
    samples: Any,
    *,
    tokenizer: Any = None,
    reference_tokenizer: Any = None,
    batch_size: int = 8,
    eos_id: int | None = None,
    max_length: int | None = None,
    retokenize: bool | None = None,
    add_bos: bool = True,
    progress: bool = False,
) -> GenPPLResult:
    """Token-weighted perplexity of `reference` on `samples` with Duo's first-EOS mask.

    samples: LongTensor [N, L] or lists of id rows, in the ids of `tokenizer`.
    tokenizer, reference_tokenizer: retokenize whenever both are given (Duo always does, even
        for the same tokenizer); `retokenize` forces it on or off. None for either: the rows
        already are reference ids.
    eos_id: EOS for the mask; default the reference tokenizer's (or the reference's own). With
        no EOS at all, every token is valid.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"{_NAME}: batch_size must be a positive int, got {batch_size!r}")
    vocab_size = check_causal(reference)
    rows = as_rows(samples, "samples", _NAME)
    if not rows:
        raise UserError(f"{_NAME}: needs at least one sample, got 0")

    # 1. reference ids: retokenize, prepend BOS, truncate
    if retokenize is None:
        retokenize = tokenizer is not None and reference_tokenizer is not None
    if retokenize:
        if tokenizer is None or reference_tokenizer is None:
            raise UserError(f"{_NAME}: retokenize=True needs both tokenizer and reference_tokenizer")
        rows, _ = retokenize_rows(rows, tokenizer, reference_tokenizer, prefix_lengths=None,
                                  what="samples", metric=_NAME)
    else:
        check_ids(rows, vocab_size, "samples", _NAME)
    bos = special_id(reference, reference_tokenizer, "bos", vocab_size) if add_bos else None
    prepared = prepare_rows(rows, bos=bos, context=effective_context(reference, max_length, _NAME),
                            prefix_lengths=None, what="samples", metric=_NAME)
    if eos_id is None:
        eos_id = special_id(reference, reference_tokenizer, "eos", vocab_size)
    pad_id = pad_token(reference, reference_tokenizer, vocab_size)

    # 2. summed NLL and valid-token count of every sample
    device = next(reference.parameters()).device
    was_training = reference.training
    reference.eval()
    sums, counts = [], []
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(rows), batch_size), desc=_NAME, disable=not progress,
                              leave=False):
                indices = list(range(start, min(start + batch_size, len(rows))))
                batch = make_batch(prepared, indices, pad_id=pad_id, device=device, eos_id=eos_id)
                sums += token_nll(reference, batch).double().sum(dim=1).tolist()
                counts += batch.scored.sum(dim=1).tolist()
    finally:
        reference.train(was_training)

    # 3. token-weighted NLL, and its standard error as a ratio estimator Σ s_i / Σ c_i
    if any(c == 0 for c in counts):
        empty = sum(1 for c in counts if c == 0)
        raise UserError(f"{_NAME}: {empty} of {len(rows)} samples have no valid token (only "
                        f"EOS after the first)")
    s, c = torch.tensor(sums, dtype=torch.float64), torch.tensor(counts, dtype=torch.float64)
    nll = (s.sum() / c.sum()).item()
    n = len(sums)
    nll_stderr = float("nan")
    if n > 1:
        residual = s - nll * c
        nll_stderr = math.sqrt((residual.pow(2).sum() / (n * (n - 1))).item()) / c.mean().item()
    value = math.exp(nll)
    return GenPPLResult(value, value * nll_stderr, nll, nll_stderr, (s / c).tolist(), int(c.sum().item()))


def gen_ppl_metric(samples: Tensor, *, data_config: Mapping | None = None,
                   reference: str = "gpt2-large", batch_size: int = 8,
                   max_length: int | None = None, device: str | None = None,
                   progress: bool = False, **_) -> dict:
    """Registered metric `gen_ppl`: generative perplexity of `samples` [N, L] under `reference`.

    Options (`eval.metric_options.gen_ppl`): reference (hub id, HF directory or `ar`
    checkpoint; default gpt2-large; or a list / label mapping of them: gen-PPL under each,
    columns `gen_ppl_<label>`, references.py), batch_size, max_length (cap on the reference context),
    device (default cuda when available).
    `data_config` gives the samples' tokenizer (and EOS for an `ar` reference).
    """
    samples_in = torch.as_tensor(samples)
    if samples_in.dim() != 2:
        raise UserError(f"{_NAME}: samples must be token ids [N, L], got shape {tuple(samples_in.shape)}")
    bundle = data_bundle(data_config, samples_in.shape[1], _NAME)
    samples = check_samples(samples_in, bundle.vocab_size, _NAME)

    def measure(spec: str) -> dict:
        model, tokenizer, reference_tokenizer = reference_for(spec, bundle, device, _NAME)
        eos_id = bundle.eos_id if reference_tokenizer is None else None
        result = generative_perplexity(model, samples, tokenizer=tokenizer,
                                       reference_tokenizer=reference_tokenizer, batch_size=batch_size,
                                       eos_id=eos_id, max_length=max_length, progress=progress)
        return {"value": result.value, "stderr": result.stderr, "nll": result.nll,
                "nll_stderr": result.nll_stderr, "num_tokens": result.num_tokens,
                "reference": spec, "per_sample": result.per_sample_nll}

    return under_each_reference(reference, _NAME, "gen_ppl", measure)
