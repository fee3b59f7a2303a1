"""Gradient moment of a reference LM (D-MMD paper §5, eq. 13–14): how far samples are from data.

    GM = ‖ E_g[∇_θ L(x)] − E_q[∇_θ L(x)] ‖²                                   (13)

θ = every trainable parameter of a frozen-in-place reference causal LM (GPT-2 in the paper),
g = the model's samples, q = data. GM = 0 when g = q; the data term centres the metric for a
reference that is not at a stationary point of q.

Estimator (eq. 14). Samples and data are cut into minibatches g_1..g_M and d_1..d_M of
`batch_size` rows, and D_i = ∇L(g_i) − ∇L(d_i) is computed in one backward of L(g_i) − L(d_i).
Disjoint pairs give independent unbiased estimates ⟨D_2j, D_2j+1⟩ of GM; the reported value is
their mean ± standard error (std / sqrt(n)). Single estimates can be negative. `all_pairs=True`
also reports the all-pairs U-statistic (‖Σ D_i‖² − Σ ‖D_i‖²) / (M (M − 1)), also unbiased, at the
cost of one more gradient-sized vector.

Choices (upstream GM code and `research/algorithms.md` §6):
- L = mean token NLL of the minibatch: logits[:, :-1] against ids[:, 1:], averaged over every
  scored token of every row (token-weighted; pads never scored). A per-sequence sum would scale
  GM by about L².
- The reference runs in eval mode (no dropout; its previous mode is restored afterwards).
  Gradients come from `torch.autograd.grad` and are flattened with one `torch.cat` per D; dot
  products are accumulated in float64. Two flat gradient vectors are kept (D_a while D_b is
  computed), three with `all_pairs` (the running sum); `.grad` is never touched.
- Retokenization: when `tokenizer` (the samples' own) and `reference_tokenizer` differ, rows are
  decoded to text and re-encoded with the reference tokenizer, special tokens kept; empty or
  whitespace-only rows are refused. Rows are padded to the longest of their minibatch.
- BOS: the reference's BOS (GPT-2: <|endoftext|>; an `ar` checkpoint: its start token) is
  prepended to every row that does not already start with it, so the first real token is scored.
- Rows longer than the reference context (`n_positions` / `max_position_embeddings`, or
  `max_length`) are truncated, with a warning naming both lengths.
- Conditional GM (paper §5, last paragraph): with `prefixes`, row i of samples and of data share
  prompt i, the loss covers continuation tokens only, and the two minibatches of a pair never
  share a prompt. Rows within a minibatch and across minibatches should otherwise be
  independent draws: pass data in random order (consecutive chunks of one document in both
  halves of a pair would bias GM upwards). The registered metric draws its data rows at random.

Generative perplexity lives in gen_ppl.py; the reference loader in reference.py.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mdlm_dmmd.errors import UserError
from mdlm_dmmd.metrics.reference import (
    PreparedRows,
    as_rows,
    check_causal,
    check_ids,
    effective_context,
    load_reference,
    make_batch,
    pad_token,
    prepare_rows,
    retokenize_rows,
    same_tokenizer,
    special_id,
    token_nll,
)
from mdlm_dmmd.metrics.references import under_each_reference
from mdlm_dmmd.metrics.run_data import data_bundle

logger = logging.getLogger(__name__)

_NAME = "gradient_moment"
_DOT_CHUNK = 1 << 24  # elements per float64 chunk of a dot product (128 MiB in float64)


@dataclass
class GMResult:
    mean: float  # mean of ⟨D_2j, D_2j+1⟩ over pairs: the GM estimate
    stderr: float  # std / sqrt(num_pairs); nan for one pair
    per_pair: list[float]
    num_pairs: int
    batch_size: int
    u_statistic: float | None = None  # all-pairs estimate, with `all_pairs=True`


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{_NAME}: {key} must be a positive int, got {value!r}")
    return value


# ----------------------------------------------------------------------------- minibatch plan


def _prompt_lengths(prefixes: Any, samples: list[list[int]], data: list[list[int]]
                    ) -> tuple[list[list[int]], list[list[int]], list[int] | None]:
    """(samples, data, prompt length per row): 2-D prompt ids are prepended to both sides."""
    if prefixes is None:
        return samples, data, None
    if len(samples) != len(data):
        raise UserError(f"{_NAME}: with prefixes, row i of samples and data share prompt i, so both "
                        f"need the same number of rows; got {len(samples)} and {len(data)}")
    if isinstance(prefixes, Tensor) and prefixes.dim() == 2:
        if prefixes.shape[0] != len(samples) or prefixes.is_floating_point():
            raise UserError(f"{_NAME}: prefixes must be prompt ids [N={len(samples)}, P], got "
                            f"{prefixes.dtype} of shape {tuple(prefixes.shape)}")
        prompts = prefixes.cpu().long().tolist()
        return ([p + row for p, row in zip(prompts, samples)], [p + row for p, row in zip(prompts, data)],
                [len(p) for p in prompts])
    if isinstance(prefixes, int):
        lengths = [prefixes] * len(samples)
    else:
        lengths = [int(v) for v in torch.as_tensor(prefixes).reshape(-1).tolist()]
    if len(lengths) != len(samples) or any(v < 0 for v in lengths):
        raise UserError(f"{_NAME}: prefixes must be an int, {len(samples)} non-negative prompt "
                        f"lengths, or prompt ids [N, P]; got {prefixes!r}")
    for i, (s, d, p) in enumerate(zip(samples, data, lengths)):
        if s[:p] != d[:p]:
            raise UserError(f"{_NAME}: row {i} of samples and data do not share its {p}-token "
                            f"prompt; conditional GM compares continuations of the same prompts")
    return samples, data, lengths


def _pair_minibatches(keys: list[Any], batch_size: int) -> list[tuple[list[int], list[int]]]:
    """Pairs of minibatches (row indices) whose prompts are disjoint.

    Rows are grouped by prompt (in order of first appearance), cut into minibatches, and each
    minibatch is paired with the earliest unpaired one sharing no prompt. Minibatches left
    without a partner are dropped. With all prompts distinct this is (0, 1), (2, 3), ...
    """
    first: dict[Any, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    order = sorted(range(len(keys)), key=lambda i: first[keys[i]])
    batches = [order[i: i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    pairs, waiting = [], []
    for batch in batches:
        prompts = {keys[i] for i in batch}
        partner = next((w for w in waiting if prompts.isdisjoint(keys[i] for i in w)), None)
        if partner is None:
            waiting.append(batch)
        else:
            waiting.remove(partner)
            pairs.append((partner, batch))
    if waiting:
        logger.info("%s: %d minibatch(es) share prompts with every other one and are left out",
                    _NAME, len(waiting))
    return pairs


# ----------------------------------------------------------------------------- gradients


def _flat_grad(loss: Tensor, params: list[nn.Parameter]) -> Tensor:
    """∇ loss w.r.t. params as one flat vector (unused parameters get zeros)."""
    grads = torch.autograd.grad(loss, params, materialize_grads=True)
    return torch.cat([g.reshape(-1) for g in grads])


def _dot(a: Tensor, b: Tensor) -> float:
    """⟨a, b⟩ accumulated in float64, chunk by chunk so no float64 copy of a whole vector exists."""
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for start in range(0, a.numel(), _DOT_CHUNK):
        total += torch.dot(a[start: start + _DOT_CHUNK].double(), b[start: start + _DOT_CHUNK].double())
    return total.item()


def _mean_loss(reference: nn.Module, rows: PreparedRows, indices: list[int], pad_id: int,
               device: torch.device) -> Tensor:
    """Mean token NLL of a minibatch: every scored target of every row counts once."""
    batch = make_batch(rows, indices, pad_id=pad_id, device=device)
    return token_nll(reference, batch).sum() / batch.scored.sum()


# ----------------------------------------------------------------------------- estimator


def gradient_moment(
    reference: nn.Module,
    samples: Any,
    data: Any,
    *,
    tokenizer: Any = None,
    reference_tokenizer: Any = None,
    batch_size: int = 8,
    num_pairs: int | None = None,
    prefixes: Any = None,
    max_length: int | None = None,
    retokenize: bool | None = None,
    add_bos: bool = True,
    all_pairs: bool = False,
    progress: bool = False,
) -> GMResult:
    """Unbiased estimate of eq. (13) for `reference`, from sample and data token rows.

    reference: a causal LM module (HF `*ForCausalLM` or any module ids [B, T] -> logits
        [B, T, V]); its trainable parameters are differentiated, in eval mode.
    samples, data: LongTensor [N, L] or lists of id rows, in the ids of `tokenizer`.
    tokenizer, reference_tokenizer: retokenize when both are given and differ (`retokenize`
        forces it on or off). None for either means "the rows are already reference ids".
    batch_size: rows per minibatch (per side); num_pairs: pairs to use (default: all the rows
        allow, 2 * num_pairs * batch_size rows per side are needed).
    prefixes: conditional GM; an int or per-row prompt lengths (prompts at the start of the rows),
        or prompt ids [N, P] prepended to both samples and data rows.
    max_length: cap on the reference context (rows longer are truncated, with a warning).
    """
    batch_size = _positive_int(batch_size, "batch_size")
    if num_pairs is not None:
        num_pairs = _positive_int(num_pairs, "num_pairs")
    vocab_size = check_causal(reference)
    sample_rows, data_rows = as_rows(samples, "samples", _NAME), as_rows(data, "data", _NAME)
    if min(len(sample_rows), len(data_rows)) < 2 * batch_size:
        raise UserError(f"{_NAME} needs at least 2*batch_size = {2 * batch_size} samples and data "
                        f"sequences, got {len(sample_rows)} samples and {len(data_rows)} data "
                        f"sequences")

    # 1. pairs of minibatches: consecutive rows, or grouped so that a pair's prompts are disjoint
    sample_rows, data_rows, prompt_lengths = _prompt_lengths(prefixes, sample_rows, data_rows)
    if prompt_lengths is None:
        usable = min(len(sample_rows), len(data_rows)) // (2 * batch_size)
        pairs = [(list(range(2 * j * batch_size, (2 * j + 1) * batch_size)),
                  list(range((2 * j + 1) * batch_size, (2 * j + 2) * batch_size))) for j in range(usable)]
    else:
        keys = [tuple(row[:p]) for row, p in zip(sample_rows, prompt_lengths)]
        pairs = _pair_minibatches(keys, batch_size)
        if not pairs:
            raise UserError(f"{_NAME}: no two minibatches of {batch_size} rows have disjoint "
                            f"prompts; use more distinct prompts or a smaller batch_size")
    if num_pairs is not None:
        if num_pairs > len(pairs):
            raise UserError(f"{_NAME}: num_pairs={num_pairs} needs {2 * num_pairs * batch_size} "
                            f"samples and data sequences (with disjoint prompts), but only "
                            f"{len(pairs)} pairs can be formed")
        pairs = pairs[:num_pairs]

    # 2. reference ids: retokenize, prepend BOS, truncate
    if retokenize is None:
        retokenize = tokenizer is not None and reference_tokenizer is not None and not same_tokenizer(
            tokenizer, reference_tokenizer)
    if retokenize and (tokenizer is None or reference_tokenizer is None):
        raise UserError(f"{_NAME}: retokenize=True needs both tokenizer and reference_tokenizer")
    bos = special_id(reference, reference_tokenizer, "bos", vocab_size) if add_bos else None
    context = effective_context(reference, max_length, _NAME)
    prepared = []
    for rows, what in ((sample_rows, "samples"), (data_rows, "data")):
        lengths = prompt_lengths
        if retokenize:
            rows, lengths = retokenize_rows(rows, tokenizer, reference_tokenizer,
                                            prefix_lengths=prompt_lengths, what=what, metric=_NAME)
        else:
            check_ids(rows, vocab_size, what, _NAME)
        prepared.append(prepare_rows(rows, bos=bos, context=context, prefix_lengths=lengths,
                                     what=what, metric=_NAME))
    sample_prep, data_prep = prepared
    pad_id = pad_token(reference, reference_tokenizer, vocab_size)

    # 3. ⟨D_a, D_b⟩ per pair, D = ∇(L(g) − L(d)) in one backward
    params = [p for p in reference.parameters() if p.requires_grad]
    if not params:
        raise UserError(f"{_NAME}: the reference has no trainable parameters "
                        f"(call reference.requires_grad_(True))")
    device = params[0].device
    was_training = reference.training
    reference.eval()

    def difference(indices: list[int]) -> Tensor:
        loss = (_mean_loss(reference, sample_prep, indices, pad_id, device)
                - _mean_loss(reference, data_prep, indices, pad_id, device))
        return _flat_grad(loss, params)

    per_pair: list[float] = []
    total, sum_sq = None, 0.0
    try:
        for a, b in tqdm(pairs, desc=_NAME, disable=not progress, leave=False):
            d_a = difference(a)
            d_b = difference(b)
            per_pair.append(_dot(d_a, d_b))  # eq. (14)
            if all_pairs:
                for d in (d_a, d_b):
                    total = d.clone() if total is None else total.add_(d)
                    sum_sq += _dot(d, d)
            del d_a, d_b
    finally:
        reference.train(was_training)

    n = len(per_pair)
    mean = math.fsum(per_pair) / n
    stderr = float("nan")
    if n > 1:
        variance = math.fsum((v - mean) ** 2 for v in per_pair) / (n - 1)
        stderr = math.sqrt(variance / n)
    u_statistic = None
    if all_pairs:
        m = 2 * n
        u_statistic = (_dot(total, total) - sum_sq) / (m * (m - 1))
    return GMResult(mean, stderr, per_pair, n, batch_size, u_statistic)


# ----------------------------------------------------------------------------- registered metric

def check_samples(samples: Any, vocab_size: int, metric: str) -> Tensor:
    """Samples as a CPU LongTensor [N, L] of ids below the data vocabulary, or a UserError."""
    samples = torch.as_tensor(samples)
    if (samples.dim() != 2 or samples.shape[1] == 0 or samples.is_floating_point()
            or samples.dtype == torch.bool):
        raise UserError(f"{metric}: samples must be token ids [N, L], got {samples.dtype} of shape "
                        f"{tuple(samples.shape)}")
    samples = samples.long().cpu()
    low, high = samples.min().item(), samples.max().item()
    if low < 0 or high >= vocab_size:
        raise UserError(f"{metric}: samples hold ids in {low}..{high}, outside the data's "
                        f"{vocab_size} tokens (a mask id left in the samples?)")
    return samples


def reference_for(spec: Any, bundle: Any, device: Any, metric: str) -> tuple[nn.Module, Any, Any]:
    """(reference, tokenizer of the samples or None, reference tokenizer or None) for a bundle."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, reference_tokenizer = load_reference(spec, device=device)
    if reference_tokenizer is None:  # an `ar` checkpoint: it must speak the data's ids
        vocab = getattr(model, "vocab_size", None)
        if vocab != bundle.vocab_size:
            raise UserError(f"{metric}: reference '{spec}' has {vocab} tokens but the data has "
                            f"{bundle.vocab_size}; use an `ar` checkpoint trained on this data")
        return model, None, None
    if bundle.tokenizer is None:
        raise UserError(f"{metric}: reference '{spec}' scores text, but the {bundle.modality} "
                        f"data has no tokenizer; pass reference=<an `ar` checkpoint trained on "
                        f"this data>")
    return model, bundle.tokenizer, reference_tokenizer


def gradient_moment_metric(samples: Tensor, *, data_config: Mapping | None = None,
                           reference: str = "gpt2", num_pairs: int | None = None,
                           batch_size: int = 8, split: str = "train", seed: int = 0,
                           max_length: int | None = None, device: str | None = None,
                           prompt_rows: Tensor | None = None, prompt_length: int = 0,
                           progress: bool = False, **_) -> dict:
    """Registered metric `gradient_moment`: GM of `samples` [N, L] against N random data rows.

    Options (`eval.metric_options.gradient_moment`): reference (hub id, HF directory or `ar`
    checkpoint; default gpt2; or a list / label mapping of them: GM under each, columns
    `gm_<label>`, references.py), num_pairs, batch_size, split (train | valid), seed (which data
    rows), max_length (cap on the reference context), device (default cuda when available).
    Conditional GM (the host passes these with `sampling.prompt_length`): sample i continues the
    first `prompt_length` tokens of `prompt_rows[i]`, which is its data row; the loss counts the
    continuation tokens only.
    """
    if split not in ("train", "valid"):
        raise UserError(f"{_NAME}: split must be train or valid, got {split!r}")
    samples_in = torch.as_tensor(samples)
    if samples_in.dim() != 2:
        raise UserError(f"{_NAME}: samples must be token ids [N, L], got shape {tuple(samples_in.shape)}")
    bundle = data_bundle(data_config, samples_in.shape[1], _NAME)
    samples = check_samples(samples_in, bundle.vocab_size, _NAME)
    if prompt_rows is not None:
        data = torch.as_tensor(prompt_rows)
        if data.shape != samples.shape:
            raise UserError(f"{_NAME}: prompt_rows must match the samples' shape {tuple(samples.shape)}, "
                            f"got {tuple(data.shape)}")
        split = "prompts"
    else:
        dataset = getattr(bundle, split)
        count = min(len(dataset), len(samples))
        index = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(int(seed)))[:count]
        data = torch.stack([dataset[int(i)]["input_ids"] for i in index])  # [n, L]

    def measure(spec: str) -> dict:
        model, tokenizer, reference_tokenizer = reference_for(spec, bundle, device, _NAME)
        result = gradient_moment(model, samples, data, tokenizer=tokenizer,
                                 reference_tokenizer=reference_tokenizer, batch_size=batch_size,
                                 num_pairs=num_pairs, max_length=max_length, progress=progress,
                                 prefixes=int(prompt_length) if prompt_rows is not None else None)
        return {"value": result.mean, "stderr": result.stderr, "num_pairs": result.num_pairs,
                "batch_size": result.batch_size, "reference": spec, "split": split}

    return under_each_reference(reference, _NAME, "gm", measure)
