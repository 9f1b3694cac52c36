"""Any folder of images, searched recursively, as one in-memory uint8 array.

Each image is converted to RGB (transparency composited on white), its shorter side resized to
``size`` and centre-cropped to a square. Files that do not decode are skipped and reported in a
single warning (count plus an example), because one corrupt JPEG in 100k should neither stop a run
nor scroll 100 warnings past. Class labels come from first-level sub-folder names when asked (or,
by default, when every image sits inside such a sub-folder).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from data.image_array import ImageArrayDataset

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def list_images(root: Path) -> list[Path]:
    """Image files under ``root`` (any depth), by extension, in a stable sorted order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in filenames
                     if f.lower().endswith(EXTENSIONS) and not f.startswith("."))
    return sorted(found)


def load_square_rgb(path: Path, size: int) -> np.ndarray:
    """Decode one image to (size, size, 3) uint8: RGB on white, shorter side → size, centre crop."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im.seek(0)  # first frame of an animated GIF/WebP
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im = Image.alpha_composite(white, rgba)
        im = im.convert("RGB")
        w, h = im.size
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        if (new_w, new_h) != (w, h):
            im = im.resize((new_w, new_h), Image.Resampling.LANCZOS, reducing_gap=3.0)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        return np.asarray(im, dtype=np.uint8)


class ImageFolder(ImageArrayDataset):
    """Every readable image under ``root`` as (N, size, size, 3) uint8.

    ``labels``: True → the first-level sub-folder names are the classes (sorted; images directly in
    ``root`` are then an error); False → no labels; None (default) → labels exactly when no image
    sits directly in ``root`` (the usual ``root/<class>/<image>`` layout).
    """

    def __init__(self, root: str | os.PathLike, size: int = 64, labels: bool | None = None) -> None:
        folder = Path(root).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(
                f"image folder {folder} does not exist (set data.params.root to a folder of images)"
            )
        files = list_images(folder)
        if not files:
            raise ValueError(f"image folder {folder} holds no images with extensions {', '.join(EXTENSIONS)}")
        top = [p.relative_to(folder).parts for p in files]
        at_root = [p for p, parts in zip(files, top) if len(parts) == 1]
        if labels is None:
            labels = not at_root
        if labels and at_root:
            raise ValueError(
                f"labels from sub-folders were asked for, but {len(at_root)} images sit directly in {folder} "
                f"(e.g. {at_root[0]}); move them into a class folder or set labels=False"
            )

        images, kept = [], []
        failed: list[Path] = []
        for path in files:
            try:
                images.append(load_square_rgb(path, size))
                kept.append(path)
            except Exception:  # any decoder error means "unreadable"; reported once below
                failed.append(path)
        if failed:
            warnings.warn(f"skipped {len(failed)} unreadable image file(s) under {folder}, e.g. {failed[0]}",
                          stacklevel=2)
        if not images:
            raise ValueError(f"image folder {folder}: none of its {len(files)} image files could be read "
                             f"(e.g. {failed[0]})")

        classes = label_array = None
        if labels:
            names = [p.relative_to(folder).parts[0] for p in kept]
            classes = sorted({p.relative_to(folder).parts[0] for p in files})
            index = {c: i for i, c in enumerate(classes)}
            label_array = np.array([index[n] for n in names], dtype=np.int64)
        super().__init__(np.stack(images), label_array, classes)
        self.root = str(folder)
        self.size = int(size)
        self.files = [str(p) for p in kept]
        self.skipped = [str(p) for p in failed]
