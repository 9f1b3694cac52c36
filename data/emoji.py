"""Noto Color Emoji bitmaps from the Debian package ``fonts-noto-color-emoji``.

The font's CBDT table holds one PNG per emoji (136×128 RGBA). They are composited on white, padded to
a square (white) so no emoji is stretched, resized with Lanczos to ``size`` and de-duplicated (a few
glyphs share one bitmap). Decoding ~3.9k PNGs takes seconds, so the result is cached as one uint8
array keyed by the size and the font file's identity (see ``data.cache``).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np

from data.cache import cached_array, source_stamp
from data.errors import missing_data
from data.image_array import ImageArrayDataset

DEFAULT_ROOT = "/usr/share/fonts/truetype/noto"
FONT_FILE = "NotoColorEmoji.ttf"
INSTALL = "apt-get install -y fonts-noto-color-emoji"
# Bump when the decoding below changes, so old cache files are not reused.
_DECODE_VERSION = 1


def font_path(root: str | os.PathLike | None = None) -> Path:
    """The font file: ``root`` may be the font itself or the folder holding ``NotoColorEmoji.ttf``."""
    p = Path(root if root is not None else DEFAULT_ROOT)
    if p.is_dir():
        p = p / FONT_FILE
    if not p.is_file():
        raise missing_data(f"emoji font {FONT_FILE}", p, INSTALL)
    return p


def decode_emoji(path: str | os.PathLike, size: int) -> np.ndarray:
    """Decode, composite on white, square-pad, resize, de-duplicate every CBDT bitmap → (N, size, size, 3)."""
    from fontTools.ttLib import TTFont
    from PIL import Image

    font = TTFont(str(path), lazy=True)
    if "CBDT" not in font:
        raise ValueError(f"{path} has no CBDT table (not a colour bitmap emoji font)")
    strike = font["CBDT"].strikeData[0]
    seen_png: set[bytes] = set()
    seen_pixels: set[bytes] = set()
    out = []
    for bitmap in strike.values():  # the font's own order: deterministic for a given font file
        png = bytes(getattr(bitmap, "imageData", b""))
        if not png:
            continue
        digest = hashlib.sha1(png).digest()
        if digest in seen_png:
            continue
        seen_png.add(digest)
        rgba = Image.open(io.BytesIO(png)).convert("RGBA")
        side = max(rgba.size)
        canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
        canvas.alpha_composite(rgba, ((side - rgba.width) // 2, (side - rgba.height) // 2))
        rgb = canvas.convert("RGB")
        if side != size:
            rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
        pixels = np.asarray(rgb, dtype=np.uint8)
        key = hashlib.sha1(pixels.tobytes()).digest()  # different PNG bytes can still be the same picture
        if key in seen_pixels:
            continue
        seen_pixels.add(key)
        out.append(pixels)
    if not out:
        raise ValueError(f"{path}: no PNG bitmaps found in the CBDT table")
    return np.stack(out)


class Emoji(ImageArrayDataset):
    """All distinct Noto colour emoji as (N, size, size, 3) uint8 on white; no labels."""

    def __init__(self, root: str | os.PathLike | None = None, size: int = 64,
                 cache_dir: str | os.PathLike | None = None) -> None:
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        path = font_path(root)
        params = {"size": int(size), "font": source_stamp(path), "version": _DECODE_VERSION}
        images = cached_array("emoji", params, lambda: decode_emoji(path, int(size)), cache_dir)
        super().__init__(images)
        self.root = str(path)
        self.size = int(size)
