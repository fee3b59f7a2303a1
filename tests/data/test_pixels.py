"""data=cifar10_pixels from local files (.npy, a PNG folder): token layout, split, crop, bad input.
The hub source needs network and is not run here."""

import numpy as np
import pytest
import torch
from PIL import Image

from mdlm_dmmd import cli
from mdlm_dmmd.data import build_data
from mdlm_dmmd.errors import UserError


def images(n=10, h=4, w=4, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def test_npy_images_become_channels_last_raster_tokens(tmp_path):
    array = images()
    np.save(tmp_path / "x.npy", array)
    bundle = build_data({"name": "cifar10_pixels", "source": "npy", "path": str(tmp_path / "x.npy"),
                         "valid_fraction": 0.2}, 48)
    assert (bundle.vocab_size, bundle.modality, bundle.image_shape) == (256, "image", (4, 4, 3))
    assert (len(bundle.train), len(bundle.valid)) == (8, 2)
    rows = {tuple(bundle.train[i]["input_ids"].tolist()) for i in range(8)} | \
        {tuple(bundle.valid[i]["input_ids"].tolist()) for i in range(2)}
    # token (y, x, c) of an image is at y·W·C + x·C + c, by hand
    by_hand = {tuple(int(image[y, x, ch]) for y in range(4) for x in range(4) for ch in range(3)) for image in array}
    assert rows == by_hand


def test_a_split_keeps_an_image_on_each_side(tmp_path):
    """3 images with valid_fraction 0.9: 2 validate, 1 trains (the cap of the text corpora's
    split; an empty train split was a reshape traceback)."""
    np.save(tmp_path / "x.npy", images(n=3))
    bundle = build_data({"name": "cifar10_pixels", "source": "npy", "path": str(tmp_path / "x.npy"),
                         "valid_fraction": 0.9}, 48)
    assert (len(bundle.train), len(bundle.valid)) == (1, 2)


def test_png_folder_and_centre_crop(tmp_path):
    array = images(n=4, h=6, w=6)
    for i, image in enumerate(array):
        (tmp_path / f"class{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(image).save(tmp_path / f"class{i % 2}" / f"{i}.png")
    bundle = build_data({"name": "cifar10_pixels", "source": "png", "path": str(tmp_path), "image_size": 2,
                         "valid_fraction": 0.25}, 12)
    assert bundle.image_shape == (2, 2, 3)
    crops = {tuple(image[2:4, 2:4].reshape(-1).tolist()) for image in array}  # the centre 2 x 2 of 6 x 6
    got = {tuple(bundle.train[i]["input_ids"].tolist()) for i in range(3)} | {tuple(bundle.valid[0]["input_ids"].tolist())}
    assert got == crops


@pytest.mark.parametrize("array, length, message", [
    (images(), 64, r"model.length \(64\) must equal the images' H·W·C = 4·4·3 = 48"),
    (images().astype(np.int64) + 1, 48, "pixel values must be in 0..255"),
    (images().astype(np.float32), 48, "pixel values must be integers 0..255"),
])
def test_bad_images_are_one_line_errors(tmp_path, array, length, message):
    np.save(tmp_path / "x.npy", array)
    with pytest.raises(UserError, match=message):
        build_data({"name": "cifar10_pixels", "source": "npy", "path": str(tmp_path / "x.npy")}, length)


def test_bad_source_path_and_crop(tmp_path):
    with pytest.raises(UserError, match="data.source must be one of hub, npy, png"):
        build_data({"name": "cifar10_pixels", "source": "tar"}, 48)
    with pytest.raises(UserError, match="does not exist"):
        build_data({"name": "cifar10_pixels", "source": "npy", "path": str(tmp_path / "none.npy")}, 48)
    np.save(tmp_path / "x.npy", images())
    with pytest.raises(UserError, match=r"data.image_size must be an int in \[1, 4\]"):
        build_data({"name": "cifar10_pixels", "source": "npy", "path": str(tmp_path / "x.npy"), "image_size": 5}, 75)


def test_the_hub_source_offline_is_a_one_line_error(tmp_path):
    """HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 (the test command's): no download is tried."""
    with pytest.raises(UserError, match=r"^data=cifar10_pixels with data.source=hub: load_dataset\('uoft-cs/cifar10'\) "
                                        r"from the hub failed: .*offline, use data.source=npy or png") as info:
        build_data({"name": "cifar10_pixels", "cache_dir": str(tmp_path)}, 3072)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="data.path .* does not exist"):
        build_data({"name": "cifar10_pixels", "path": str(tmp_path / "missing")}, 3072)


def test_a_save_to_disk_copy_in_the_hub_layout_loads_offline(tmp_path):
    """The hub source's code path, offline: a `datasets.save_to_disk` DatasetDict with CIFAR-10's
    layout (splits train and test, a PIL image column `img`); train for training, test for valid."""
    import datasets

    train, test = images(n=5, seed=1), images(n=3, seed=2)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    split = lambda a: datasets.Dataset.from_dict(  # noqa: E731
        {"img": [Image.fromarray(x) for x in a], "label": [0] * len(a)}, features=features)
    datasets.DatasetDict({"train": split(train), "test": split(test)}).save_to_disk(str(tmp_path / "cifar"))
    bundle = build_data({"name": "cifar10_pixels", "source": "hub", "path": str(tmp_path / "cifar")}, 48)
    assert bundle.image_shape == (4, 4, 3) and (len(bundle.train), len(bundle.valid)) == (5, 3)
    assert torch.equal(bundle.train.input_ids, torch.from_numpy(train.reshape(5, -1).astype(np.int64)))
    assert torch.equal(bundle.valid.input_ids, torch.from_numpy(test.reshape(3, -1).astype(np.int64)))


def test_a_masked_teacher_trains_on_pixel_tokens_through_the_cli(tmp_path, capsys):
    np.save(tmp_path / "x.npy", images(n=40))
    run = tmp_path / "run"
    assert cli.main(["debug=cpu", "data=cifar10_pixels", "data.source=npy", f"data.path={tmp_path / 'x.npy'}",
                     "model.length=48", "loader.batch_size=4", "loader.eval_batch_size=4", "trainer.max_steps=2",
                     "sampling.num_samples=2", f"run_dir={run}"]) == 0
    samples = torch.load(run / "samples.pt", weights_only=True)
    assert samples.shape == (2, 48) and int(samples.max()) <= 256  # 256 = the mask, if any is left
    assert (run / "samples.png").is_file()
    assert cli.main(["debug=cpu", "data=cifar10_pixels", "data.source=npy", f"data.path={tmp_path / 'x.npy'}",
                     f"run_dir={tmp_path / 'bad'}"]) == 2  # natural length 3072 != 4·4·3
    assert "model.length (3072) must equal the images' H·W·C = 4·4·3 = 48" in capsys.readouterr().err


def test_centre_crop_of_a_wide_image(tmp_path):
    """4 x 6 cropped to 2: rows 1..2 ((4 - 2) // 2 = 1) and columns 2..3 ((6 - 2) // 2 = 2)."""
    array = images(n=4, h=4, w=6)
    np.save(tmp_path / "x.npy", array)
    bundle = build_data({"name": "cifar10_pixels", "source": "npy", "path": str(tmp_path / "x.npy"),
                         "image_size": 2, "valid_fraction": 0.25}, 12)
    got = {tuple(row.tolist()) for row in torch.cat([bundle.train.input_ids, bundle.valid.input_ids])}
    assert got == {tuple(image[1:3, 2:4].ravel().tolist()) for image in array}


def test_greyscale_npy_has_one_channel(tmp_path):
    """A 3-dim [N, H, W] array is greyscale: image_shape (H, W, 1), rows the raster of each image."""
    array = images(n=4, h=4, w=6, c=1)[..., 0]
    np.save(tmp_path / "x.npy", array)
    bundle = build_data({"name": "cifar10_pixels", "source": "npy", "path": str(tmp_path / "x.npy"),
                         "valid_fraction": 0.25}, 24)
    assert bundle.image_shape == (4, 6, 1)
    got = {tuple(row.tolist()) for row in torch.cat([bundle.train.input_ids, bundle.valid.input_ids])}
    assert got == {tuple(image.ravel().tolist()) for image in array}


def test_png_split_follows_split_seed_and_file_names(tmp_path):
    """8 PNGs whose first value is 10 · their number, written out of order: data.split_seed picks
    the validation images, and the training rows keep the sorted file names' order."""
    for i in (5, 2, 7, 0, 3, 6, 1, 4):
        image = np.zeros((2, 2, 3), dtype=np.uint8)
        image[0, 0, 0] = 10 * i
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    valids = set()
    for seed in range(4):
        bundle = build_data({"name": "cifar10_pixels", "source": "png", "path": str(tmp_path),
                             "valid_fraction": 0.25, "split_seed": seed}, 12)
        train, valid = bundle.train.input_ids[:, 0].tolist(), bundle.valid.input_ids[:, 0].tolist()
        assert len(valid) == 2 and sorted(train + valid) == [10 * i for i in range(8)]
        assert train == sorted(train)
        valids.add(frozenset(valid))
    assert len(valids) > 1
