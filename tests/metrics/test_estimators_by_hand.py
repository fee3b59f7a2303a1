"""The metrics' estimators against hand computations: KID's disjoint reference subsets and its
standard error, entropy and its standard error, gen-PPL's ratio-estimator standard error with
unequal token counts, an `ar` reference's EOS mask, retokenisation without special tokens, and
FID's reference split (valid, the whole train split whatever `train_shard`, a statistics file of
other features or data refused), digits' `reference=all`. Each was written against a mutation
the other tests let through; expected values come from plain Python / numpy loops.
"""

import copy
import itertools
import math
import statistics
from collections import Counter

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mdlm_dmmd.data.images import digits_arrays
from mdlm_dmmd.diffusion.sampling import shift_right
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.metrics import features as feature_registry
from mdlm_dmmd.metrics import frechet as fd
from mdlm_dmmd.metrics import reference as ref
from mdlm_dmmd.metrics.entropy import sample_entropy
from mdlm_dmmd.metrics.fid import fid
from mdlm_dmmd.metrics.frechet import frechet_distance
from mdlm_dmmd.metrics.gen_ppl import gen_ppl_metric, generative_perplexity
from mdlm_dmmd.metrics.image_features import ImageFeatures
from mdlm_dmmd.metrics.kernel_distance import kernel_distance

from conftest import write_ar_checkpoint


# ----------------------------------------------------------------------------- KID


def _k(a, b, d):
    return (sum(p * q for p, q in zip(a, b)) / d + 1) ** 3


def test_kid_pairs_disjoint_reference_subsets_and_its_stderr_is_the_pairs_standard_error():
    """x: 4 copies of the origin, so a pair's MMD²_u depends on its reference subset only:
    k(0, y) = 1, hence MMD²_u(x_pair, {y_a, y_b}) = 1 + k(y_a, y_b) − 2 = k(y_a, y_b) − 1.
    The 4 reference rows are cut into 2 disjoint pairs (3 possible partitions, whichever the
    shuffle picks): value = the mean of the two pairs' MMD², stderr = stdev(ddof=1) / √2."""
    x = [[0.0, 0.0]] * 4
    y = [[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [-1.0, 3.0]]
    f = {frozenset(p): _k(y[p[0]], y[p[1]], 2) - 1 for p in itertools.combinations(range(4), 2)}
    partitions = []
    for a in ((0, 1), (0, 2), (0, 3)):
        b = tuple(i for i in range(4) if i not in a)
        fa, fb = f[frozenset(a)], f[frozenset(b)]
        partitions.append(((fa + fb) / 2, statistics.stdev([fa, fb]) / math.sqrt(2)))
    for seed in range(6):
        out = kernel_distance(torch.tensor(x), torch.tensor(y), subset_size=2,
                              generator=torch.Generator().manual_seed(seed))
        assert out["subsets"] == 2 and out["subset_size"] == 2 and out["reference_subset_size"] == 2
        assert any(out["value"] == pytest.approx(v, rel=1e-12) and out["stderr"] == pytest.approx(s, rel=1e-12)
                   for v, s in partitions), (out, partitions)


# ----------------------------------------------------------------------------- entropy


def test_entropy_value_and_stderr_by_hand():
    rows = [[0, 0, 0, 0], [0, 1, 0, 1], [0, 1, 2, 3], [5, 5, 5, 6]]
    by_hand = [-sum(c / 4 * math.log(c / 4) for c in Counter(r).values()) for r in rows]
    assert by_hand[1] == pytest.approx(math.log(2)) and by_hand[2] == pytest.approx(math.log(4))
    out = sample_entropy(torch.tensor(rows))
    assert out["value"] == pytest.approx(sum(by_hand) / 4, rel=1e-12)
    assert out["stderr"] == pytest.approx(statistics.stdev(by_hand) / math.sqrt(4), rel=1e-12)
    assert out["per_sample"] == pytest.approx(by_hand, rel=1e-12)


# ----------------------------------------------------------------------------- gen-PPL


def _tiny_gpt2(vocab=10, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=64,
                                          bos_token_id=None, eos_token_id=None)).eval()


def test_gen_ppl_stderr_is_the_ratio_estimators_with_unequal_token_counts():
    """No BOS/EOS: every token after the first is a target. Rows of different lengths, so the
    token-weighted NLL and its delta-method stderr differ from plain per-sample statistics."""
    model = _tiny_gpt2(seed=4)
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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(bpe), n_positions=64,
                                           bos_token_id=eot, eos_token_id=eot)).eval()
    samples = [gpt2.encode(t) for t in ["<|endoftext|> the cat sat on the mat", " a red dog ran", " the mat sat"]]
    ours = generative_perplexity(model, samples, tokenizer=gpt2, reference_tokenizer=wrapped)
    pre = [bpe.encode(gpt2.decode(row), add_special_tokens=False) for row in samples]
    expected = generative_perplexity(model, pre)
    assert ours.num_tokens == expected.num_tokens
    assert ours.value == pytest.approx(expected.value, rel=1e-9)


# ----------------------------------------------------------------------------- FID reference


def _images(n=40, h=4, w=4, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def _tokens(array):
    return torch.from_numpy(array.reshape(len(array), -1).astype(np.int64))


def _split(config, array):
    """(train, valid) of the npy data by data.pixels' documented rule (a seeded permutation)."""
    n_valid = round(len(array) * config["valid_fraction"])
    perm = torch.randperm(len(array), generator=torch.Generator().manual_seed(config["split_seed"])).numpy()
    return array[np.sort(perm[n_valid:])], array[np.sort(perm[:n_valid])]


def _stats(feats):
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)


class _MeanOverSpace(torch.nn.Module):
    def forward(self, images):
        return images.double().mean(dim=(2, 3))


class ChannelMeansA(ImageFeatures):
    name = "channel_means_a"

    def network(self, channels):
        return _MeanOverSpace()

    def identity(self):
        return {"name": "channel_means", "version": 1}


class ChannelMeansB(ChannelMeansA):
    name = "channel_means_b"

    def identity(self):  # the same features, recorded as another extractor
        return {"name": "channel_means", "version": 2}


@pytest.fixture
def npy_data(tmp_path, monkeypatch):
    monkeypatch.setenv("MDLM_DMMD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(feature_registry._EXTRACTORS, "channel_means_a", f"{__name__}:ChannelMeansA")
    monkeypatch.setitem(feature_registry._EXTRACTORS, "channel_means_b", f"{__name__}:ChannelMeansB")
    array = _images()
    np.save(tmp_path / "x.npy", array)
    return {"name": "cifar10_pixels", "source": "npy", "path": str(tmp_path / "x.npy"), "valid_fraction": 0.25,
            "split_seed": 0}, array


def test_fid_against_the_valid_split_uses_the_valid_images(npy_data):
    config, array = npy_data
    generated = _images(n=10, seed=1)
    train, valid = _split(config, array)
    assert len(valid) == 10
    out = fid(_tokens(generated), data_config=config, features="channel_means_a", reference="valid")
    expected = frechet_distance(*_stats(generated.mean(axis=(1, 2))), *_stats(valid.mean(axis=(1, 2))))
    assert out["value"] == pytest.approx(expected, rel=1e-10) and out["reference"] == "valid"
    against_train = frechet_distance(*_stats(generated.mean(axis=(1, 2))), *_stats(train.mean(axis=(1, 2))))
    assert abs(expected - against_train) > 1e-3 * expected  # the check can tell the splits apart


def test_fid_reference_is_the_whole_train_split_whatever_the_train_shard(npy_data):
    config, array = npy_data
    generated = _images(n=10, seed=1)
    train, _ = _split(config, array)
    expected = frechet_distance(*_stats(generated.mean(axis=(1, 2))), *_stats(train.mean(axis=(1, 2))))
    for shard in (None, [0, 2], [1, 3]):
        out = fid(_tokens(generated), data_config=config | {"train_shard": shard}, features="channel_means_a")
        assert out["value"] == pytest.approx(expected, rel=1e-10), shard


def test_statistics_file_of_another_extractor_or_other_data_is_refused(npy_data, tmp_path):
    config, array = npy_data
    generated = _tokens(_images(n=10, seed=1))
    path = tmp_path / "stats.npz"
    fid(generated, data_config=config, features="channel_means_a", reference_stats=str(path))
    with pytest.raises(UserError, match=r"^frechet: reference_stats .* computed with feature extractor "):
        fid(generated, data_config=config, features="channel_means_b", reference_stats=str(path))
    other = _images(seed=7)  # same shape, same count, other pixels
    np.save(tmp_path / "y.npy", other)
    with pytest.raises(UserError, match=r"^frechet: reference_stats .* computed with data "):
        fid(generated, data_config=config | {"path": str(tmp_path / "y.npy")}, features="channel_means_a",
            reference_stats=str(path))


# ----------------------------------------------------------------------------- digits reference "all"


def test_digits_reference_all_is_train_and_valid_together():
    train, _ = digits_arrays("train", valid_fraction=0.1, split_seed=0)
    valid, _ = digits_arrays("valid", valid_fraction=0.1, split_seed=0)
    every = torch.from_numpy(np.concatenate([train, valid]))
    assert len(every) == 1797  # sklearn's digits
    out = fd.frechet(every, reference="all", features="digits_mlp", kid=False)
    assert out["value"] == pytest.approx(0.0, abs=1e-6)
