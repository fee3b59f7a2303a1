"""sklearn digits as 64-token images, their split, image shapes (H, W, C), the grid writer for
grey and RGB images, and the bundle's sample files."""

import numpy as np
import pytest
import torch
from matplotlib.image import imread, imsave

from mdlm_dmmd.data import DataBundle, TokenDataset, build_data, image_shape_of
from mdlm_dmmd.data.images import digits_arrays, image_grid, save_image_grid
from mdlm_dmmd.data.tokenizers import CharTokenizer
from mdlm_dmmd.errors import UserError


def _sorted_rows(x):
    return x[np.lexsort(x.T[::-1])]


def test_digits_bundle():
    bundle = build_data({"name": "digits"}, 64)
    assert (bundle.vocab_size, bundle.modality, bundle.image_shape) == (17, "image", (8, 8, 1))
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
    assert len(digits_arrays("train", valid_fraction=0.9999)[0]) == 1  # never an empty split


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


# ----------------------------------------------------------------------------- image shapes


def test_image_shape_is_h_w_c_and_the_older_h_w_means_grey():
    assert image_shape_of((8, 8, 1)) == (8, 8, 1)
    assert image_shape_of([8, 8]) == (8, 8, 1)  # a checkpoint written before channels existed
    assert image_shape_of([32, 32, 3]) == (32, 32, 3)
    assert image_shape_of(np.array([4, 6])) == (4, 6, 1)
    assert image_shape_of(None) is None
    assert DataBundle(TokenDataset(torch.zeros(2, 4, dtype=torch.long)), TokenDataset(torch.zeros(1, 4, dtype=torch.long)),
                      vocab_size=3, tokenizer=None, modality="image", bos_id=None, eos_id=None,
                      image_shape=[2, 2]).image_shape == (2, 2, 1)


@pytest.mark.parametrize("value", [[8], [8, 8, 1, 1], [8, 0, 1], [8, -8], [8.0, 8.0], "88", 8])
def test_bad_image_shape_is_one_line_naming_the_key(value):
    with pytest.raises(UserError, match=r"^vocab.image_shape must be \(H, W, C\) \(or the older \(H, W\), read as "
                                        r"C = 1\) of positive ints, got .*$"):
        image_shape_of(value, "vocab.image_shape")


# ----------------------------------------------------------------------------- grids


def test_grey_grid_is_the_same_for_h_w_and_h_w_1():
    tokens = torch.randint(0, 18, (5, 64), generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(image_grid(tokens, image_shape=(8, 8)), image_grid(tokens, image_shape=(8, 8, 1)))
    np.testing.assert_array_equal(image_grid(tokens, image_shape=(8, 8, 1), nrow=3, scale=2), _old_image_grid(tokens, 3, 16, 2))


def test_rgb_grid_shape_and_pixel_values():
    # Two 2x3 RGB images, 255 levels; token index = (row * W + col) * C + channel.
    images = np.zeros((2, 2, 3, 3), dtype=np.int64)
    images[0, 0, 0] = (255, 0, 0)      # red
    images[0, 0, 1] = (0, 255, 0)      # green
    images[0, 1, 2] = (0, 0, 255)      # blue
    images[1, 0, 0] = (51, 102, 255)   # 0.2, 0.4, 1.0
    images[1, 1, 1] = (255, 256, 10)   # a mask id (256) in one channel: the whole pixel red
    tokens = torch.from_numpy(images.reshape(2, 18))
    grid = image_grid(tokens, nrow=2, max_value=255, image_shape=(2, 3, 3))
    assert grid.shape == (1 * (2 + 1) + 1, 2 * (3 + 1) + 1, 3)  # one pixel of frame around each image
    np.testing.assert_array_equal(grid[0], 0.75)  # the frame
    np.testing.assert_array_equal(grid[:, 0], 0.75)
    np.testing.assert_array_equal(grid[:, 4], 0.75)
    first = grid[1:3, 1:4]  # image 0
    np.testing.assert_array_equal(first[0, 0], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(first[0, 1], [0.0, 1.0, 0.0])
    np.testing.assert_array_equal(first[1, 2], [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(first[1, 0], [0.0, 0.0, 0.0])  # zeros are black in colour
    second = grid[1:3, 5:8]  # image 1
    np.testing.assert_allclose(second[0, 0], [0.2, 0.4, 1.0], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(second[1, 1], [1.0, 0.0, 0.0])
    big = image_grid(tokens, nrow=1, max_value=255, image_shape=(2, 3, 3), scale=3)
    assert big.shape == ((2 * 3 + 1) * 3, (3 + 1 + 1) * 3, 3)
    np.testing.assert_array_equal(big[3:6, 3:6], np.broadcast_to([1.0, 0.0, 0.0], (3, 3, 3)))


def test_rgb_png_round_trip(tmp_path):
    tokens = torch.zeros(3, 2 * 2 * 3, dtype=torch.long)
    tokens[0, :3] = torch.tensor([255, 0, 255])  # magenta pixel (0, 0) of image 0
    path = save_image_grid(tokens, tmp_path / "rgb.png", max_value=255, image_shape=(2, 2, 3), scale=2)
    image = imread(path)
    assert image.shape[:2] == ((2 + 1) * 2 + 2, (3 * 3 + 1) * 2)
    np.testing.assert_allclose(image[2, 2, :3], [1.0, 0.0, 1.0], atol=1e-6)


@pytest.mark.parametrize("shape, tokens, match", [
    ((8, 8, 2), torch.zeros(2, 128, dtype=torch.long), r"^image_shape: a sample grid draws C = 1 \(grey\) or 3 \(RGB\) "
                                                      r"channels, got C = 2 in \(8, 8, 2\)$"),
    ((8, 8, 3), torch.zeros(2, 64, dtype=torch.long), r"^save_image_grid needs tokens of shape \[N, 192\], got \[2, 64\]$"),
])
def test_grid_errors(shape, tokens, match):
    with pytest.raises(UserError, match=match):
        image_grid(tokens, image_shape=shape)


# ----------------------------------------------------------------------------- the bundle's sample files


def _old_image_grid(tokens, nrow, max_value, scale):
    """`image_grid` as it was before image shapes had channels (8x8 grey only), frozen here."""
    tokens = np.asarray(torch.as_tensor(tokens).cpu(), dtype=np.int64)
    h, w = 8, 8
    n, ncol = len(tokens), max(1, min(nrow, len(tokens)))
    nrows = -(-n // ncol)
    canvas = np.full((nrows * (h + 1) + 1, ncol * (w + 1) + 1, 3), 0.75)
    for i, image in enumerate(tokens.reshape(n, h, w)):
        gray = 1.0 - np.clip(image, 0, max_value) / max_value
        rgb = np.repeat(gray[..., None], 3, axis=-1)
        rgb[image > max_value] = (1.0, 0.0, 0.0)
        r, c = divmod(i, ncol)
        canvas[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + c * (w + 1): 1 + c * (w + 1) + w] = rgb
    return np.repeat(np.repeat(canvas, scale, axis=0), scale, axis=1)


def _old_write_samples(run_dir, samples, data):
    """`run.write_samples` before the bundle wrote its own samples (with the old grid), frozen here."""
    torch.save(samples.cpu(), run_dir / "samples.pt")
    if data.modality == "image":
        imsave(run_dir / "samples.png", _old_image_grid(samples[:64].cpu(), 8, data.vocab_size - 1, 4), format="png")
        return ["samples.pt", "samples.png"]
    (run_dir / "samples.txt").write_text("\n\n=====\n\n".join(data.decode(samples.cpu())), encoding="utf-8")
    return ["samples.pt", "samples.txt"]


def _text_bundle():
    rows = TokenDataset(torch.zeros(2, 6, dtype=torch.long))
    return DataBundle(rows, rows, vocab_size=27, tokenizer=CharTokenizer(), modality="text", bos_id=None, eos_id=None)


@pytest.mark.parametrize("kind", ["image", "text"])
def test_write_samples_writes_the_same_files_as_before(tmp_path, kind):
    if kind == "image":
        data = build_data({"name": "digits"}, 64)
        samples = torch.randint(0, 18, (70, 64), generator=torch.Generator().manual_seed(1))  # 17 = a mask id
    else:
        data = _text_bundle()
        samples = torch.randint(0, 28, (5, 6), generator=torch.Generator().manual_seed(1))
    (tmp_path / "new").mkdir()
    (tmp_path / "old").mkdir()
    written = data.write_samples(tmp_path / "new", samples)
    assert written == _old_write_samples(tmp_path / "old", samples, data)
    for name in written:
        assert (tmp_path / "new" / name).read_bytes() == (tmp_path / "old" / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == sorted(written)


def test_decode_grey_and_rgb():
    grey = build_data({"name": "digits"}, 64)
    assert grey.decode(torch.arange(64) % 17)[0].splitlines()[1] == "8 9 10 11 12 13 14 15"
    rows = TokenDataset(torch.zeros(2, 12, dtype=torch.long))
    rgb = DataBundle(rows, rows, vocab_size=256, tokenizer=None, modality="image", bos_id=None, eos_id=None,
                     image_shape=(2, 2, 3))
    assert rgb.decode(torch.arange(12)) == ["0,1,2 3,4,5\n6,7,8 9,10,11"]


def test_log_samples_goes_to_wandb_only(monkeypatch):
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    calls = []
    monkeypatch.setattr(WandbLogger, "log_image", lambda self, key, images, step=None: calls.append((key, images, step)))
    monkeypatch.setattr(WandbLogger, "log_text", lambda self, key, columns, data, step=None: calls.append((key, data, step)))
    wandb = object.__new__(WandbLogger)  # the methods above are all that is called
    digits = build_data({"name": "digits"}, 64)
    samples = torch.from_numpy(digits_arrays("valid")[0][:10])
    digits.log_samples(wandb, samples, step=7)
    (key, images, step), = calls
    assert key == "samples" and step == 7
    np.testing.assert_array_equal(images[0], _old_image_grid(samples, 8, 16, 4))
    calls.clear()
    text = _text_bundle()
    text.log_samples(wandb, torch.tensor([[1, 2, 0, 3]]), step=2)
    assert calls == [("samples", [["ab c"]], 2)]
    calls.clear()
    digits.log_samples(CSVLogger("unused"), samples, step=1)
    digits.log_samples(None, samples, step=1)
    assert calls == []


def test_sample_grid_is_for_images_only():
    with pytest.raises(UserError, match="^a sample grid needs image data; this data is text$"):
        _text_bundle().sample_grid(torch.zeros(1, 6, dtype=torch.long))
