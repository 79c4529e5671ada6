"""Eval-time image transforms of torchvision/open_clip/timm, reproduced on PIL + numpy.

The towers in :mod:`lisa_kit.components.open_clip_tower` and
:mod:`lisa_kit.components.timm_tower` preprocess with these so that their pixels equal
what the libraries' own ``transforms.Compose`` pipelines give (the tests compare them):

* :func:`resize_shortest`: torchvision ``Resize(int)`` on a PIL image: the short side
  becomes ``size``, the long side ``int(size * long / short)`` (truncated).
* :func:`resize_keep_ratio`: open_clip/timm ``ResizeKeepRatio`` (deterministic part):
  both sides divided by one ratio and rounded.
* :func:`center_crop_or_pad`: torchvision ``CenterCrop`` / open_clip ``CenterCropOrPad``:
  pad (left/top get the smaller half) when the crop is larger, then crop at
  ``round((H - h) / 2)`` (Python's rounding, half to even).
* :func:`to_pixels`: ``ToTensor`` + ``Normalize`` in float32: ``(x / 255 - mean) / std``.

Also :func:`block_index`, the one meaning of ``select_layer`` shared by the towers.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from lisa_kit.errors import RecipeError

RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
            "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


def resample_of(name: str, key: str) -> int:
    """PIL resampling filter of an interpolation name (``bicubic``…). ``random`` is a
    training-time choice; at eval time both libraries fall back to bicubic."""
    if name == "random":
        return Image.BICUBIC
    if name not in RESAMPLE:
        raise RecipeError(f"unknown interpolation {name!r}; use one of {', '.join(RESAMPLE)}", key=key)
    return RESAMPLE[name]


def size_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """``224`` or ``[h, w]`` -> ``(h, w)``."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = (int(s) for s in size)
    return h, w


def resize_shortest(img: Image.Image, size: int, resample: int) -> Image.Image:
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img if (new_w, new_h) == (w, h) else img.resize((new_w, new_h), resample)


def resize_keep_ratio(img: Image.Image, size: tuple[int, int], longest: float, resample: int) -> Image.Image:
    """``longest`` 0: the side closest to its target fits (covers the target); 1: both
    fit inside it."""
    w, h = img.size
    ratio_h, ratio_w = h / size[0], w / size[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    new_h, new_w = round(h / ratio), round(w / ratio)
    return img if (new_w, new_h) == (w, h) else img.resize((new_w, new_h), resample)


def resize_to(img: Image.Image, size: tuple[int, int], resample: int) -> Image.Image:
    return img if img.size == (size[1], size[0]) else img.resize((size[1], size[0]), resample)


def center_crop_or_pad(x: np.ndarray, size: tuple[int, int], fill: int | Sequence[int] = 0) -> np.ndarray:
    """``(H, W, 3)`` -> ``(h, w, 3)``."""
    ch, cw = size
    h, w = x.shape[:2]
    if ch > h or cw > w:
        top, left = max(ch - h, 0) // 2, max(cw - w, 0) // 2
        out = np.empty((max(h, ch), max(w, cw), x.shape[2]), x.dtype)
        out[...] = np.asarray(fill, dtype=x.dtype)
        out[top:top + h, left:left + w] = x
        x = out
        h, w = x.shape[:2]
    top, left = round((h - ch) / 2.0), round((w - cw) / 2.0)
    return x[top:top + ch, left:left + cw]


def to_pixels(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``uint8 (h, w, 3)`` -> ``float32 (3, h, w)``, arithmetic as ``ToTensor`` + ``Normalize``."""
    x = x.astype(np.float32) / np.float32(255)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def block_index(select_layer: int, n: int, key: str) -> int:
    """0-based index of the block (or stage) whose output ``select_layer`` names.

    Counted like LLaVA's ``hidden_states[select_layer]``: ``-1`` the last block, ``-2``
    the one before (LLaVA/LISA's choice), ``k >= 1`` the k-th block. ``0`` (the
    embeddings, before any block) is not offered."""
    idx = n + select_layer if select_layer < 0 else select_layer - 1
    if not 0 <= idx < n:
        raise RecipeError(f"select_layer {select_layer} is outside the tower's {n} blocks "
                          f"(use -1..-{n} or 1..{n})", key=key)
    return idx
