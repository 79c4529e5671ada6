"""Reading images the one way every part of lisa_kit reads them.

``load_image`` accepts a path, a PIL image or an array and returns RGB ``uint8
(H, W, 3)``: EXIF orientation applied (as ``cv2.imread``, which LISA uses, does), every
PIL mode converted to RGB (greyscale, palette, RGBA composited on black like cv2, 16-bit,
CMYK), and anything undecodable reported as :class:`~lisa_kit.errors.ImageError` naming
the file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lisa_kit.errors import ImageError


def _to_rgb(img: Image.Image, where: str) -> np.ndarray:
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits rather than clip.
        a = np.asarray(img, dtype=np.float64)
        top = a.max() if a.size and a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a * (255.0 / top), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # cv2.imread drops alpha, keeping the stored colour; do the same.
        img = img.convert("RGBA")
        return np.ascontiguousarray(np.asarray(img)[..., :3])
    arr = np.asarray(img.convert("RGB"))
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"image has unusable shape {arr.shape}", path=where)
    return np.ascontiguousarray(arr)


def load_image(source) -> np.ndarray:
    """``source`` (path, ``PIL.Image`` or array) -> RGB ``uint8 (H, W, 3)``."""
    if isinstance(source, np.ndarray):
        a = source
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or 0 in a.shape[:2]:
            raise ImageError(f"an image array must be (H, W), (H, W, 3) or (H, W, 4); got {a.shape}")
        if a.shape[2] == 1:
            a = np.repeat(a, 3, axis=2)
        a = a[..., :3]
        if a.dtype != np.uint8:
            if np.issubdtype(a.dtype, np.floating) and a.size and float(np.nanmax(a)) <= 1.0:
                a = a * 255.0
            a = np.clip(np.nan_to_num(a), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(a)
    if isinstance(source, Image.Image):
        return _to_rgb(source, "<PIL image>")
    path = Path(source)
    if not path.is_file():
        raise ImageError("image file not found", path=path)
    try:
        with Image.open(path) as img:
            img.load()
            return _to_rgb(img, str(path))
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"cannot decode image: {e}", path=path) from e
