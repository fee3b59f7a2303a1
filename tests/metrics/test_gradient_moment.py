"""Gradient moment (D-MMD eq. 13–14): estimator vs a naive implementation, unbiasedness, an exact
expectation enumerated on a 2-parameter toy reference, retokenization, conditional GM, the `ar`
reference adapter, the registered metric and bad inputs.

Expected values come from independent code written here (per-minibatch `loss.backward()` into
`.grad`, explicit flattening of every parameter, float64 dot products) or from enumeration.
"""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

from mdlm_dmmd.diffusion.sampling import shift_right
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.metrics import reference as ref
from mdlm_dmmd.metrics.gradient_moment import (
    _pair_minibatches,
    gradient_moment,
    gradient_moment_metric,
)

from conftest import write_ar_checkpoint


def tiny_gpt2(vocab=16, seed=0, bos=None, n_positions=64):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=n_positions,
                            bos_token_id=bos, eos_token_id=bos)
        return GPT2LMHeadModel(config)


def markov_rows(n, length, generator, vocab=8):
    """A peaked Markov chain over `vocab` tokens (fixed transition matrix), x_0 uniform."""
    logits = 3.0 * torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(123))
    transition = logits.softmax(-1)
    x = torch.empty(n, length, dtype=torch.long)
    x[:, 0] = torch.randint(0, vocab, (n,), generator=generator)
    for t in range(1, length):
        x[:, t] = torch.multinomial(transition[x[:, t - 1]], 1, generator=generator)[:, 0]
    return x


def naive_per_pair(model, samples, data, batch_size, *, bos=None, prefix=0):
    """Independent GM: `.backward()` per minibatch, flatten every parameter, float64 dots."""
    model.eval()
    params = list(model.parameters())

    def grad(rows):
        model.zero_grad(set_to_none=True)
        ids = rows if bos is None else torch.cat([torch.full_like(rows[:, :1], bos), rows], dim=1)
        logits = model(ids).logits[:, :-1]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), ids[:, 1:].reshape(-1),
                              reduction="none").reshape(ids.shape[0], -1)
        start = max(1, prefix + (bos is not None))  # first scored position of ids
        loss = nll[:, start - 1:].mean()
        loss.backward()
        flat = [torch.zeros(p.numel(), dtype=torch.float64) if p.grad is None else p.grad.double().reshape(-1)
                for p in params]
        return torch.cat(flat)

    m = min(len(samples), len(data)) // batch_size // 2 * 2
    diffs = []
    for i in range(m):
        rows = slice(i * batch_size, (i + 1) * batch_size)
        diffs.append(grad(samples[rows]) - grad(data[rows]))
    return [torch.dot(diffs[2 * j], diffs[2 * j + 1]).item() for j in range(m // 2)], diffs


# ----------------------------------------------------------------------------- estimator


@pytest.mark.parametrize("bos", [None, 15])
def test_matches_naive_implementation_float64(bos):
    model = tiny_gpt2(bos=bos).double()
    g = torch.Generator().manual_seed(0)
    samples = torch.randint(0, 15, (24, 10), generator=g)
    data = markov_rows(24, 10, g)
    result = gradient_moment(model, samples, data, batch_size=3)
    expected, _ = naive_per_pair(model, samples, data, 3, bos=bos)
    assert result.num_pairs == 4 and result.batch_size == 3
    assert result.per_pair == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert result.mean == pytest.approx(sum(expected) / 4, rel=1e-6)
    spread = torch.tensor(expected, dtype=torch.float64)
    assert result.stderr == pytest.approx(spread.std().item() / 2, rel=1e-6)


def test_matches_naive_implementation_float32():
    model = tiny_gpt2(seed=1)
    g = torch.Generator().manual_seed(1)
    samples, data = torch.randint(0, 8, (16, 12), generator=g), markov_rows(16, 12, g)
    result = gradient_moment(model, samples, data, batch_size=4)
    expected, diffs = naive_per_pair(model, samples, data, 4)
    for j, (ours, theirs) in enumerate(zip(result.per_pair, expected)):
        scale = diffs[2 * j].norm().item() * diffs[2 * j + 1].norm().item()
        assert abs(ours - theirs) <= 1e-5 * scale
    assert result.mean == pytest.approx(sum(expected) / len(expected), rel=1e-5)


def test_all_pairs_u_statistic_matches_its_formula():
    model = tiny_gpt2(seed=2).double()
    g = torch.Generator().manual_seed(2)
    samples, data = torch.randint(0, 8, (16, 8), generator=g), markov_rows(16, 8, g)
    result = gradient_moment(model, samples, data, batch_size=2, all_pairs=True)
    _, diffs = naive_per_pair(model, samples, data, 2)
    total = torch.stack(diffs).sum(0)
    m = len(diffs)
    u = (total @ total - sum(d @ d for d in diffs)).item() / (m * (m - 1))
    assert result.u_statistic == pytest.approx(u, rel=1e-9)
    assert gradient_moment(model, samples, data, batch_size=2).u_statistic is None


def test_num_pairs_uses_the_first_pairs_and_leaves_train_mode_alone():
    model = tiny_gpt2(seed=3).double().train()
    g = torch.Generator().manual_seed(3)
    samples, data = torch.randint(0, 8, (20, 8), generator=g), markov_rows(20, 8, g)
    full = gradient_moment(model, samples, data, batch_size=2)
    assert full.num_pairs == 5  # 20 rows -> 10 minibatches per side
    two = gradient_moment(model, samples, data, batch_size=2, num_pairs=2)
    assert two.per_pair == pytest.approx(full.per_pair[:2], rel=1e-12)
    assert model.training  # eval mode for the metric only; no gradient left behind
    assert all(p.grad is None for p in model.parameters())


def test_data_vs_data_is_zero_within_stderr_and_garbage_is_large():
    model = tiny_gpt2(seed=4)
    samples = markov_rows(480, 16, torch.Generator().manual_seed(10))
    data = markov_rows(480, 16, torch.Generator().manual_seed(11))
    same = gradient_moment(model, samples, data, batch_size=4)
    assert same.num_pairs == 60
    assert abs(same.mean) < 3 * same.stderr
    garbage = torch.randint(0, 8, (480, 16), generator=torch.Generator().manual_seed(12))
    far = gradient_moment(model, garbage, data, batch_size=4)
    assert far.mean > 10 * far.stderr
    assert far.mean > 10 * abs(same.mean)


class ToyReference(nn.Module):
    """2 parameters, V = 3: logits_t = θ0 · onehot(x_t) + θ1 · (1, 0, −1). Causal (depends on x_t)."""

    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([0.7, -0.4], dtype=torch.float64))

    def forward(self, ids):
        onehot = F.one_hot(ids, 3).double()  # [B, T, 3]
        u = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
        return self.theta[0] * onehot + self.theta[1] * u  # [B, T, 3]


def test_estimator_mean_matches_exact_enumerated_moment():
    # sample and data distributions: explicit finite sets of length-3 sequences over V = 3
    g_seqs = torch.tensor([[0, 0, 1], [1, 1, 1], [2, 1, 1], [0, 0, 2]])
    g_probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    q_seqs = torch.tensor([[0, 1, 2], [2, 2, 2], [1, 0, 0]])
    q_probs = torch.tensor([0.3, 0.4, 0.3])
    model = ToyReference()

    def mean_grad(seqs, probs):  # E_x ∇ℓ(x), ℓ = mean NLL of the 2 predicted tokens
        total = torch.zeros(2, dtype=torch.float64)
        for seq, p in zip(seqs, probs):
            logits = model(seq[None])[0, :-1]
            loss = F.cross_entropy(logits, seq[1:])
            total += p.item() * torch.autograd.grad(loss, model.theta)[0]
        return total

    exact = (mean_grad(g_seqs, g_probs) - mean_grad(q_seqs, q_probs)).pow(2).sum().item()
    gen = torch.Generator().manual_seed(0)
    samples = g_seqs[torch.multinomial(g_probs, 4000, replacement=True, generator=gen)]
    data = q_seqs[torch.multinomial(q_probs, 4000, replacement=True, generator=gen)]
    result = gradient_moment(model, samples, data, batch_size=4, all_pairs=True)
    assert result.num_pairs == 500
    assert exact > 5 * result.stderr  # the check below has power
    assert abs(result.mean - exact) < 4 * result.stderr
    assert abs(result.u_statistic - exact) < 4 * result.stderr


# ----------------------------------------------------------------------------- retokenization


# One GPT-2 token each; the BPE below never saw the last three, so it spells them in pieces.
WORDS = [" the", " cat", " sat", " on", " mat", " dog", " ran", " a", " red", " big", " house",
         " tree", " water"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from mdlm_dmmd.data.tokenizers import gpt2_tokenizer, train_bpe

    gpt2 = gpt2_tokenizer()
    sentences = ["the cat sat on the mat", "a big red dog ran on the mat", "the dog sat on a cat",
                 "a red cat ran", "the big mat"] * 4
    bpe = train_bpe(sentences, 300, tmp_path_factory.mktemp("bpe"))
    return gpt2, bpe


def word_rows(gpt2, n, length, generator, weights=None):
    ids = torch.tensor([gpt2.encode(w)[0] for w in WORDS])
    assert all(len(gpt2.encode(w)) == 1 for w in WORDS)
    weights = torch.ones(len(WORDS)) if weights is None else weights
    picks = torch.multinomial(weights, n * length, replacement=True, generator=generator)
    return ids[picks].reshape(n, length)


def test_retokenized_gm_equals_gm_on_pre_retokenized_ids(tokenizers):
    gpt2, bpe = tokenizers
    eot = bpe.convert_tokens_to_ids("<|endoftext|>")
    model = tiny_gpt2(vocab=len(bpe), bos=eot).double()
    g = torch.Generator().manual_seed(5)
    samples = word_rows(gpt2, 16, 8, g)
    data = word_rows(gpt2, 16, 8, g, weights=torch.arange(1.0, 14.0))
    data[:, 0] = gpt2.eos_token_id  # wrapped rows start with <|endoftext|>: no second BOS
    ours = gradient_moment(model, samples, data, tokenizer=gpt2, reference_tokenizer=bpe, batch_size=4)

    def by_hand(rows):
        texts = gpt2.batch_decode(rows.tolist())
        return [bpe.encode(t, add_special_tokens=False) for t in texts]

    pre_s, pre_d = by_hand(samples), by_hand(data)
    assert all(row[0] == eot for row in pre_d) and len({len(r) for r in pre_s}) > 1  # ragged rows
    expected = gradient_moment(model, pre_s, pre_d, batch_size=4)
    assert ours.per_pair == pytest.approx(expected.per_pair, rel=1e-12)
    assert ours.num_pairs == 2


def test_same_tokenizer_is_detected(tokenizers):
    from mdlm_dmmd.data.tokenizers import CharTokenizer, gpt2_tokenizer

    gpt2, bpe = tokenizers
    assert ref.same_tokenizer(gpt2, gpt2_tokenizer())
    assert not ref.same_tokenizer(gpt2, bpe)
    assert ref.same_tokenizer(CharTokenizer(), CharTokenizer())


def test_whitespace_samples_are_refused(tokenizers):
    gpt2, bpe = tokenizers
    model = tiny_gpt2(vocab=len(bpe))
    g = torch.Generator().manual_seed(6)
    samples, data = word_rows(gpt2, 8, 6, g), word_rows(gpt2, 8, 6, g)
    samples[:3] = gpt2.encode(" ")[0]  # 220, a lone space
    with pytest.raises(UserError, match=r"3 of 8 samples rows decode to empty or whitespace-only"):
        gradient_moment(model, samples, data, tokenizer=gpt2, reference_tokenizer=bpe, batch_size=4)


# ----------------------------------------------------------------------------- conditional GM


def test_conditional_gm_scores_continuations_only():
    model = tiny_gpt2(seed=7).double()
    g = torch.Generator().manual_seed(7)
    prompts = torch.randint(0, 8, (16, 3), generator=g)
    samples = torch.cat([prompts, torch.randint(0, 8, (16, 5), generator=g)], dim=1)
    data = torch.cat([prompts, markov_rows(16, 5, g)], dim=1)
    ours = gradient_moment(model, samples, data, batch_size=4, prefixes=3)
    expected, _ = naive_per_pair(model, samples, data, 4, prefix=3)
    assert ours.per_pair == pytest.approx(expected, rel=1e-9)
    # prompts given as ids [N, P] are prepended to both sides: the same computation
    prepended = gradient_moment(model, samples[:, 3:], data[:, 3:], batch_size=4, prefixes=prompts)
    assert prepended.per_pair == pytest.approx(expected, rel=1e-9)
    assert gradient_moment(model, samples, data, batch_size=4, prefixes=[3] * 16).per_pair == \
        pytest.approx(expected, rel=1e-9)


def test_conditional_gm_ignores_prompt_targets():
    # The toy's logits at t depend on x_t only, so the continuation loss (targets t >= 3) sees
    # x_2.. only: rewriting the prompt targets x_1 (and x_0) on both sides changes nothing.
    model = ToyReference()
    g = torch.Generator().manual_seed(8)
    samples = torch.randint(0, 3, (16, 6), generator=g)
    data = torch.randint(0, 3, (16, 6), generator=g)
    data[:, :3] = samples[:, :3]
    base = gradient_moment(model, samples, data, batch_size=2, prefixes=3)
    samples2, data2 = samples.clone(), data.clone()
    new_prompt = (samples[:, :2] + 1) % 3
    samples2[:, :2] = data2[:, :2] = new_prompt
    assert gradient_moment(model, samples2, data2, batch_size=2, prefixes=3).per_pair == \
        pytest.approx(base.per_pair, rel=1e-12)
    unconditional = gradient_moment(model, samples2, data2, batch_size=2)
    assert unconditional.per_pair != pytest.approx(base.per_pair, rel=1e-6)


def test_pairs_never_share_a_prompt():
    keys = list("AAABBBCCCDDD")
    pairs = _pair_minibatches(keys, 2)
    assert pairs  # minibatches: AA AB BB CC CD DD -> (AA, BB), (AB, CC); CD, DD left out
    assert [sorted(a + b) for a, b in pairs] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    for a, b in pairs:
        assert {keys[i] for i in a}.isdisjoint(keys[i] for i in b)
    assert _pair_minibatches(list("ABCDEFGH"), 2) == [([0, 1], [2, 3]), ([4, 5], [6, 7])]


def test_conditional_with_repeated_prompts_runs_on_disjoint_pairs():
    model = tiny_gpt2(seed=9).double()
    g = torch.Generator().manual_seed(9)
    prompts = torch.randint(0, 8, (4, 2), generator=g).repeat_interleave(3, dim=0)  # 4 prompts x 3
    samples, data = torch.randint(0, 8, (12, 4), generator=g), markov_rows(12, 4, g)
    result = gradient_moment(model, samples, data, batch_size=2, prefixes=prompts)
    assert result.num_pairs == 2
    with pytest.raises(UserError, match="no two minibatches of 6 rows have disjoint prompts"):
        gradient_moment(model, samples, data, batch_size=6, prefixes=prompts[:1].repeat(12, 1))


def test_conditional_needs_shared_prompts():
    model = tiny_gpt2(seed=9)
    g = torch.Generator().manual_seed(9)
    samples, data = torch.randint(0, 8, (8, 6), generator=g), torch.randint(0, 8, (8, 6), generator=g)
    data[:, :2] = samples[:, :2]
    data[5, 1] = (samples[5, 1] + 1) % 8
    with pytest.raises(UserError, match="row 5 of samples and data do not share its 2-token prompt"):
        gradient_moment(model, samples, data, batch_size=2, prefixes=2)


# ----------------------------------------------------------------------------- bad inputs


def test_too_few_sequences():
    model = tiny_gpt2()
    rows = torch.randint(0, 8, (7, 6), generator=torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match=r"needs at least 2\*batch_size = 8 samples and data sequences, got 7"):
        gradient_moment(model, rows, torch.cat([rows, rows]), batch_size=4)
    with pytest.raises(UserError, match="num_pairs=4 needs 16 samples and data sequences .* only 3 pairs"):
        gradient_moment(model, torch.cat([rows, rows]), torch.cat([rows, rows]), batch_size=2, num_pairs=4)


def test_non_causal_references_are_refused():
    bert = BertForMaskedLM(BertConfig(vocab_size=16, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=64))
    rows = torch.randint(0, 8, (8, 6), generator=torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match="BertForMaskedLM is not a causal LM"):
        gradient_moment(bert, rows, rows, batch_size=2)

    class Bidirectional(nn.Module):  # a plain module that mixes in future tokens
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(16, 16)

        def forward(self, ids):
            h = self.embed(ids)
            return h + h.mean(dim=1, keepdim=True)

    with pytest.raises(UserError, match="Bidirectional is not causal"):
        gradient_moment(Bidirectional(), rows, rows, batch_size=2)
    with pytest.raises(UserError, match="must be a torch nn.Module"):
        gradient_moment(lambda ids: ids, rows, rows, batch_size=2)


def test_ids_outside_the_reference_vocabulary():
    model = tiny_gpt2(vocab=16)
    rows = torch.randint(0, 8, (8, 6), generator=torch.Generator().manual_seed(0))
    bad = rows.clone()
    bad[0, 0] = 16
    with pytest.raises(UserError, match="token id 16, outside the reference's 16 ids"):
        gradient_moment(model, bad, rows, batch_size=2)


def test_over_long_rows_warn_and_truncate():
    model = tiny_gpt2(n_positions=64, seed=11).double()
    g = torch.Generator().manual_seed(11)
    samples, data = torch.randint(0, 8, (8, 70), generator=g), torch.randint(0, 8, (8, 70), generator=g)
    with pytest.warns(UserWarning, match="8 samples rows of up to 70 reference tokens are longer "
                                         "than the reference context of 64; truncated to 64"):
        long = gradient_moment(model, samples, data, batch_size=2)
    assert long.per_pair == pytest.approx(gradient_moment(model, samples[:, :64], data[:, :64],
                                                          batch_size=2).per_pair, rel=1e-12)
    with pytest.warns(UserWarning, match="context of 10"):
        gradient_moment(model, samples[:, :64], data[:, :64], batch_size=2, max_length=10)


# ----------------------------------------------------------------------------- `ar` reference


def test_ar_checkpoint_reference_scores_the_same_ids(tmp_path):
    path = write_ar_checkpoint(tmp_path / "ar", vocab=17, length=12)
    model, tokenizer = ref.load_reference(str(path))
    assert tokenizer is None and isinstance(model, ref.CausalDiT)
    assert ref.load_reference(str(path))[0] is model  # cached in-process
    assert model.bos_token_id == 17 and ref.context_length(model) == 13

    x = torch.randint(0, 17, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        direct = model.denoiser.next_token_log_probs(shift_right(x, 17))  # [3, 12, 17]: predicts x_i
        adapted = model(torch.cat([torch.full((3, 1), 17), x], dim=1))  # [3, 13, 17]: predicts x_{i+1}
    torch.testing.assert_close(adapted[:, :-1], direct)
    # GM on the adapter = GM with the AR's own loss: mean over all L tokens, start token as context
    g = torch.Generator().manual_seed(1)
    samples, data = torch.randint(0, 17, (8, 12), generator=g), torch.randint(0, 5, (8, 12), generator=g)
    result = gradient_moment(model, samples, data, batch_size=2)

    def grad(rows):
        log_p = model.denoiser.next_token_log_probs(shift_right(rows, 17))
        loss = -log_p.gather(-1, rows[..., None]).mean()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return torch.cat([g_.reshape(-1) for g_ in grads]).double()

    model.eval()
    diffs = [grad(samples[i:i + 2]) - grad(data[i:i + 2]) for i in range(0, 8, 2)]
    expected = [(diffs[0] @ diffs[1]).item(), (diffs[2] @ diffs[3]).item()]
    assert result.per_pair == pytest.approx(expected, rel=1e-4, abs=1e-8)


@pytest.mark.parametrize("split", ["train", "valid"])
def test_the_data_side_is_the_splits_rows_picked_by_the_seed(tmp_path, monkeypatch, split):
    """The data minibatches are rows of `split`, a seeded permutation's first N (N = #samples)."""
    from mdlm_dmmd.data import build_data
    from mdlm_dmmd.metrics import gradient_moment as gm

    path = write_ar_checkpoint(tmp_path / "ar_digits", vocab=17, length=64)
    samples = torch.randint(0, 17, (8, 64), generator=torch.Generator().manual_seed(0))
    seen = {}
    real = gm.gradient_moment
    monkeypatch.setattr(gm, "gradient_moment", lambda model, s, data, **kw: seen.setdefault("data", data) is None
                        or real(model, s, data, **kw))
    gradient_moment_metric(samples, data_config={"name": "digits"}, reference=str(path), batch_size=4, device="cpu",
                           split=split, seed=3)
    rows = getattr(build_data({"name": "digits"}, 64), split)
    index = torch.randperm(len(rows), generator=torch.Generator().manual_seed(3))[:8]
    assert torch.equal(seen["data"], torch.stack([rows[int(i)]["input_ids"] for i in index]))


def test_masked_checkpoint_is_not_a_reference(tmp_path):
    path = write_ar_checkpoint(tmp_path / "mdlm", process="masked")
    with pytest.raises(UserError, match="is a masked diffusion checkpoint, not a causal LM"):
        ref.load_reference(str(path))


def test_registered_metric_on_digits_with_ar_reference(tmp_path):
    path = write_ar_checkpoint(tmp_path / "ar_digits", vocab=17, length=64)
    samples = torch.randint(0, 17, (16, 64), generator=torch.Generator().manual_seed(0))
    out = gradient_moment_metric(samples, data_config={"name": "digits"}, reference=str(path),
                                 batch_size=4, device="cpu")
    assert out["num_pairs"] == 2 and out["split"] == "train"
    assert math.isfinite(out["value"]) and math.isfinite(out["stderr"])
    again = gradient_moment_metric(samples, data_config={"name": "digits"}, reference=str(path),
                                   batch_size=4, device="cpu", split="valid", num_pairs=1)
    assert again["num_pairs"] == 1
    with pytest.raises(UserError, match="split must be train or valid"):
        gradient_moment_metric(samples, data_config={"name": "digits"}, reference=str(path), split="test")
    with pytest.raises(UserError, match="needs the data config"):
        gradient_moment_metric(samples, reference=str(path))
    masked = samples.clone()
    masked[0, 0] = 17
    with pytest.raises(UserError, match="a mask id left in the samples"):
        gradient_moment_metric(masked, data_config={"name": "digits"}, reference=str(path))


def test_registered_metric_on_text_retokenizes_random_data_rows(tmp_path, tokenizers):
    from mdlm_dmmd.data import build_data

    _, bpe = tokenizers
    for i in range(4):
        (tmp_path / f"doc{i}.txt").write_text(f"the cat sat on the mat {i}\n\na big red dog ran\n" * 4)
    data_config = {"name": "text_files", "paths": [str(tmp_path / "doc*.txt")], "valid_fraction": 0.25}
    tiny_gpt2(vocab=len(bpe), seed=12).save_pretrained(tmp_path / "ref")
    bpe.save_pretrained(tmp_path / "ref")
    bundle = build_data(data_config, 16)
    samples = torch.randint(0, 50257, (8, 16), generator=torch.Generator().manual_seed(0))
    out = gradient_moment_metric(samples, data_config=data_config, reference=str(tmp_path / "ref"),
                                 batch_size=2, seed=3, device="cpu")
    # the same computation by hand: 8 data rows drawn by a seeded permutation of the train split
    index = torch.randperm(len(bundle.train), generator=torch.Generator().manual_seed(3))[:8]
    data = torch.stack([bundle.train[int(i)]["input_ids"] for i in index])
    model, tokenizer = ref.load_reference(str(tmp_path / "ref"))
    expected = gradient_moment(model, samples, data, tokenizer=bundle.tokenizer,
                               reference_tokenizer=tokenizer, batch_size=2)
    assert out["num_pairs"] == 2
    assert out["value"] == pytest.approx(expected.mean, rel=1e-9)
    assert out["stderr"] == pytest.approx(expected.stderr, rel=1e-9)


def test_registered_metric_with_prompt_rows_is_the_conditional_gm(tmp_path):
    path = write_ar_checkpoint(tmp_path / "ar_digits", vocab=17, length=64)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 17, (16, 64), generator=g)
    samples = torch.cat([rows[:, :40], torch.randint(0, 17, (16, 24), generator=g)], dim=1)
    out = gradient_moment_metric(samples, data_config={"name": "digits"}, reference=str(path), batch_size=4,
                                 device="cpu", prompt_rows=rows, prompt_length=40)
    model, _ = ref.load_reference(str(path))
    direct = gradient_moment(model, samples, rows, batch_size=4, prefixes=40)
    assert out["split"] == "prompts" and out["value"] == pytest.approx(direct.mean, rel=1e-9)
    assert out["value"] != pytest.approx(gradient_moment(model, samples, rows, batch_size=4).mean, rel=1e-3)
    with pytest.raises(UserError, match="prompt_rows must match the samples' shape"):
        gradient_moment_metric(samples, data_config={"name": "digits"}, reference=str(path), prompt_rows=rows[:8],
                               prompt_length=40)
