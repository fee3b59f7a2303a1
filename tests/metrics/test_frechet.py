"""Fréchet distance: closed-form Gaussian cases, the digits classifier, and the registered metric.

Expectations are derived by hand (1-D, diagonal and commuting covariances, where
Tr((Σ1Σ2)^{1/2}) = Σ sqrt(a_i b_i)), by an independent route (scipy's sqrtm on a well-conditioned
pair), or from identities (a set against its own split has distance 0). The classifier is
trained once per session into the temporary $MDLM_DMMD_CACHE set up by conftest.
"""

import math
import sys

import numpy as np
import pytest
import scipy.linalg
import torch

from mdlm_dmmd.errors import UserError
from mdlm_dmmd.metrics import features as feature_registry
from mdlm_dmmd.metrics import frechet as fd


def _spd(rng, f):
    a = rng.standard_normal((f, f))
    return a @ a.T + 0.5 * np.eye(f)


def _rotation(rng, f):
    q, _ = np.linalg.qr(rng.standard_normal((f, f)))
    return q


def _digits(split, **kw):
    pixels, _ = fd._digits_arrays(split, valid_fraction=kw.get("valid_fraction", 0.1),
                                  split_seed=kw.get("split_seed", 0))
    return torch.from_numpy(pixels)


# ----------------------------------------------------------------------------- frechet_distance


def test_identical_gaussians_are_at_distance_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(6), _spd(rng, 6)
    assert fd.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_one_dimensional_closed_form():
    # N(1.5, 2²) vs N(3, 0.5²): (1.5 − 3)² + (2 − 0.5)² = 2.25 + 2.25
    assert fd.frechet_distance([1.5], [[4.0]], [3.0], [[0.25]]) == pytest.approx(4.5, rel=1e-12)


def test_diagonal_closed_form():
    # ‖(1,0,0) − (0,0,2)‖² = 5;  Σ(√a − √b)² = (1−2)² + (2−1)² + (3−0.5)² = 8.25
    value = fd.frechet_distance([1.0, 0.0, 0.0], np.diag([1.0, 4.0, 9.0]),
                                [0.0, 0.0, 2.0], np.diag([4.0, 1.0, 0.25]))
    assert value == pytest.approx(13.25, rel=1e-12)


def test_commuting_covariances_closed_form():
    # Σ1 = Q diag(a) Qᵀ, Σ2 = Q diag(b) Qᵀ share eigenvectors: the trace term is Σ(√a − √b)².
    rng = np.random.default_rng(1)
    q = _rotation(rng, 4)
    a, b = np.array([0.5, 1.0, 2.0, 7.0]), np.array([3.0, 0.1, 2.0, 1.0])
    mu1, mu2 = rng.standard_normal(4), rng.standard_normal(4)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    value = fd.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert value == pytest.approx(expected, rel=1e-9)


def test_general_case_matches_scipy_sqrtm():
    # Non-commuting, well-conditioned pair: scipy's sqrtm of Σ1Σ2 is an independent reference.
    rng = np.random.default_rng(2)
    mu1, mu2, s1, s2 = rng.standard_normal(5), rng.standard_normal(5), _spd(rng, 5), _spd(rng, 5)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert fd.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_symmetric_in_its_arguments():
    rng = np.random.default_rng(3)
    mu1, mu2, s1, s2 = rng.standard_normal(5), rng.standard_normal(5), _spd(rng, 5), _spd(rng, 5)
    assert fd.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(fd.frechet_distance(mu2, s2, mu1, s1),
                                                                  rel=1e-10)


def test_singular_covariances_need_no_eps():
    # diag(1, 0) vs diag(0, 1): Σ(√a − √b)² = 1 + 1 exactly; an eps·I patch would shift this.
    assert fd.frechet_distance([0, 0], np.diag([1.0, 0.0]), [0, 0], np.diag([0.0, 1.0])) == \
        pytest.approx(2.0, rel=1e-12)
    # Rank-deficient sample covariances (N = 3 < F = 8) of the same points: distance 0.
    x = np.random.default_rng(4).standard_normal((3, 8))
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    assert fd.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_mismatched_shapes_are_refused():
    with pytest.raises(UserError, match="frechet_distance"):
        fd.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


# ----------------------------------------------------------------------------- classifier


def test_classifier_accuracy_and_cache():
    model, accuracy = fd.load_classifier()
    assert accuracy >= 0.95
    # Recount the stored accuracy by brute force on the held-out split.
    pixels, labels = fd._digits_arrays("valid", valid_fraction=0.1, split_seed=0)
    with torch.no_grad():
        predicted = model(torch.from_numpy(pixels).float() / 16).argmax(-1).numpy()
    assert accuracy == pytest.approx(np.mean(predicted == labels), abs=1e-12)
    # Cached where documented, and reading the file back gives the same model.
    path = fd.classifier_path()
    assert path.is_file() and path.parent.name == "frechet" and path.name == "digits_classifier_v1.pt"
    reloaded, reloaded_accuracy = fd._load_classifier.__wrapped__(str(path))
    assert reloaded_accuracy == accuracy
    for key, value in model.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key


def test_classifier_training_is_deterministic():
    # A fresh training (no cache) reproduces the cached weights bit for bit, and leaves the
    # caller's global RNG, determinism flag and thread count as they were.
    cached, _ = fd.load_classifier()
    rng_before = torch.random.get_rng_state()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    threads_before = torch.get_num_threads()
    fresh, _ = fd.train_classifier()
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert torch.are_deterministic_algorithms_enabled() == deterministic_before
    assert torch.get_num_threads() == threads_before
    for key, value in cached.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key


def test_features_are_the_penultimate_layer():
    tokens = _digits("valid")[:10]
    feats = fd.features(tokens)
    model, _ = fd.load_classifier()
    assert feats.shape == (10, 64)
    with torch.no_grad():
        assert torch.equal(feats, model.body(tokens.float() / 16))


def test_fallback_split_matches_data_images(monkeypatch):
    from mdlm_dmmd.data import images

    monkeypatch.setitem(sys.modules, "mdlm_dmmd.data.images", None)  # import now raises ImportError
    for split in ("train", "valid"):
        ours, our_labels = fd._digits_arrays(split, valid_fraction=0.2, split_seed=3)
        theirs, their_labels = images.digits_arrays(split, valid_fraction=0.2, split_seed=3)
        np.testing.assert_array_equal(ours, theirs)
        np.testing.assert_array_equal(our_labels, their_labels)


# ----------------------------------------------------------------------------- metric


def test_reference_split_against_itself_is_zero():
    assert fd.frechet(_digits("train"))["value"] == pytest.approx(0.0, abs=1e-6)
    assert fd.frechet(_digits("valid"), reference="valid")["value"] == pytest.approx(0.0, abs=1e-6)
    # data_config picks the reference split: valid of (0.2, seed 1) against itself.
    config = {"name": "digits", "valid_fraction": 0.2, "split_seed": 1}
    other_valid = _digits("valid", valid_fraction=0.2, split_seed=1)
    assert len(other_valid) == round(1797 * 0.2)
    assert fd.frechet(other_valid, reference="valid", data_config=config)["value"] == \
        pytest.approx(0.0, abs=1e-6)


def test_reference_statistics_are_cached_and_read_only():
    mu, sigma = fd.reference_statistics("train")
    again = fd.reference_statistics("train", {"name": "digits", "valid_fraction": None})
    assert again[0] is mu and again[1] is sigma
    assert mu.shape == (64,) and sigma.shape == (64, 64)
    with pytest.raises(ValueError):
        mu[0] = 1.0
    feats = fd.features(_digits("train")).double().numpy()
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-12)


def test_held_out_digits_are_close_and_degenerate_samples_are_far():
    held_out = fd.frechet(_digits("valid"))  # 180 real images the classifier never saw
    n = held_out["num_samples"]
    assert n == 180 and held_out["classifier_accuracy"] >= 0.95
    assert math.isnan(held_out["stderr"])
    uniform = torch.randint(0, 17, (n, 64), generator=torch.Generator().manual_seed(0))
    single = _digits("valid")[:1].repeat(n, 1)
    assert fd.frechet(uniform)["value"] >= 10 * held_out["value"]
    assert fd.frechet(single)["value"] >= 10 * held_out["value"]


def test_bootstrap_stderr():
    samples = _digits("valid")
    first = fd.frechet(samples, num_bootstrap=5, seed=0)
    assert 0 < first["stderr"] < math.inf
    assert fd.frechet(samples, num_bootstrap=5, seed=0)["stderr"] == first["stderr"]
    assert fd.frechet(samples, num_bootstrap=0)["value"] == first["value"]


@pytest.mark.parametrize("samples, match", [
    (torch.zeros(4, 63, dtype=torch.long), r"\[N, 64\] .* got shape \(4, 63\)"),
    (torch.zeros(64, dtype=torch.long), r"got shape \(64,\)"),
    (torch.zeros(4, 64), "dtype torch.float32"),
    (torch.full((4, 64), 17), r"0\.\.16, got values in 17\.\.17"),
    (torch.full((4, 64), -1), r"got values in -1\.\.-1"),
    (torch.zeros(1, 64, dtype=torch.long), "N >= 2 .* got N=1"),
])
def test_bad_samples_are_refused(samples, match):
    with pytest.raises(UserError, match=f"^frechet: .*{match}"):
        fd.frechet(samples)


@pytest.mark.parametrize("kwargs, match", [
    ({"reference": "test"}, "reference must be one of train, valid, all, got 'test'"),
    ({"num_bootstrap": 1}, "num_bootstrap must be 0 .* got 1"),
    ({"num_bootstrap": -2}, "num_bootstrap must be 0 .* got -2"),
    ({"data_config": {"name": "shakespeare"}}, "data.name=digits .* got 'shakespeare'"),
])
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(UserError, match=match):
        fd.frechet(torch.zeros(4, 64, dtype=torch.long), **kwargs)


def test_unreadable_cache_file_is_retrained(tmp_path):
    path = tmp_path / "frechet" / "digits_classifier_v1.pt"
    path.parent.mkdir()
    path.write_bytes(b"not a checkpoint")
    model, accuracy = fd._load_classifier.__wrapped__(str(path))
    cached, cached_accuracy = fd.load_classifier()
    assert accuracy == cached_accuracy
    assert torch.equal(model.head.weight, cached.head.weight)
    assert torch.load(path, weights_only=True)["accuracy"] == accuracy  # rewritten in place


# ----------------------------------------------------------------------------- feature extractors


def _old_frechet_value(tokens, reference_pixels):
    """The metric's value as computed before extractors were pluggable (frozen copy): the
    classifier's `body` on pixels / 16, float64 mean and np.cov, then the distance."""
    model, _ = fd.load_classifier()
    with torch.no_grad():
        ref = np.asarray(model.body(torch.as_tensor(reference_pixels).float() / 16), dtype=np.float64)
        feats = model.body(tokens.float() / 16).double().numpy()
    return fd.frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), ref.mean(0), np.cov(ref, rowvar=False))


def test_default_extractor_gives_the_old_numbers():
    held_out = _digits("valid")[:40]
    noise = torch.randint(0, 17, (40, 64), generator=torch.Generator().manual_seed(0))
    train = _digits("train")
    for samples, before in ((held_out, 54.60814494261922), (noise, 1541.7155489014754)):
        default = fd.frechet(samples)
        assert default == fd.frechet(samples, features="digits_mlp") | {"stderr": default["stderr"]}
        assert default["value"] == _old_frechet_value(samples, train)
        # measured with the code before this change on the machine that wrote the test (the
        # classifier's last bits may differ on another CPU or BLAS, hence the tolerance)
        assert default["value"] == pytest.approx(before, rel=1e-4)
    assert list(fd.frechet(held_out)) == ["value", "stderr", "classifier_accuracy", "num_samples", "reference"]
    boot = fd.frechet(held_out, reference="valid", num_bootstrap=3, seed=1)
    assert boot["value"] == pytest.approx(50.004761750003354, rel=1e-4)
    assert boot["stderr"] == pytest.approx(28.720059310417653, rel=1e-4)


def test_registry_lists_and_loads_extractors():
    assert feature_registry.available_extractors() == ["digits_mlp"]
    extractor = feature_registry.load_extractor("digits_mlp")
    assert isinstance(extractor, feature_registry.FeatureExtractor)
    assert extractor.name == "digits_mlp" and extractor.image_shape == (8, 8, 1)
    tokens = extractor.check_samples(_digits("valid")[:5])
    assert torch.equal(extractor.features(tokens), fd.features(tokens))


@pytest.mark.parametrize("name, hint", [("inception", ""), ("digits_mpl", " (did you mean 'digits_mlp'?)"), (3, "")])
def test_unknown_extractor_is_one_line_naming_the_option(name, hint):
    message = f"frechet: unknown eval.metric_options.frechet.features {name!r}; available: digits_mlp{hint}"
    with pytest.raises(UserError, match="^" + __import__("re").escape(message) + "$"):
        fd.frechet(_digits("valid")[:4], features=name)


class ToyFeatures:
    """A third extractor as a new module would add it: features = the first two pixels."""

    name = "toy"
    image_shape = (2, 2, 1)

    def check_samples(self, samples):
        return torch.as_tensor(samples).long()

    def features(self, tokens):
        return tokens[:, :2].float()

    def reference_statistics(self, split, data_config):
        return np.zeros(2), np.eye(2)

    def details(self):
        return {"toy_detail": 1}


def test_a_new_extractor_plugs_in_with_one_registry_line(monkeypatch):
    monkeypatch.setitem(feature_registry._EXTRACTORS, "toy", f"{__name__}:ToyFeatures")
    samples = torch.tensor([[0, 0, 5, 5], [2, 0, 5, 5], [0, 2, 5, 5], [2, 2, 5, 5]])
    result = fd.frechet(samples, features="toy")
    # features (0,0), (2,0), (0,2), (2,2): mean (1, 1), unbiased covariance 4/3 I; vs N(0, I):
    # |mu|^2 = 2, Tr(4/3 I + I - 2 (4/3)^{1/2} I) = 2 (7/3 - 2 sqrt(4/3))
    assert result["value"] == pytest.approx(2 + 2 * (7 / 3 - 2 * math.sqrt(4 / 3)), rel=1e-12)
    assert result["toy_detail"] == 1 and result["num_samples"] == 4
