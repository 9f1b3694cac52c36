"""Built-in image datasets, the image folder reader and ImageDataModule."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import data.emoji as emoji_mod
from data.emoji import Emoji
from data.errors import MissingDataError
from data.fashion_mnist import FashionMNIST
from data.image_array import to_unit_range
from data.image_folder import ImageFolder
from data.images import ImageDataModule, ToFloat


@pytest.fixture(scope="module")
def fmnist() -> dict[str, FashionMNIST]:
    return {"train": FashionMNIST(split="train"), "test": FashionMNIST(split="test")}


def test_fashion_mnist_full_splits_with_labels(fmnist):
    train, test = fmnist["train"], fmnist["test"]
    assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
    for ds in (train, test):
        assert ds.images.dtype == np.uint8 and ds.labels.dtype == np.int64
        assert ds.labels.min() == 0 and ds.labels.max() == 9
        assert np.bincount(ds.labels).tolist() == [len(ds) // 10] * 10  # Fashion-MNIST is balanced
    x = to_unit_range(torch.from_numpy(train.images[:1000]))
    assert x.min() == -1.0 and x.max() == 1.0
    item = test[0]
    assert item["x"].shape == (1, 28, 28) and item["label"].dtype == torch.long


def test_fashion_mnist_missing_files_name_package_and_root(tmp_path):
    with pytest.raises(MissingDataError) as err:
        FashionMNIST(root=tmp_path)
    msg = str(err.value)
    assert "apt-get install -y dataset-fashion-mnist" in msg and "data.params.root" in msg
    assert str(tmp_path) in msg and isinstance(err.value, FileNotFoundError)


def test_emoji_decodes_once_and_reuses_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENFORGE_CACHE", str(tmp_path))
    t0 = time.perf_counter()
    first = Emoji(size=32)
    cold = time.perf_counter() - t0
    assert first.images.shape[1:] == (32, 32, 3) and len(first) > 3000 and first.labels is None
    flat = first.images.reshape(len(first), -1)
    assert len(np.unique(flat, axis=0)) == len(first), "identical bitmaps must be de-duplicated"
    # Composited on white: corners of most emoji are pure white background, never transparent black.
    assert (first.images[:, 0, 0] == 255).all(axis=1).mean() > 0.5
    cached = list(tmp_path.glob("emoji-*.npy"))
    assert len(cached) == 1 and not list(tmp_path.glob(".*tmp"))

    def no_decode(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(emoji_mod, "decode_emoji", no_decode)
    t0 = time.perf_counter()
    second = Emoji(size=32)
    warm = time.perf_counter() - t0
    np.testing.assert_array_equal(first.images, second.images)
    assert warm < cold
    with pytest.raises(AssertionError, match="cache"):  # a different size is a different cache entry
        Emoji(size=16)


def test_emoji_missing_font_names_package(tmp_path):
    with pytest.raises(MissingDataError, match="apt-get install -y fonts-noto-color-emoji"):
        Emoji(root=tmp_path, cache_dir=tmp_path)


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture()
def image_tree(tmp_path):
    """root/cats/*.png, root/dogs/deep/nested/*.jpg (recursion), one corrupt file, one non-image file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for i in range(6):
        _save(root / "cats" / f"c{i}.png", rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    for i in range(4):
        pixels = rng.integers(0, 256, (40, 24, 3), dtype=np.uint8)
        _save(root / "dogs" / "deep" / "nested" / f"d{i}.jpg", pixels)
    (root / "dogs" / "broken.png").write_bytes(b"\x89PNG not really a png")
    (root / "cats" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_recursive_labels_and_one_warning(image_tree):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageFolder(image_tree, size=16)
    skipped = [w for w in caught if "unreadable" in str(w.message)]
    assert len(skipped) == 1 and "1 unreadable" in str(skipped[0].message)
    assert "broken.png" in str(skipped[0].message)
    assert ds.images.shape == (10, 16, 16, 3) and ds.images.dtype == np.uint8
    assert ds.classes == ["cats", "dogs"] and ds.labels.tolist() == [0] * 6 + [1] * 4
    assert ds.skipped == [str(image_tree / "dogs" / "broken.png")]


def test_image_folder_centre_crop_and_alpha_on_white(tmp_path):
    stripes = np.zeros((20, 60, 3), np.uint8)
    stripes[:, :20, 0] = 255
    stripes[:, 20:40, 1] = 255
    stripes[:, 40:, 2] = 255
    _save(tmp_path / "stripes.png", stripes)
    clear = np.zeros((8, 8, 4), np.uint8)  # fully transparent black
    _save(tmp_path / "clear.png", clear)
    ds = ImageFolder(tmp_path, size=16)
    assert ds.labels is None  # images directly in root: no classes
    by_name = dict(zip([p.rsplit("/", 1)[-1] for p in ds.files], ds.images))
    centre = by_name["stripes.png"].astype(int)
    assert centre[:, 3:13, 1].min() > 200 and centre[:, 3:13, 0].max() < 40 and centre[:, 3:13, 2].max() < 40
    assert (by_name["clear.png"] == 255).all()


def test_image_folder_missing_and_empty_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        ImageFolder(tmp_path / "nope")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=f"{empty}.*no images"):
        ImageFolder(empty)
    with pytest.raises(ValueError, match="needs root"):
        ImageDataModule("folder")


def test_folder_datamodule_split_is_deterministic_by_seed(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(40):
        _save(tmp_path / f"{i:02d}.png", rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))

    def split(seed):
        dm = ImageDataModule("folder", root=str(tmp_path), size=8, val_fraction=0.25, seed=seed)
        dm.setup()
        train, val = (dm.split_dataset(s).source_indices.tolist() for s in ("train", "val"))
        return dm, train, val

    dm, train_a, val_a = split(0)
    _, train_b, val_b = split(0)
    _, train_c, val_c = split(1)
    assert (train_a, val_a) == (train_b, val_b) and val_a != val_c
    assert len(val_a) == 10 and sorted(train_a + val_a) == list(range(40))
    assert dm.image_shape == (3, 8, 8) and dm.num_classes is None
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"x"} and batch["x"].shape == (10, 3, 8, 8)


def test_fashion_datamodule_limits_native_pixels_and_unshuffled_splits(fmnist):
    dm = ImageDataModule("fashion_mnist", batch_size=32, limit_train=100, limit_val=40)
    dm.setup()
    assert dm.image_shape == (1, 28, 28) and dm.num_classes == 10
    assert len(dm.split_dataset("train")) == 100 and len(dm.split_dataset("val")) == 40
    assert sum(len(b["x"]) for b in dm.train_dataloader()) == 100
    assert len(dm.val_dataloader()) == 2  # 40 items / 32

    # The val split is the official test split; at 28×28 pixels are untouched, only rescaled to [-1, 1].
    first, again = list(dm.split_dataloader("val")), list(dm.split_dataloader("val"))
    idx = torch.cat([b["index"] for b in first])
    assert idx.tolist() == list(range(40))
    positions = dm.split_dataset("val").source_indices
    raw = torch.from_numpy(fmnist["test"].images[positions.numpy()]).permute(0, 3, 1, 2)
    x = torch.cat([b["x"] for b in first])
    torch.testing.assert_close(x, to_unit_range(raw), rtol=0, atol=0)
    labels = torch.cat([b["label"] for b in first])
    assert torch.equal(labels, torch.from_numpy(fmnist["test"].labels[positions]))
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(first, again))
    assert [len(loader.dataset) for loader in dm.predict_dataloader()] == [100, 40]

    # A different seed picks a different subset.
    other = ImageDataModule("fashion_mnist", limit_train=100, seed=3)
    other.setup()
    chosen = dm.split_dataset("train").source_indices
    assert not torch.equal(other.split_dataset("train").source_indices, chosen)


def test_datamodule_resize_channels_and_hflip():
    dm = ImageDataModule("fashion_mnist", size=32, channels=3, batch_size=64, limit_train=64, hflip=True)
    dm.setup()
    assert dm.image_shape == (3, 32, 32)
    x = next(iter(dm.train_dataloader()))["x"]
    assert x.shape == (64, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # grey replicated to RGB
    assert next(iter(dm.split_dataloader("train")))["x"].shape == (64, 3, 32, 32)

    # The collate mirrors each image independently with p=0.5: each output is its source or its mirror.
    src = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8)
    torch.manual_seed(0)
    out = ToFloat(channels=1, hflip=True)({"x": src})["x"]
    plain, mirrored = to_unit_range(src), to_unit_range(src.flip(-1))
    same = (out == plain).flatten(1).all(1)
    flipped = (out == mirrored).flatten(1).all(1)
    assert (same | flipped).all() and 10 < flipped.sum() < 54
