"""FID (`eval.metrics=[fid]`): the Fréchet distance on image features of the run's own image data,
with reference statistics cached; Inception through torch-fidelity; its stand-in `random_conv`.

Inception's published weights cannot be downloaded here. torch-fidelity's Inception network is
pure torch, so it runs here with random weights of the right shapes, and with the real weights
where `MDLM_DMMD_INCEPTION_WEIGHTS` points at them (skipped otherwise). torchvision, which
torch-fidelity imports at package level but does not use for Inception, has no CPU build for
this torch on the package index; where it cannot be imported, the tests put a stub with the
three names torch-fidelity imports in its place (`fidelity` fixture).
"""

import importlib
import math
import os
import re
import sys
import types

import numpy as np
import pytest
import torch

from mdlm_dmmd.errors import UserError
from mdlm_dmmd.metrics import features as feature_registry
from mdlm_dmmd.metrics import inception
from mdlm_dmmd.metrics.fid import fid
from mdlm_dmmd.metrics.frechet import frechet_distance
from mdlm_dmmd.metrics.image_features import ImageFeatures
from mdlm_dmmd.metrics.random_conv import RandomConvNet


def images(n=40, h=4, w=4, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


@pytest.fixture
def data(tmp_path, monkeypatch):
    """A tiny CIFAR stand-in (.npy, 40 images 4x4x3; 36 train, 4 valid) and an empty stats cache."""
    monkeypatch.setenv("MDLM_DMMD_CACHE", str(tmp_path / "cache"))
    array = images()
    np.save(tmp_path / "x.npy", array)
    return {"name": "cifar10_pixels", "source": "npy", "path": str(tmp_path / "x.npy"), "valid_fraction": 0.1,
            "split_seed": 0}, array


def split_images(config, array):
    """(train, valid) of `data`, by the split rule of data.pixels (a seeded permutation)."""
    n_valid = round(len(array) * config["valid_fraction"])
    perm = torch.randperm(len(array), generator=torch.Generator().manual_seed(config["split_seed"])).numpy()
    return array[np.sort(perm[n_valid:])], array[np.sort(perm[:n_valid])]


def train_images(config, array):
    return split_images(config, array)[0]


def tokens_of(array):
    return torch.from_numpy(array.reshape(len(array), -1).astype(np.int64))


class MeanOverSpace(torch.nn.Module):
    def forward(self, images):
        return images.double().mean(dim=(2, 3))


class ChannelMeans(ImageFeatures):
    """An extractor a test injects: features = the mean of each channel over the image."""

    name = "channel_means"
    calls = 0

    def network(self, channels):
        ChannelMeans.calls += 1
        return MeanOverSpace()

    def identity(self):
        return {"name": self.name}


def stats(feats):
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)


# ----------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_of_gaussian_samples_is_near_the_closed_form():
    # N(0, I) vs N(m, diag(4, 1, 1/4)) in 3-D: d² = |m|² + Σ (1 + s - 2 sqrt(s)) = |m|² + Σ (1 - sqrt s)²
    rng = np.random.default_rng(0)
    m, s = np.array([1.0, -0.5, 0.0]), np.array([4.0, 1.0, 0.25])
    exact = m @ m + ((1 - np.sqrt(s)) ** 2).sum()  # 1.25 + 1 + 0 + 0.25 = 2.5
    n = 200_000
    a = rng.standard_normal((n, 3))
    b = m + rng.standard_normal((n, 3)) * np.sqrt(s)
    # the estimate's spread at this N is ~1e-2 (its bias ~F/N); 2 % of 2.5 is several s.e.
    assert frechet_distance(*stats(a), *stats(b)) == pytest.approx(exact, rel=0.02)


# ----------------------------------------------------------------------------- the FID path


def test_fid_path_end_to_end_on_an_injected_extractor(data, monkeypatch):
    config, array = data
    monkeypatch.setitem(feature_registry._EXTRACTORS, "channel_means", f"{__name__}:ChannelMeans")
    generated = images(n=10, seed=1)
    result = fid(tokens_of(generated), data_config=config, features="channel_means")
    # by hand: channel means of the generated images vs of the 36 train images, from the raw arrays
    expected = frechet_distance(*stats(generated.mean(axis=(1, 2))),
                                *stats(train_images(config, array).mean(axis=(1, 2))))
    assert result["value"] == pytest.approx(expected, rel=1e-10)
    assert result["num_samples"] == 10 and result["features"] == "channel_means" and result["reference"] == "train"
    assert "kid_channel_means" not in result["columns"]  # fid: no KID by default


def test_reference_statistics_are_cached_once_and_refused_for_other_images(data, monkeypatch, tmp_path):
    config, array = data
    monkeypatch.setitem(feature_registry._EXTRACTORS, "channel_means", f"{__name__}:ChannelMeans")
    generated = tokens_of(images(n=10, seed=1))
    ChannelMeans.calls = 0
    first = fid(generated, data_config=config, features="channel_means")
    files = list((tmp_path / "cache" / "frechet" / "stats").glob("channel_means-*.npz"))
    assert len(files) == 1 and ChannelMeans.calls == 2  # the reference once, the samples once
    assert fid(generated, data_config=config, features="channel_means")["value"] == first["value"]
    assert ChannelMeans.calls == 3  # the samples only: the statistics came from the file

    # an explicit file computed on 4x4 images is refused for a 2x2 crop, and for another image count
    path = tmp_path / "cifar_stats.npz"
    fid(generated, data_config=config, features="channel_means", reference_stats=str(path))
    cropped = tokens_of(images(n=10, seed=1)[:, 1:3, 1:3])
    message = (f"frechet: reference_stats '{path}' were computed with image shape [4, 4, 3], this run has "
               f"[2, 2, 3]; delete the file or pass another reference_stats path")
    with pytest.raises(UserError, match="^" + re.escape(message) + "$"):
        fid(cropped, data_config=config | {"image_size": 2}, features="channel_means", reference_stats=str(path))
    with pytest.raises(UserError, match=r"^frechet: reference_stats .* number of reference images 36, this run has 32;"):
        fid(generated, data_config=config | {"valid_fraction": 0.2}, features="channel_means",
            reference_stats=str(path))


def test_random_conv_stand_in_says_it_is_not_fid(data):
    config, array = data
    generated = images(n=10, seed=1)
    result = fid(tokens_of(generated), data_config=config, features="random_conv")
    torch.manual_seed(0)
    net = RandomConvNet(3).requires_grad_(False)
    with torch.no_grad():  # the same network on NCHW images permuted by hand
        feats = lambda a: net(torch.from_numpy(a).permute(0, 3, 1, 2)).double().numpy()  # noqa: E731
    expected = frechet_distance(*stats(feats(generated)), *stats(feats(train_images(config, array))))
    assert result["value"] == pytest.approx(expected, rel=1e-6)
    assert result["features"] == "random_conv" and "not FID" in result["note"]
    assert result["spaces"]["random_conv"]["num_features"] == 32
    assert fid.describe(features="random_conv") == "FD in random_conv features (primary)"
    assert fid.describe() == "FID (Inception-v3 pool3, against the train split)"


def test_data_is_closer_to_itself_than_flat_images_in_the_stand_in_space(data):
    config, array = data
    held_out = fid(tokens_of(images(n=40, seed=5)), data_config=config, features="random_conv")["value"]
    flat = fid(tokens_of(np.full((40, 4, 4, 3), 3, np.uint8)) + torch.arange(40)[:, None] % 2,
               data_config=config, features="random_conv")["value"]
    assert flat > 10 * held_out


def test_non_256_level_images_are_scaled_to_uint8(monkeypatch, tmp_path):
    # digits (levels 0..16) scored by an image extractor: 16 -> 255, 8 -> 120 (round(8 * 255 / 16))
    monkeypatch.setenv("MDLM_DMMD_CACHE", str(tmp_path))
    extractor = ChannelMeans(data_config={"name": "digits"})
    tokens = extractor.check_samples(torch.tensor([[16] * 64, [8] * 64]))
    images_ = extractor.as_uint8_images(tokens)
    assert images_.shape == (2, 1, 8, 8) and images_.dtype == torch.uint8
    assert images_[0].unique().tolist() == [255] and images_[1].unique().tolist() == [128]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("samples, match", [
    (torch.full((4, 48), 256), r"^frechet: samples must be pixel levels 0\.\.255, got values in 256\.\.256 "),
    (torch.zeros(1, 48, dtype=torch.long), r"^frechet: samples need N >= 2 rows"),
    (torch.zeros(4, 48), r"^frechet: samples must be integer image tokens"),
    (torch.zeros(4, 12, dtype=torch.long), re.escape("model.length (12) must equal the images' H·W·C = 4·4·3 = 48")),
])
def test_bad_samples_are_one_line_errors(data, samples, match):
    config, _ = data
    with pytest.raises(UserError, match=match):
        fid(samples, data_config=config, features="random_conv")


def test_text_data_is_refused_by_image_extractors(monkeypatch, tmp_path):
    monkeypatch.setenv("MDLM_DMMD_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="^frechet: features=random_conv needs image data; data=shakespeare is text$"):
        fid(torch.zeros(2, 16, dtype=torch.long), data_config={"name": "shakespeare", "tokenizer": "gpt2"},
            features="random_conv")


@pytest.mark.parametrize("name", ["random_conv", "inception"])
def test_image_extractors_refuse_text_data_before_any_sample(data, fidelity, name):
    """`check_data` (called by the metrics' check_ready, before sampling) reads the modality from
    data.name alone; image data and unknown names (build_data's to refuse) pass."""
    config, _ = data
    extractor = feature_registry.load_extractor(name)
    option = "eval.metric_options.fid.features"
    with pytest.raises(UserError, match=rf"^fid: {option}={name} needs image data \(e\.g\. data=cifar10_pixels\), "
                                        r"got data.name='shakespeare' \(text\)$"):
        extractor.check_data({"name": "shakespeare"}, option)
    for image_data in (config, {"name": "digits"}, {"name": "no_such_data"}, {}):
        extractor.check_data(image_data, option)


def test_the_modality_read_from_a_data_name_is_its_bundles(data):
    from mdlm_dmmd.data import available_datasets, build_data, modality_of

    config, _ = data
    shakespeare = {"name": "shakespeare", "max_documents": 4, "valid_fraction": 0.25}
    for data_config, length in ((config, 48), ({"name": "digits"}, 64), (shakespeare, 32)):
        assert modality_of(data_config["name"]) == build_data(data_config, length).modality
    # the hub and text_files builders make text bundles (hub.py, text.py: modality="text")
    assert {n for n in available_datasets() if modality_of(n) == "image"} == {"digits", "cifar10_pixels"}
    assert modality_of("no_such_data") is None and modality_of(None) is None


def test_fid_without_torch_fidelity_says_how_to_install(data, monkeypatch):
    config, _ = data
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import fails as when the extra is absent
    with pytest.raises(UserError, match=r"^frechet: features=inception needs torch-fidelity \(pip install "
                                        r"'mdlm-dmmd\[images\]' with a torchvision built for your torch\)"):
        fid(tokens_of(images(n=4)), data_config=config)


# ----------------------------------------------------------------------------- Inception


@pytest.fixture
def fidelity(monkeypatch):
    """torch_fidelity importable: as installed, or with a torchvision stub where torchvision cannot load."""
    try:
        importlib.import_module("torch_fidelity")
        return
    except Exception:  # noqa: BLE001 - torchvision missing or built for another torch
        pass
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith(("torchvision.", "torch_fidelity"))]:
        monkeypatch.delitem(sys.modules, name)
    stub = {name: types.ModuleType(name) for name in
            ("torchvision", "torchvision.datasets", "torchvision.transforms", "torchvision.transforms.functional")}
    stub["torchvision"].__path__ = stub["torchvision.transforms"].__path__ = []
    stub["torchvision.datasets"].CIFAR10 = stub["torchvision.datasets"].STL10 = stub["torchvision.datasets"].CIFAR100 = object
    for name, module in stub.items():
        monkeypatch.setitem(sys.modules, name, module)
    try:
        importlib.import_module("torch_fidelity")
    except ImportError as err:
        pytest.skip(f"torch-fidelity cannot be imported ({err}); it comes with the [images] extra")


def test_frechet_distance_equals_torch_fidelitys_fid_of_the_same_statistics(fidelity):
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((300, 16)), rng.standard_normal((300, 16)) @ rng.standard_normal((16, 16)) + 0.5
    (mu1, sigma1), (mu2, sigma2) = stats(a), stats(b)
    theirs = fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2}, False)["frechet_inception_distance"]
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(theirs, rel=1e-9)


@pytest.fixture
def random_inception_weights(fidelity, tmp_path):
    """A weights file of torch-fidelity's Inception with random values (the real ones need a download)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    original = FeatureExtractorInceptionV3.load_state_dict
    FeatureExtractorInceptionV3.load_state_dict = lambda self, state, *a, **k: None
    try:
        torch.manual_seed(0)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    finally:
        FeatureExtractorInceptionV3.load_state_dict = original
    path = tmp_path / "random_inception.pth"
    torch.save(net.state_dict(), path)
    return path


def test_inception_features_are_torch_fidelitys_pool3_of_the_images(data, random_inception_weights):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    config, _ = data
    array = images(n=6)  # 5 train images: Inception at 299 x 299 costs ~0.3 s per image here
    np.save(config["path"], array)
    generated = images(n=2, seed=1)
    result = fid(tokens_of(generated), data_config=config, inception_weights=str(random_inception_weights))
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                      feature_extractor_weights_path=str(random_inception_weights))
    with torch.no_grad():  # uint8 NCHW, permuted by hand from the [N, H, W, C] arrays
        feats = lambda a: net(torch.from_numpy(a).permute(0, 3, 1, 2).contiguous())[0].double().numpy()  # noqa: E731
    expected = frechet_distance(*stats(feats(generated)), *stats(feats(train_images(config, array))))
    assert result["value"] == pytest.approx(expected, rel=1e-6)
    space = result["spaces"]["inception"]
    assert space["num_features"] == 2048 and space["weights"] == str(random_inception_weights)
    assert result["num_samples"] == 2 and result["features"] == "inception"


def test_missing_inception_weights_offline_is_one_line(data, monkeypatch, tmp_path, fidelity):
    config, _ = data
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(inception.ENV, raising=False)
    with pytest.raises(UserError, match=r"^frechet: the Inception weights are not on this machine and HF_HUB_OFFLINE "
                                        r"is set; download https://.*weights-inception-2015-12-05-6726825d\.pth and "
                                        r"pass eval\.metric_options\.fid\.inception_weights=PATH"):
        fid(tokens_of(images(n=4)), data_config=config)
    with pytest.raises(UserError, match=r"^frechet: inception_weights '.*nowhere\.pth' does not exist; download"):
        fid(tokens_of(images(n=4)), data_config=config, inception_weights=str(tmp_path / "nowhere.pth"))


@pytest.mark.skipif(not os.environ.get(inception.ENV), reason=f"the real Inception weights are not here "
                    f"(set {inception.ENV} to the downloaded {inception.WEIGHTS_FILE})")
def test_real_inception_weights(data, fidelity):
    config, _ = data
    path = inception.weights_path()
    # torch hub names the file by the first 8 hex digits of its sha256
    assert inception._sha256(str(path)).startswith("6726825d")
    result = fid(tokens_of(images(n=8, seed=1)), data_config=config)
    assert math.isfinite(result["value"]) and result["spaces"]["inception"]["num_features"] == 2048


def test_check_ready_runs_before_any_samples_exist(fidelity, tmp_path, monkeypatch):
    from mdlm_dmmd.metrics import frechet

    monkeypatch.delenv(inception.ENV, raising=False)
    frechet.frechet.check_ready()  # the digits spaces need nothing in advance
    fid.check_ready(features="random_conv")
    with pytest.raises(UserError, match=r"^frechet: inception_weights '.*no\.pth' does not exist"):
        fid.check_ready(inception_weights=str(tmp_path / "no.pth"))
    with pytest.raises(UserError, match="^frechet: unknown eval.metric_options.fid.features 'vgg'"):
        fid.check_ready(features="vgg")


def test_unknown_options_are_refused_naming_the_metric(data):
    from mdlm_dmmd.metrics import frechet

    config, _ = data
    with pytest.raises(UserError, match=r"^frechet: unknown eval\.metric_options\.fid key\(s\) inception_weight; "
                                        r"accepted: reference, data_config, num_bootstrap, .*inception_weights$"):
        fid.check_ready(inception_weight="/w.pth")
    with pytest.raises(UserError, match=r"^frechet: unknown eval\.metric_options\.frechet key\(s\) bootstrap;"):
        frechet.frechet(tokens_of(images(n=4)), data_config=config, features="random_conv", bootstrap=3)


def test_one_statistics_file_serves_one_feature_space(data, tmp_path):
    config, _ = data
    with pytest.raises(UserError, match=r"^frechet: eval\.metric_options\.fid\.reference_stats names one statistics "
                                        r"file, but features lists 2 feature spaces;"):
        fid(tokens_of(images(n=4)), data_config=config, features=["random_conv", "inception"],
            reference_stats=str(tmp_path / "s.npz"))


def test_bad_feature_options_are_one_line_errors(data):
    config, _ = data
    with pytest.raises(UserError, match=r"^frechet: feature_device must be auto, cpu or cuda\[:N\], got 'gpu0'$"):
        fid(tokens_of(images(n=4)), data_config=config, features="random_conv", feature_device="gpu0")
    with pytest.raises(UserError, match=r"^frechet: feature_batch_size must be a positive int, got 0$"):
        fid(tokens_of(images(n=4)), data_config=config, features="random_conv", feature_batch_size=0)


class ChannelMeansA(ChannelMeans):
    name = "channel_means_a"

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
    array = images()
    np.save(tmp_path / "x.npy", array)
    return {"name": "cifar10_pixels", "source": "npy", "path": str(tmp_path / "x.npy"), "valid_fraction": 0.25,
            "split_seed": 0}, array


def test_fid_against_the_valid_split_uses_the_valid_images(npy_data):
    config, array = npy_data
    generated = images(n=10, seed=1)
    train, valid = split_images(config, array)
    assert len(valid) == 10
    out = fid(tokens_of(generated), data_config=config, features="channel_means_a", reference="valid")
    expected = frechet_distance(*stats(generated.mean(axis=(1, 2))), *stats(valid.mean(axis=(1, 2))))
    assert out["value"] == pytest.approx(expected, rel=1e-10) and out["reference"] == "valid"
    against_train = frechet_distance(*stats(generated.mean(axis=(1, 2))), *stats(train.mean(axis=(1, 2))))
    assert abs(expected - against_train) > 1e-3 * expected  # the check can tell the splits apart


def test_fid_reference_is_the_whole_train_split_whatever_the_train_shard(npy_data):
    config, array = npy_data
    generated = images(n=10, seed=1)
    train, _ = split_images(config, array)
    expected = frechet_distance(*stats(generated.mean(axis=(1, 2))), *stats(train.mean(axis=(1, 2))))
    for shard in (None, [0, 2], [1, 3]):
        out = fid(tokens_of(generated), data_config=config | {"train_shard": shard}, features="channel_means_a")
        assert out["value"] == pytest.approx(expected, rel=1e-10), shard


def test_statistics_file_of_another_extractor_or_other_data_is_refused(npy_data, tmp_path):
    config, array = npy_data
    generated = tokens_of(images(n=10, seed=1))
    path = tmp_path / "stats.npz"
    fid(generated, data_config=config, features="channel_means_a", reference_stats=str(path))
    with pytest.raises(UserError, match=r"^frechet: reference_stats .* computed with feature extractor "):
        fid(generated, data_config=config, features="channel_means_b", reference_stats=str(path))
    other = images(seed=7)  # same shape, same count, other pixels
    np.save(tmp_path / "y.npy", other)
    with pytest.raises(UserError, match=r"^frechet: reference_stats .* computed with data "):
        fid(generated, data_config=config | {"path": str(tmp_path / "y.npy")}, features="channel_means_a",
            reference_stats=str(path))
