"""sklearn digits as 64-token images, their split, and the PNG grid writer."""

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from mdlm_dmmd.data import build_data
from mdlm_dmmd.data.images import digits_arrays, save_image_grid
from mdlm_dmmd.errors import UserError


def _sorted_rows(x):
    return x[np.lexsort(x.T[::-1])]


def test_digits_bundle():
    bundle = build_data({"name": "digits"}, 64)
    assert (bundle.vocab_size, bundle.modality, bundle.image_shape) == (17, "image", (8, 8))
    assert bundle.tokenizer is None and bundle.bos_id is None and bundle.eos_id is None
    assert (len(bundle.train), len(bundle.valid)) == (1617, 180)
    item = bundle.train[0]
    assert set(item) == {"input_ids"}
    assert item["input_ids"].shape == (64,) and item["input_ids"].dtype == torch.long
    all_train = torch.stack([bundle.train[i]["input_ids"] for i in range(len(bundle.train))])
    assert all_train.min() == 0 and all_train.max() == 16
    text = bundle.decode(item["input_ids"])
    assert len(text) == 1 and len(text[0].splitlines()) == 8


def test_digits_split_deterministic_disjoint_and_complete():
    train, y_train = digits_arrays("train")
    valid, y_valid = digits_arrays("valid")
    everything, y_all = digits_arrays("all")
    assert train.shape == (1617, 64) and valid.shape == (180, 64) and train.dtype == np.int64
    np.testing.assert_array_equal(digits_arrays("valid")[0], valid)
    # Together the two splits are exactly the dataset (as a multiset of rows, with labels).
    both = np.concatenate([np.c_[train, y_train], np.c_[valid, y_valid]])
    np.testing.assert_array_equal(_sorted_rows(both), _sorted_rows(np.c_[everything, y_all]))
    assert digits_arrays("valid", split_seed=1)[0].tolist() != valid.tolist()
    bundle = build_data({"name": "digits"}, 64)
    np.testing.assert_array_equal(bundle.valid[0]["input_ids"].numpy(), valid[0])


def test_digits_length_error():
    with pytest.raises(UserError, match="^model.length must be 64 for data=digits, got 128$"):
        build_data({"name": "digits"}, 128)


def test_image_grid_png(tmp_path):
    tokens = torch.zeros(10, 64, dtype=torch.long)
    tokens[0, 0] = 16   # full ink
    tokens[1, 0] = 17   # a mask id left in a sample
    path = save_image_grid(tokens, tmp_path / "sub" / "samples.png", nrow=5, scale=4)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.shape[:2] == ((2 * 9 + 1) * 4, (5 * 9 + 1) * 4)
    top_left = image[4, 4, :3]      # pixel (0, 0) of image 0: black
    np.testing.assert_allclose(top_left, 0.0, atol=1e-6)
    second = image[4, 4 + 9 * 4, :3]  # pixel (0, 0) of image 1: red
    np.testing.assert_allclose(second, [1.0, 0.0, 0.0], atol=1e-6)
    blank = image[8, 8, :3]         # value 0: white
    np.testing.assert_allclose(blank, 1.0, atol=1e-6)
    with pytest.raises(UserError, match=r"shape \[N, 64\]"):
        save_image_grid(torch.zeros(3, 10), tmp_path / "x.png")
