"""Fréchet distance: closed-form Gaussian cases, the digits classifiers, and the registered metric
in several feature spaces with the kernel distance.

Expectations are derived by hand (1-D, diagonal and commuting covariances, where
Tr((Σ1Σ2)^{1/2}) = Σ sqrt(a_i b_i)), by an independent route (scipy's sqrtm on a well-conditioned
pair), or from identities (a set against its own split has distance 0). The classifiers are
trained once per session into the temporary $MDLM_DMMD_CACHE set up by conftest.
"""

import dataclasses
import logging
import math
import re

import numpy as np
import pytest
import scipy.linalg
import torch

from mdlm_dmmd.data.images import digits_arrays
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.metrics import digits_classifier as dc
from mdlm_dmmd.metrics import digits_cnn, digits_mlp
from mdlm_dmmd.metrics import features as feature_registry
from mdlm_dmmd.metrics import frechet as fd
from mdlm_dmmd.metrics.kernel_distance import kernel_distance

RECIPES = [digits_mlp.RECIPE, digits_cnn.RECIPE]


def _spd(rng, f):
    a = rng.standard_normal((f, f))
    return a @ a.T + 0.5 * np.eye(f)


def _rotation(rng, f):
    q, _ = np.linalg.qr(rng.standard_normal((f, f)))
    return q


def _digits(split, **kw):
    pixels, _ = digits_arrays(split, valid_fraction=kw.get("valid_fraction", 0.1),
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


# ----------------------------------------------------------------------------- classifiers


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_classifier_accuracy_and_cache(recipe):
    model, accuracy = dc.load(recipe)
    assert accuracy >= 0.95
    # Recount the stored accuracy by brute force on the held-out split.
    pixels, labels = digits_arrays("valid", valid_fraction=0.1, split_seed=0)
    with torch.no_grad():
        predicted = model(torch.from_numpy(pixels).float() / 16).argmax(-1).numpy()
    assert accuracy == pytest.approx(np.mean(predicted == labels), abs=1e-12)
    # Cached where documented, and reading the file back gives the same model.
    path = dc.cache_path(recipe)
    assert path.is_file() and path.parent.name == "frechet"
    assert re.fullmatch(rf"{recipe.name}-[0-9a-f]{{12}}\.pt", path.name)
    reloaded, reloaded_accuracy = dc._load.__wrapped__(recipe, str(path))
    assert reloaded_accuracy == accuracy
    for key, value in model.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_classifier_training_is_deterministic(recipe):
    # A fresh training (no cache) reproduces the cached weights bit for bit, and leaves the
    # caller's global RNG, determinism flag and thread count as they were.
    cached, _ = dc.load(recipe)
    rng_before = torch.random.get_rng_state()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    threads_before = torch.get_num_threads()
    fresh, _ = dc.train(recipe)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert torch.are_deterministic_algorithms_enabled() == deterministic_before
    assert torch.get_num_threads() == threads_before
    for key, value in cached.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key


def test_features_are_the_penultimate_layer():
    tokens = _digits("valid")[:10]
    pixels = tokens.float() / 16
    mlp, _ = dc.load(digits_mlp.RECIPE)
    cnn, _ = dc.load(digits_cnn.RECIPE)
    mlp_feats = feature_registry.load_extractor("digits_mlp").features(tokens)
    cnn_feats = feature_registry.load_extractor("digits_cnn").features(tokens)
    assert mlp_feats.shape == (10, 64) and cnn_feats.shape == (10, 32)
    with torch.no_grad():
        assert torch.equal(mlp_feats, mlp.body(pixels))
        # the CNN by hand: its layers applied one by one on the 8x8 images
        h = pixels.view(10, 1, 8, 8)
        for layer in cnn.conv:
            h = layer(h)
        assert h.shape == (10, 16, 2, 2)
        assert torch.equal(cnn_feats, torch.relu(cnn.body[1](h.reshape(10, 64))))
        assert torch.equal(cnn.head(cnn_feats), cnn(pixels))


def test_the_two_extractors_differ_in_architecture_and_seed():
    mlp, _ = dc.load(digits_mlp.RECIPE)
    cnn, _ = dc.load(digits_cnn.RECIPE)
    assert digits_mlp.RECIPE.seed != digits_cnn.RECIPE.seed
    layer_types = [{type(m) for m in model.modules()} for model in (mlp, cnn)]
    assert torch.nn.Conv2d not in layer_types[0] and torch.nn.Conv2d in layer_types[1]
    assert digits_mlp.RECIPE.settings["architecture"] != digits_cnn.RECIPE.settings["architecture"]
    assert dc.cache_path(digits_mlp.RECIPE) != dc.cache_path(digits_cnn.RECIPE)


def test_cached_classifier_is_rebuilt_when_its_settings_change(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MDLM_DMMD_CACHE", str(tmp_path))
    base = dataclasses.replace(digits_mlp.RECIPE, steps=20)
    model, _ = dc.load(base)
    first = dc.cache_path(base)
    assert first.is_file()
    # Another step count, seed or architecture: another file, freshly trained weights.
    for changed in (dataclasses.replace(base, steps=21), dataclasses.replace(base, seed=5),
                    dataclasses.replace(base, build=digits_cnn.DigitsCNN)):
        path = dc.cache_path(changed)
        assert path != first and not path.exists()
        other, _ = dc.load(changed)
        assert path.is_file()
        assert not torch.equal(next(other.parameters()), next(model.parameters()))
    # A file at the right path but with other recorded settings (a stale copy) is retrained.
    stale = dataclasses.replace(base, steps=22)
    saved = torch.load(first, weights_only=True)
    saved["settings"] = saved["settings"].replace('"steps": 20', '"steps": 99')
    torch.save(saved, dc.cache_path(stale))
    with caplog.at_level(logging.WARNING):
        retrained, _ = dc._load.__wrapped__(stale, str(dc.cache_path(stale)))
    assert "other settings" in caplog.text
    assert torch.equal(next(retrained.parameters()), next(dc.train(stale)[0].parameters()))
    assert '"steps": 22' in torch.load(dc.cache_path(stale), weights_only=True)["settings"]


def test_unreadable_cache_file_is_retrained(tmp_path):
    recipe = digits_mlp.RECIPE
    path = tmp_path / "frechet" / dc.cache_path(recipe).name
    path.parent.mkdir()
    path.write_bytes(b"not a checkpoint")
    model, accuracy = dc._load.__wrapped__(recipe, str(path))
    cached, cached_accuracy = dc.load(recipe)
    assert accuracy == cached_accuracy
    assert torch.equal(model.head.weight, cached.head.weight)
    assert torch.load(path, weights_only=True)["accuracy"] == accuracy  # rewritten in place


# ----------------------------------------------------------------------------- metric


def test_reference_split_against_itself_is_zero():
    for features in ("digits_mlp", "digits_cnn"):
        assert fd.frechet(_digits("train"), features=features, kid=False)["value"] == pytest.approx(0.0, abs=1e-6)
        assert fd.frechet(_digits("valid"), reference="valid", features=features, kid=False)["value"] == \
            pytest.approx(0.0, abs=1e-6)
    # data_config picks the reference split: valid of (0.2, seed 1) against itself.
    config = {"name": "digits", "valid_fraction": 0.2, "split_seed": 1}
    other_valid = _digits("valid", valid_fraction=0.2, split_seed=1)
    assert len(other_valid) == round(1797 * 0.2)
    assert fd.frechet(other_valid, reference="valid", data_config=config, kid=False)["value"] == \
        pytest.approx(0.0, abs=1e-6)


def test_reference_statistics_are_cached_and_read_only():
    extractor = feature_registry.load_extractor("digits_mlp")
    mu, sigma = extractor.reference_statistics("train", None)
    again = extractor.reference_statistics("train", {"name": "digits", "valid_fraction": None})
    assert again[0] is mu and again[1] is sigma
    assert mu.shape == (64,) and sigma.shape == (64, 64)
    with pytest.raises(ValueError):
        mu[0] = 1.0
    feats = extractor.features(_digits("train")).double().numpy()
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-12)
    assert torch.equal(extractor.reference_features("train", None), extractor.features(_digits("train")))


@pytest.mark.parametrize("features", ["digits_mlp", "digits_cnn"])
def test_each_space_scores_data_near_zero_and_shuffled_pixels_far(features):
    held_out = _digits("valid")  # 180 real images the classifiers never saw
    g = torch.Generator().manual_seed(0)
    shuffled = torch.stack([row[torch.randperm(64, generator=g)] for row in held_out])  # same pixel values
    real = fd.frechet(held_out, features=features, kid_subset_size=30)
    far = fd.frechet(shuffled, features=features, kid_subset_size=30)
    space, far_space = real["spaces"][features], far["spaces"][features]
    assert real["num_samples"] == 180 and space["classifier_accuracy"] >= 0.95
    assert space["kid_subsets"] == 6 and space["kid_subset_size"] == 30
    # data vs data: KID ≈ 0 within 3 s.e. (unbiased); FD only small (biased upwards at N = 180)
    assert abs(space["kid"]) < 3 * space["kid_stderr"]
    assert far_space["fd"] >= 10 * space["fd"]
    assert far_space["kid"] > 10 * far_space["kid_stderr"] and far_space["kid"] > 20 * abs(space["kid"])


def test_default_reports_both_spaces_with_kid_and_the_mlp_as_primary():
    samples = _digits("valid")[:100]
    result = fd.frechet(samples, num_bootstrap=3, seed=4)
    assert result["features"] == "digits_mlp" and list(result["spaces"]) == ["digits_mlp", "digits_cnn"]
    for name in ("digits_mlp", "digits_cnn"):
        alone = fd.frechet(samples, num_bootstrap=3, seed=4, features=name)
        assert result["spaces"][name] == alone["spaces"][name]
        extractor = feature_registry.load_extractor(name)
        # KID wired to the same features and seed: the kernel_distance of the two feature sets
        kid = kernel_distance(extractor.features(samples).double(), extractor.reference_features("train", None),
                              subset_size=100, generator=torch.Generator().manual_seed(4))
        assert alone["spaces"][name]["kid"] == kid["value"] and alone["spaces"][name]["kid_stderr"] == kid["stderr"]
        assert result["columns"][f"fd_{name}"] == alone["value"]
        assert result["columns"][f"fd_{name}_stderr"] == alone["stderr"]
        assert result["columns"][f"kid_{name}"] == kid["value"]
        assert result["columns"][f"kid_{name}_stderr"] == kid["stderr"]
    assert result["value"] == result["columns"]["fd_digits_mlp"] and result["stderr"] == result["columns"]["fd_digits_mlp_stderr"]
    assert result["classifier_accuracy"] == result["spaces"]["digits_mlp"]["classifier_accuracy"]
    assert result["spaces"]["digits_cnn"]["num_features"] == 32
    assert "kid_digits_mlp" not in fd.frechet(samples, kid=False)["columns"]
    assert fd.describe() == "FD in digits_mlp features (primary; also digits_cnn (fd_*, kid_* columns))"
    assert fd.describe(features="digits_cnn") == "FD in digits_cnn features (primary)"


def test_held_out_digits_are_close_and_degenerate_samples_are_far():
    held_out = fd.frechet(_digits("valid"), features="digits_mlp")
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
    ({"data_config": {"name": "shakespeare"}}, "features=digits_mlp needs data.name=digits .* got 'shakespeare'"),
    ({"kid": "yes"}, "kid must be true or false, got 'yes'"),
    ({"kid_subset_size": 1}, "kid_subset_size must be an int >= 2, got 1"),
    ({"features": []}, r"features must be a name or a list of distinct names of digits_cnn, digits_mlp, inception, random_conv, got \[\]"),
    ({"features": ["digits_mlp", "digits_mlp"]}, "list of distinct names"),
    ({"features": {"a": 1}}, r"unknown eval.metric_options.frechet.features \{'a': 1\}"),
])
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(UserError, match=match):
        fd.frechet(torch.zeros(4, 64, dtype=torch.long), **kwargs)


# ----------------------------------------------------------------------------- feature extractors


def _old_frechet_value(tokens, reference_pixels):
    """The metric's value as computed before extractors were pluggable (frozen copy): the
    classifier's `body` on pixels / 16, float64 mean and np.cov, then the distance."""
    model, _ = dc.load(digits_mlp.RECIPE)
    with torch.no_grad():
        ref = np.asarray(model.body(torch.as_tensor(reference_pixels).float() / 16), dtype=np.float64)
        feats = model.body(tokens.float() / 16).double().numpy()
    return fd.frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), ref.mean(0), np.cov(ref, rowvar=False))


def test_primary_space_gives_the_old_numbers():
    held_out = _digits("valid")[:40]
    noise = torch.randint(0, 17, (40, 64), generator=torch.Generator().manual_seed(0))
    train = _digits("train")
    for samples, before in ((held_out, 54.60814494261922), (noise, 1541.7155489014754)):
        default = fd.frechet(samples)
        assert default["value"] == fd.frechet(samples, features="digits_mlp", kid=False)["value"]
        assert default["value"] == _old_frechet_value(samples, train)
        # measured with the code before extractors were pluggable, on the machine that wrote the
        # test. The classifier's last bits differ on another CPU or BLAS and 200 optimiser steps
        # amplify them: on an AMD EPYC the noise row gave 1541.997 (1.8e-4 off), hence 1e-3.
        assert default["value"] == pytest.approx(before, rel=1e-3)
    boot = fd.frechet(held_out, reference="valid", num_bootstrap=3, seed=1)
    assert boot["value"] == pytest.approx(50.004761750003354, rel=1e-3)
    assert boot["stderr"] == pytest.approx(28.720059310417653, rel=1e-3)


def test_registry_lists_and_loads_extractors():
    assert feature_registry.available_extractors() == ["digits_cnn", "digits_mlp", "inception", "random_conv"]
    for name in ("digits_mlp", "digits_cnn"):
        extractor = feature_registry.load_extractor(name)
        assert isinstance(extractor, feature_registry.FeatureExtractor)
        assert extractor.name == name and extractor.image_shape == (8, 8, 1)


@pytest.mark.parametrize("name, hint", [("vgg", ""), ("digits_mpl", " (did you mean 'digits_mlp'?)"), (3, "")])
def test_unknown_extractor_is_one_line_naming_the_option(name, hint):
    message = (f"frechet: unknown eval.metric_options.frechet.features {name!r}; available: digits_cnn, digits_mlp, "
               f"inception, random_conv{hint}")
    with pytest.raises(UserError, match="^" + re.escape(message) + "$"):
        fd.frechet(_digits("valid")[:4], features=name)
    with pytest.raises(UserError, match="^" + re.escape(message) + "$"):
        fd.frechet(_digits("valid")[:4], features=["digits_mlp", name])


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

    def reference_features(self, split, data_config):
        return torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])

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
    # the samples' features are the reference features: in two pairs of disjoint halves, each
    # pair's MMD² is within 2 rows of 2 rows; the columns hold it
    assert set(result["columns"]) >= {"fd_toy", "kid_toy"} and result["spaces"]["toy"]["kid_subsets"] == 2


def test_a_plugin_extractor_is_reported_under_its_registered_name(monkeypatch):
    """The result's spaces and columns use the name the option gives, whatever the extractor's
    class calls itself (a plugin registered as `my_toy` whose class says `toy`)."""
    monkeypatch.setitem(feature_registry._EXTRACTORS, "my_toy", "mdlm_dmmd.metrics.digits_mlp:DigitsMLPFeatures")
    samples = torch.randint(0, 17, (12, 64), generator=torch.Generator().manual_seed(0))
    real = digits_mlp.DigitsMLPFeatures

    def renamed():
        extractor = real()
        extractor.name = "toy"
        return extractor

    monkeypatch.setattr(digits_mlp, "DigitsMLPFeatures", renamed)
    result = fd.frechet(samples, features="my_toy", kid=False)
    assert result["features"] == "my_toy" and set(result["spaces"]) == {"my_toy"} and "fd_my_toy" in result["columns"]


def test_digits_reference_all_is_train_and_valid_together():
    train, _ = digits_arrays("train", valid_fraction=0.1, split_seed=0)
    valid, _ = digits_arrays("valid", valid_fraction=0.1, split_seed=0)
    every = torch.from_numpy(np.concatenate([train, valid]))
    assert len(every) == 1797  # sklearn's digits
    out = fd.frechet(every, reference="all", features="digits_mlp", kid=False)
    assert out["value"] == pytest.approx(0.0, abs=1e-6)
