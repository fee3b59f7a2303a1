"""Generative perplexity (Duo convention) and the reference loader.

Expected perplexities are computed here by hand from the reference's logits, with the first-EOS
mask written out position by position.
"""

import copy
import math

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

from mdlm_dmmd.diffusion.sampling import shift_right
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.metrics import reference as ref
from mdlm_dmmd.metrics.gen_ppl import gen_ppl_metric, generative_perplexity

from conftest import write_ar_checkpoint


def tiny_gpt2(vocab=10, seed=0, bos=None, eos=None, n_positions=64):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab,
                                          n_positions=n_positions, bos_token_id=bos, eos_token_id=eos))


def hand_ppl(model, rows, masks):
    """exp(Σ nll·mask / Σ mask); rows as fed (BOS included), masks over targets rows[1:]."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for row, mask in zip(rows, masks):
            ids = torch.tensor([row])
            log_p = model(ids).logits[0, :-1].double().log_softmax(-1)  # [T-1, V]
            for t, keep in enumerate(mask):
                if keep:
                    total -= log_p[t, row[t + 1]].item()
                    count += 1
    return math.exp(total / count), count


def test_first_eos_mask_without_bos():
    model = tiny_gpt2(eos=9)
    samples = torch.tensor([[9, 1, 2, 9, 9],   # leading EOS is the first EOS (context, not a target)
                            [1, 2, 9, 3, 9]])  # its first EOS is a target and counts; the second not
    expected, count = hand_ppl(model, samples.tolist(), [[1, 1, 0, 0], [1, 1, 1, 0]])
    result = generative_perplexity(model, samples)
    assert result.num_tokens == count == 5
    assert result.value == pytest.approx(expected, rel=1e-6)
    assert result.nll == pytest.approx(math.log(expected), rel=1e-6)
    assert len(result.per_sample_nll) == 2


def test_first_eos_mask_with_a_prepended_bos():
    model = tiny_gpt2(bos=8, eos=9)
    samples = torch.tensor([[9, 1, 2, 9, 9], [1, 2, 9, 3, 9]])
    fed = [[8, 9, 1, 2, 9, 9], [8, 1, 2, 9, 3, 9]]  # BOS 8 prepended: the first token is scored
    expected, count = hand_ppl(model, fed, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    result = generative_perplexity(model, samples)
    assert result.num_tokens == count == 7
    assert result.value == pytest.approx(expected, rel=1e-6)
    # BOS = EOS (GPT-2): rows already starting with it are fed as they are, Duo's exact input
    gpt2_like = tiny_gpt2(bos=9, eos=9)
    expected, _ = hand_ppl(gpt2_like, [[9, 1, 2, 9, 9], [9, 1, 2, 9, 3, 9]], [[1, 1, 0, 0], [1, 1, 0, 1, 0]])
    assert generative_perplexity(gpt2_like, samples).value == pytest.approx(expected, rel=1e-6)


def test_stderr_and_batching():
    model = tiny_gpt2(seed=1)
    samples = torch.randint(0, 9, (6, 7), generator=torch.Generator().manual_seed(0))
    one = generative_perplexity(model, samples, batch_size=1)
    many = generative_perplexity(model, samples, batch_size=4)  # the last batch is partial: kept
    assert many.value == pytest.approx(one.value, rel=1e-6) and many.num_tokens == 6 * 6
    per_sample = torch.tensor(one.per_sample_nll, dtype=torch.float64)
    # equal token counts: the ratio estimator's stderr is the plain stderr of per-sample NLLs
    assert one.nll == pytest.approx(per_sample.mean().item(), rel=1e-9)
    assert one.nll_stderr == pytest.approx(per_sample.std().item() / math.sqrt(6), rel=1e-9)
    assert one.stderr == pytest.approx(one.value * one.nll_stderr, rel=1e-12)
    assert math.isnan(generative_perplexity(model, samples[:1]).nll_stderr)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from mdlm_dmmd.data.tokenizers import gpt2_tokenizer, train_bpe

    sentences = ["the cat sat on the mat", "a big red dog ran on the mat", "the dog sat"] * 4
    return gpt2_tokenizer(), train_bpe(sentences, 300, tmp_path_factory.mktemp("bpe"))


def test_retokenized_equals_pre_retokenized(tokenizers):
    gpt2, bpe = tokenizers
    eot = bpe.convert_tokens_to_ids("<|endoftext|>")
    model = tiny_gpt2(vocab=len(bpe), bos=eot, eos=eot)
    texts = ["<|endoftext|> the cat sat on the mat<|endoftext|> a dog", " the tree house ran",
             " a red water<|endoftext|><|endoftext|>"]
    samples = [gpt2.encode(t) for t in texts]
    ours = generative_perplexity(model, samples, tokenizer=gpt2, reference_tokenizer=bpe, batch_size=2)
    pre = [bpe.encode(gpt2.decode(row), add_special_tokens=False) for row in samples]
    assert pre[0][0] == eot and pre[0].count(eot) == 2
    expected = generative_perplexity(model, pre, batch_size=2)
    assert ours.value == pytest.approx(expected.value, rel=1e-9)
    assert ours.num_tokens == expected.num_tokens
    with pytest.raises(UserError, match="1 of 2 samples rows decode to empty or whitespace-only"):
        generative_perplexity(model, [samples[0], gpt2.encode("  \n ")], tokenizer=gpt2,
                              reference_tokenizer=bpe)


def test_bad_inputs():
    model = tiny_gpt2(n_positions=16)
    long = torch.randint(0, 9, (2, 20), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="2 samples rows of up to 20 reference tokens are longer than "
                                         "the reference context of 16; truncated to 16"):
        truncated = generative_perplexity(model, long)
    assert truncated.value == pytest.approx(generative_perplexity(model, long[:, :16]).value, rel=1e-9)
    with pytest.raises(UserError, match="outside the reference's 10 ids"):
        generative_perplexity(model, torch.tensor([[1, 2, 10]]))
    with pytest.raises(UserError, match="no token to score"):
        generative_perplexity(model, [[3]])
    bert = BertForMaskedLM(BertConfig(vocab_size=10, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=64))
    with pytest.raises(UserError, match="BertForMaskedLM is not a causal LM"):
        generative_perplexity(bert, long)


# ----------------------------------------------------------------------------- reference loading


def test_hub_reference_offline_is_a_user_error():
    with pytest.raises(UserError, match=r"^reference 'no-such-org/no-such-model' needs the Hugging Face "
                                        r"hub or a local copy; pass a local directory or a checkpoint "
                                        r"of this package's `ar` algo$"):
        ref.load_reference("no-such-org/no-such-model")
    with pytest.raises(UserError, match="does not exist"):
        ref.load_reference("./missing/model.ckpt")


def test_local_hf_directory_round_trip_and_cache(tmp_path, tokenizers):
    _, bpe = tokenizers
    model = tiny_gpt2(vocab=len(bpe), seed=2)
    model.save_pretrained(tmp_path / "tiny")
    bpe.save_pretrained(tmp_path / "tiny")
    loaded, tokenizer = ref.load_reference(str(tmp_path / "tiny"))
    assert not loaded.training and all(p.requires_grad for p in loaded.parameters())
    assert tokenizer.get_vocab() == bpe.get_vocab()
    assert ref.load_reference(str(tmp_path / "tiny"))[0] is loaded
    ids = torch.randint(0, len(bpe), (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits)


def test_a_saved_masked_lm_is_refused_by_the_causality_probe(tmp_path):
    bert = BertForMaskedLM(BertConfig(vocab_size=10, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=64))
    bert.save_pretrained(tmp_path / "bert")
    # AutoModelForCausalLM opens it as a BertLMHeadModel without is_decoder: bidirectional
    with pytest.raises(UserError, match="is not causal"):
        ref.load_reference(str(tmp_path / "bert"))


def test_registered_metric_with_ar_reference_equals_the_ar_loss(tmp_path):
    path = write_ar_checkpoint(tmp_path / "ar", vocab=17, length=64)
    samples = torch.randint(0, 17, (5, 64), generator=torch.Generator().manual_seed(0))
    out = gen_ppl_metric(samples, data_config={"name": "digits"}, reference=str(path), batch_size=2,
                         device="cpu")
    model, _ = ref.load_reference(str(path))
    with torch.no_grad():  # the `ar` algo's loss: every one of the L tokens, start token as context
        log_p = model.denoiser.next_token_log_probs(shift_right(samples, 17))
        nll = -log_p.gather(-1, samples[..., None]).double().mean().item()
    assert out["value"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert out["num_tokens"] == 5 * 64 and len(out["per_sample"]) == 5
    assert set(out) >= {"value", "stderr", "nll", "nll_stderr"}


def test_registered_metric_retokenizes_text_data(tmp_path, tokenizers):
    _, bpe = tokenizers
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(f"the cat sat on the mat {i}\n\na big red dog ran far\n" * 3)
    data_config = {"name": "text_files", "paths": [str(tmp_path / "doc*.txt")], "valid_fraction": 0.34}
    model = tiny_gpt2(vocab=len(bpe), seed=3)
    model.save_pretrained(tmp_path / "ref")
    bpe.save_pretrained(tmp_path / "ref")
    from mdlm_dmmd.data import build_data

    bundle = build_data(data_config, 16)
    samples = torch.stack([bundle.train[i]["input_ids"] for i in range(4)])
    out = gen_ppl_metric(samples, data_config=data_config, reference=str(tmp_path / "ref"),
                         device="cpu")
    loaded, tokenizer = ref.load_reference(str(tmp_path / "ref"))
    expected = generative_perplexity(loaded, samples, tokenizer=bundle.tokenizer,
                                     reference_tokenizer=tokenizer)
    assert out["value"] == pytest.approx(expected.value, rel=1e-9)
    with pytest.raises(UserError, match="scores text, but the image data has no tokenizer"):
        gen_ppl_metric(torch.zeros(2, 64, dtype=torch.long), data_config={"name": "digits"},
                       reference=str(tmp_path / "ref"), device="cpu")


def test_gen_ppl_stderr_is_the_ratio_estimators_with_unequal_token_counts():
    """No BOS/EOS: every token after the first is a target. Rows of different lengths, so the
    token-weighted NLL and its delta-method stderr differ from plain per-sample statistics."""
    model = tiny_gpt2(seed=4).eval()
    rows = [[1, 2, 3], [4, 5, 6, 7, 8], [2, 2, 2, 2, 2, 2, 2, 2], [9, 0, 1, 3]]
    sums, counts = [], []
    with torch.no_grad():
        for row in rows:
            log_p = model(torch.tensor([row])).logits[0, :-1].double().log_softmax(-1)
            sums.append(-sum(log_p[t, row[t + 1]].item() for t in range(len(row) - 1)))
            counts.append(len(row) - 1)
    s, c = np.array(sums), np.array(counts, dtype=float)
    n, r = len(rows), s.sum() / c.sum()
    se = math.sqrt(((s - r * c) ** 2).sum() / (n * (n - 1))) / c.mean()
    out = generative_perplexity(model, rows, batch_size=3)
    assert out.num_tokens == int(c.sum())
    assert out.nll == pytest.approx(r, rel=1e-6)
    assert out.nll_stderr == pytest.approx(se, rel=1e-6)
    assert out.per_sample_nll == pytest.approx(list(s / c), rel=1e-6)


def test_gen_ppl_with_an_ar_reference_masks_the_datas_eos_after_the_first():
    """An `ar` reference has no tokenizer: the EOS of the Duo mask is the data's (GPT-2's 50256
    for shakespeare). Every non-EOS token counts, plus the first EOS of each row."""
    import tempfile
    from pathlib import Path

    vocab, eos, length = 50257, 50256, 12
    data_config = {"name": "shakespeare", "max_documents": 4, "valid_fraction": 0.25}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_ar_checkpoint(Path(tmp) / "ar", vocab=vocab, length=length)
        samples = torch.randint(0, 1000, (3, length), generator=torch.Generator().manual_seed(0))
        samples[0, [3, 7, 8]] = eos
        samples[1, [0, 10]] = eos
        out = gen_ppl_metric(samples, data_config=data_config, reference=str(path), batch_size=2, device="cpu")
        model, _ = ref.load_reference(str(path))
        with torch.no_grad():
            log_p = model.denoiser.next_token_log_probs(shift_right(samples, vocab))
        total, count = 0.0, 0
        for i, row in enumerate(samples.tolist()):
            seen_eos = False
            for t, token in enumerate(row):
                if token == eos:
                    if seen_eos:
                        continue
                    seen_eos = True
                total -= log_p[i, t, token].item()
                count += 1
        ref.clear_reference_cache()
    assert count == 3 * length - 3
    assert out["num_tokens"] == count
    assert out["value"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_retokenisation_adds_no_special_tokens_of_the_reference_tokenizer(tmp_path):
    """A reference tokenizer whose post-processor wraps text in <|endoftext|> (Duo's GPT-2 setup,
    host-pattern §7): the samples are re-encoded without them, as `bpe.encode(text,
    add_special_tokens=False)`, and BOS is prepended by the metric alone."""
    from tokenizers.processors import TemplateProcessing

    from mdlm_dmmd.data.tokenizers import gpt2_tokenizer, train_bpe

    gpt2 = gpt2_tokenizer()
    bpe = train_bpe(["the cat sat on the mat", "a big red dog ran on the mat", "the dog sat"] * 4, 300, tmp_path)
    eot = bpe.convert_tokens_to_ids("<|endoftext|>")
    wrapped = copy.deepcopy(bpe)
    wrapped._tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A <|endoftext|>", special_tokens=[("<|endoftext|>", eot)])
    assert wrapped("the cat")["input_ids"][0] == eot and wrapped("the cat")["input_ids"][-1] == eot
    model = tiny_gpt2(vocab=len(bpe), seed=5, bos=eot, eos=eot).eval()
    samples = [gpt2.encode(t) for t in ["<|endoftext|> the cat sat on the mat", " a red dog ran", " the mat sat"]]
    ours = generative_perplexity(model, samples, tokenizer=gpt2, reference_tokenizer=wrapped)
    pre = [bpe.encode(gpt2.decode(row), add_special_tokens=False) for row in samples]
    expected = generative_perplexity(model, pre)
    assert ours.num_tokens == expected.num_tokens
    assert ours.value == pytest.approx(expected.value, rel=1e-9)
