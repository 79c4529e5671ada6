"""Reading images: the one intake every part of lisa_kit (API, ``segment``, ``chat``, the
demo) goes through.

``load_image(source, limits)`` accepts a path, a PIL image or an array and returns RGB
``uint8 (H, W, 3)``:

* **Bounds first.** The size is checked against :class:`ImageLimits` before anything
  costly: a file's header size before its pixels are decoded, a PIL image's size before
  ``load()``, an array's shape before conversion. Too many pixels, or an aspect ratio so
  extreme that a component's resize would leave no row (SAM's longest side to 64 px of a
  200:1 strip) or would need gigabytes (CLIP's shortest side to 336 px of a 400000:1
  strip), raise :class:`~lisa_kit.errors.ImageSizeError` with the size and the limit.
  PIL's own decompression-bomb error and warning are reported the same way.
* **Decoding.** EXIF orientation applied (as ``cv2.imread``, which LISA uses, does);
  every PIL mode converted to RGB; alpha dropped keeping the stored colour (as cv2).
  Anything PIL fails on (corrupt, truncated — also a lazily opened PIL image whose file is
  cut short —, not an image) is an :class:`~lisa_kit.errors.ImageError` naming the file.
* **One value rule** for every source, arrays and PIL modes alike (:func:`to_uint8`):
  ``uint8`` as is; ``bool`` -> 0/255; 16-bit unsigned (``uint16`` arrays, 16-bit PNG/TIFF,
  PIL ``I;16``) -> the high byte ``v >> 8``, exactly what ``cv2.imread`` gives for a 16-bit
  file; other integers (PIL ``I``, ``int32``...) must already be 8-bit levels 0..255;
  floats (PIL ``F``) must be finite and are read as 0..1 when every value is in [0, 1],
  else as 0..255 levels (rounded). Values outside those ranges are refused, never clipped.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from lisa_kit.errors import ImageError, ImageSizeError

__all__ = ["ImageLimits", "DEFAULT_LIMITS", "load_image", "to_uint8"]

#: 64 Mpx (8192 x 8192; 192 MiB as RGB uint8): a 48 Mpx phone photo fits. Below PIL's own
#: decompression-bomb threshold (``Image.MAX_IMAGE_PIXELS``, ~89 Mpx), so with the
#: defaults lisa_kit's check, which names the limit, is the one that speaks.
DEFAULT_MAX_PIXELS = 1 << 26
#: Longest side / shortest side. A component that resizes one side to ``S`` px gives the
#: other ``S / ratio`` px; with ``ratio <= S`` that is at least one row whatever the
#: rounding. The smallest input side of the shipped recipes is 56 px (``lisa-tiny``'s CLIP
#: tower), so 32 leaves every component at least one row, while panoramas (up to ~10:1)
#: and long receipts pass.
DEFAULT_MAX_ASPECT = 32.0

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_EIGHT_BIT_TOP = 255
_SIXTEEN_TO_EIGHT_SHIFT = 8  # 16-bit -> 8-bit: keep the high byte (cv2.imread's conversion)


@dataclass(frozen=True)
class ImageLimits:
    """What the intake accepts: at most ``max_pixels`` pixels (H * W) and at most
    ``max_aspect`` for ``max(H, W) / min(H, W)``."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_aspect: float = DEFAULT_MAX_ASPECT

    def __post_init__(self):
        from lisa_kit.errors import InputError

        if not (isinstance(self.max_pixels, (int, np.integer)) and self.max_pixels >= 1):
            raise InputError(f"max_pixels must be a positive integer, got {self.max_pixels!r}")
        if not (isinstance(self.max_aspect, (int, float, np.number)) and np.isfinite(self.max_aspect)
                and self.max_aspect >= 1):
            raise InputError(f"max_aspect must be a finite number >= 1, got {self.max_aspect!r}")

    def check(self, height: int, width: int, where: str | None = None) -> None:
        """Raise :class:`ImageSizeError` unless an ``height x width`` image is within limits."""
        h, w = int(height), int(width)
        if h < 1 or w < 1:
            raise ImageError(f"the image is empty ({h}x{w} pixels)", path=where)
        if h * w > self.max_pixels:
            raise ImageSizeError(f"the image has {h}x{w} = {h * w} pixels, more than the limit of "
                                 f"{self.max_pixels} (raise max_pixels to accept it)",
                                 path=where, size=(h, w), limit=("max_pixels", self.max_pixels))
        ratio = max(h, w) / min(h, w)
        if ratio > self.max_aspect:
            raise ImageSizeError(f"the image is {h}x{w} pixels, an aspect ratio of {ratio:.4g}:1, beyond the limit "
                                 f"of {self.max_aspect:g}:1 (the model's resizing would leave no row or need "
                                 "far too much memory; crop the image)",
                                 path=where, size=(h, w), limit=("max_aspect", self.max_aspect))


DEFAULT_LIMITS = ImageLimits()


# -- values -------------------------------------------------------------------------
def to_uint8(a: np.ndarray, where: str | None = None) -> np.ndarray:
    """Values of any numeric dtype -> ``uint8`` by the module's one rule (see above)."""
    if a.dtype.byteorder not in "=|":  # big-endian data (PIL "I;16B"): native order first
        a = a.astype(a.dtype.newbyteorder("="))
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * np.uint8(_EIGHT_BIT_TOP)
    if a.dtype == np.uint16:
        return (a >> _SIXTEEN_TO_EIGHT_SHIFT).astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > _EIGHT_BIT_TOP:
            raise ImageError(f"{a.dtype} values span {lo}..{hi}; integer images other than uint16 must hold "
                             f"8-bit levels 0..{_EIGHT_BIT_TOP} (give 16-bit data as uint16)", path=where)
        return a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ImageError("the image holds NaN or infinite values", path=where)
        lo, hi = float(a.min()), float(a.max())
        if lo < 0 or hi > _EIGHT_BIT_TOP:
            raise ImageError(f"{a.dtype} values span {lo:g}..{hi:g}; float images must lie in [0, 1] "
                             f"or in [0, {_EIGHT_BIT_TOP}]", path=where)
        scale = _EIGHT_BIT_TOP if hi <= 1.0 else 1.0
        return np.rint(a.astype(np.float64) * scale).astype(np.uint8)
    raise ImageError(f"an image array of dtype {a.dtype} cannot be read as pixels", path=where)


def _array_to_rgb(a: np.ndarray, limits: ImageLimits, where: str | None) -> np.ndarray:
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
        raise ImageError(f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {a.shape}",
                         path=where)
    limits.check(a.shape[0], a.shape[1], where)
    if a.ndim == 2:
        a = a[..., None]
    a = to_uint8(a[..., :3], where)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a)


# -- PIL ----------------------------------------------------------------------------
def _pil_to_rgb(img: Image.Image, limits: ImageLimits, where: str | None) -> np.ndarray:
    """Bounds by the header size, then decode (lazily opened images load here)."""
    limits.check(img.size[1], img.size[0], where)
    try:
        with warnings.catch_warnings():
            # The size is checked above; a warning PIL still raises is about a limit the
            # user raised past PIL's own: ours was the one asked.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
                return _array_to_rgb(np.asarray(img), limits, where)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                # cv2.imread drops alpha, keeping the stored colour; do the same.
                arr = np.asarray(img.convert("RGBA"))[..., :3]
            else:
                arr = np.asarray(img.convert("RGB"))
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of a decoder on hostile bytes is "cannot decode"
        raise ImageError(f"cannot decode image: {type(e).__name__}: {e}", path=where) from e
    if arr.ndim != 3 or arr.shape[2] != 3 or 0 in arr.shape:
        raise ImageError(f"image has unusable shape {arr.shape}", path=where)
    return np.ascontiguousarray(arr)


def _open(path: Path) -> Image.Image:
    """Read the header only. PIL's bomb *warning* is left to our own size check, which
    follows at once with the caller's limit; its *error* (over twice
    ``Image.MAX_IMAGE_PIXELS``, raised inside ``open``) becomes ours."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except Image.DecompressionBombError as e:
        raise ImageSizeError(f"the image is too large to decode safely: {e}", path=path,
                             limit=("PIL.Image.MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)) from e
    except Exception as e:  # noqa: BLE001 - not an image, or a header PIL cannot parse
        raise ImageError(f"cannot decode image: {type(e).__name__}: {e}", path=path) from e


def load_image(source, limits: ImageLimits | None = None) -> np.ndarray:
    """``source`` (path, ``PIL.Image`` or array) -> RGB ``uint8 (H, W, 3)``.

    ``limits``: :class:`ImageLimits` (default :data:`DEFAULT_LIMITS`). Raises
    :class:`~lisa_kit.errors.ImageError` (:class:`~lisa_kit.errors.ImageSizeError` for the
    limits) and nothing else for bad input."""
    limits = limits or DEFAULT_LIMITS
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, limits, None)
    if isinstance(source, Image.Image):
        where = getattr(source, "filename", None) or "<PIL image>"
        return _pil_to_rgb(source, limits, str(where))
    if not isinstance(source, (str, os.PathLike)):
        raise ImageError(f"an image is a path, a PIL image or an array; got {type(source).__name__}")
    path = Path(source)
    try:
        found = path.is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        found = False
    if not found:
        raise ImageError("image file not found", path=path)
    img = _open(path)
    with img:
        return _pil_to_rgb(img, limits, str(path))
