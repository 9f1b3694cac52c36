"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (IDX files, MIT licence).

The whole set is 30 MB gzipped; decompressing and viewing it with ``np.frombuffer`` takes a fraction
of a second, so there is no cache: the package files are the cache.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from data.errors import missing_data
from data.image_array import ImageArrayDataset

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
INSTALL = "apt-get install -y dataset-fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_PREFIX = {"train": "train", "test": "t10k"}
# IDX magic: two zero bytes, a type code (0x08 = unsigned byte) and the number of dimensions.
_UBYTE = 0x08


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or not) of unsigned bytes into an array of its stated shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    if data[2] != _UBYTE:
        raise ValueError(f"{path}: IDX type 0x{data[2]:02x} is not unsigned byte (0x08)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    count = int(np.prod(shape))
    if len(data) - offset != count:
        raise ValueError(f"{path}: header says {shape} ({count} bytes) but holds {len(data) - offset} bytes")
    # bytearray: a writable buffer, so torch.from_numpy on these arrays needs no copy and gives no warning.
    return np.frombuffer(bytearray(data), dtype=np.uint8, offset=offset).reshape(shape)


class FashionMNIST(ImageArrayDataset):
    """The 60k training or 10k test images, (N, 28, 28, 1) uint8, with labels 0..9 (see ``CLASSES``)."""

    def __init__(self, root: str | os.PathLike | None = None, split: str = "train") -> None:
        if split not in _PREFIX:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        folder = Path(root if root is not None else DEFAULT_ROOT)
        files = {}
        for kind, idx in (("images", 3), ("labels", 1)):
            name = f"{_PREFIX[split]}-{kind}-idx{idx}-ubyte"
            candidates = [folder / f"{name}.gz", folder / name]
            found = next((p for p in candidates if p.is_file()), None)
            if found is None:
                raise missing_data(f"Fashion-MNIST file {name}.gz", folder, INSTALL)
            files[kind] = found
        images = read_idx(files["images"])
        labels = read_idx(files["labels"])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"Fashion-MNIST files in {folder} disagree: images {images.shape}, labels {labels.shape}"
            )
        super().__init__(images[..., None], labels.astype(np.int64), CLASSES)
        self.root = str(folder)
        self.split = split
