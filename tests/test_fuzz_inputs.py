"""Generated odd inputs through the Python API (tiny recipe, random weights, CPU): every
case ends in a typed :class:`~lisa_kit.errors.LisaKitError` or a well-formed
:class:`~lisa_kit.api.SegResult`, never another exception.

Seeded and bounded: images are small except where the size is the point (1 x N strips),
and answers are cut at one token.
"""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from lisa_kit.api import Segmenter, SegResult
from lisa_kit.errors import LisaKitError
from lisa_kit.testing import synthetic_image

SEED = 1234
MAX_NEW = 1
PROMPT = "Segment the red square."
PIL_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "F")


@pytest.fixture(scope="module")
def seg():
    return Segmenter.from_recipe("lisa-tiny", max_new_tokens=MAX_NEW)


def _well_formed(r, image_hw=None):
    assert isinstance(r, SegResult)
    h, w = r.image_size
    assert r.masks.dtype == bool and r.masks.shape == (r.num_masks, h, w)
    assert len(r.scores) == r.num_masks == len(r.seg_spans) == len(r.rejected)
    assert all(r.text[a:b] in ("[SEG]", "[REJ]") for a, b in r.seg_spans)
    assert getattr(r, "stop", "end") in ("end", "max_new_tokens", "context")  # (a field added later)
    if image_hw is not None:
        assert (h, w) == image_hw
    r.to_dict()


def _outcome(seg, image, prompt=PROMPT):
    """``SegResult`` or the typed error; any other exception fails the test."""
    try:
        r = seg.seg(image, prompt)
    except LisaKitError as e:
        assert str(e)  # a message to show
        return e
    _well_formed(r)
    return r


def _sizes():
    rng = random.Random(SEED)
    fixed = [(1, 1), (1, 2), (2, 1), (1, 31), (31, 1), (1, 33), (33, 1), (1, 400), (400, 1), (3, 5000), (1, 400000)]
    return fixed + [(rng.randint(1, 70), rng.randint(1, 70)) for _ in range(6)]


@pytest.mark.parametrize("hw", _sizes(), ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_sizes_from_one_pixel_to_extreme_strips(seg, hw):
    h, w = hw
    a = np.random.default_rng(SEED).integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = _outcome(seg, a)
    if max(h, w) / min(h, w) <= seg.image_limits.max_aspect:
        assert isinstance(out, SegResult) and out.image_size == (h, w)
    else:
        assert "aspect ratio" in str(out)


@pytest.mark.parametrize("mode", PIL_MODES)
def test_every_pil_mode_as_object_and_as_file(seg, mode, tmp_path):
    rgb, _ = synthetic_image(19, 23, 1)
    img = Image.fromarray(rgb).convert(mode)
    assert _outcome(seg, img).image_size == (19, 23)
    for fmt in ("PNG", "TIFF", "GIF", "JPEG"):  # WebP, BMP: tests/test_image_intake.py
        buf = io.BytesIO()
        try:
            img.save(buf, fmt)
        except (OSError, ValueError, KeyError):
            continue  # PIL cannot write this mode in this format
        path = tmp_path / f"m.{fmt.lower()}"
        path.write_bytes(buf.getvalue())
        out = _outcome(seg, path)
        if _pil_reads(buf.getvalue()):  # PIL writes some files it cannot read back (YCbCr TIFF)
            assert isinstance(out, SegResult) and out.image_size == (19, 23), (fmt, out)


def _pil_reads(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - any failure means "PIL cannot read it"
        return False


def _encoded(fmt: str) -> bytes:
    rgb, _ = synthetic_image(24, 31, 2)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP"])
def test_truncated_files_at_random_offsets(seg, fmt, tmp_path):
    data = _encoded(fmt)
    rng = random.Random(SEED)
    offsets = sorted({0, 8, len(data) - 1, *(rng.randrange(len(data)) for _ in range(5))})
    for k in offsets:
        path = tmp_path / f"cut_{k}.{fmt.lower()}"
        path.write_bytes(data[:k])
        _outcome(seg, path)
        try:
            lazy = Image.open(path)  # lazily opened: pixels not read yet
        except Exception:  # noqa: BLE001 - PIL refuses the header itself: nothing lazy to hand over
            continue
        _outcome(seg, lazy)
    assert isinstance(_outcome(seg, Image.open(io.BytesIO(data))), SegResult)  # uncut: fine


# What the intake (lisa_kit.images.load_image) makes of each array: ``None`` = accepted as
# an image of the array's height and width, else a fragment of the ImageError's message.
_SHAPES = "must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"
_LEVELS = "integer images other than uint16 must hold 8-bit levels 0..255"
_FLOAT_RANGE = "float images must lie in [0, 1] or in [0, 255]"
_NOT_FINITE = "NaN or infinite"


def _arrays():
    rng = np.random.default_rng(SEED)
    u8 = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    return {
        "bool": (u8[..., 0] > 127, None),
        "uint16": (u8.astype(np.uint16) * 257, None),
        "uint16_hw1": (u8[..., :1].astype(np.uint16) * 257, None),
        "int32_levels": (u8.astype(np.int32), None),
        "int64_too_wide": (u8.astype(np.int64) * 1000, _LEVELS),
        "int8_negative": (u8.astype(np.int8), _LEVELS),
        "float_unit": (u8 / 255.0, None),
        "float_levels": (u8.astype(np.float32), None),
        "float_out_of_range": (u8 * 3.5, _FLOAT_RANGE),
        "float_negative": (u8 / 255.0 - 0.5, _FLOAT_RANGE),
        "float16": ((u8 / 255.0).astype(np.float16), None),
        "nan": (np.full((9, 11), np.nan), _NOT_FINITE),
        "inf": (np.full((9, 11, 3), np.inf, np.float32), _NOT_FINITE),
        "hw": (u8[..., 0], None),
        "hw1": (u8[..., :1], None),
        "hw2": (u8[..., :2], _SHAPES),
        "hw4": (np.concatenate([u8, u8[..., :1]], 2), None),
        "hw5": (np.concatenate([u8, u8[..., :2]], 2), _SHAPES),
        "zero_rows": (u8[:0], "the image is empty (0x11 pixels)"),
        "zero_cols": (u8[:, :0], "the image is empty (9x0 pixels)"),
        "empty": (np.zeros((0,), np.uint8), _SHAPES),
        "scalar": (np.array(7, np.uint8), _SHAPES),
        "4d": (u8[None], _SHAPES),
        "complex": (u8.astype(np.complex64), "dtype complex64 cannot be read as pixels"),
        "object": (u8.astype(object), "dtype object cannot be read as pixels"),
        "strings": (np.full((9, 11), "x"), "cannot be read as pixels"),
        "big_endian": (u8.astype(">u2") * 257, None),
        "non_contiguous": (u8[::2, ::-1], None),
    }


@pytest.mark.parametrize("name", list(_arrays()))
def test_numpy_arrays_of_odd_dtypes_and_shapes(seg, name):
    from lisa_kit.errors import ImageError

    a, refused = _arrays()[name]
    out = _outcome(seg, a)
    if refused is None:
        assert isinstance(out, SegResult) and out.image_size == a.shape[:2], out
    else:
        assert isinstance(out, ImageError) and refused in str(out), out


def _hostile_prompts(tok_texts):
    rng = random.Random(SEED)
    junk = "".join(chr(rng.choice([rng.randint(0x20, 0x7e), rng.randint(0xa0, 0x2fff), 0x1f600])) for _ in range(60))
    return ["", " ", "\t\n\r ", "\x00", "a\x00b", "\x07\x08\x1b[31mred\x1b[0m", "\ud800", "x\udcff y", "\udfff" * 3,
            "[SEG]", "[SEG] [SEG] [SEG]", "<image>", "<im_start><im_end>", "</s><s>", *tok_texts,
            "مرحبا بالعالم — segment", "分割红色的正方形", "👩‍👩‍👧‍👦🟥🔴", "\u202eRTL override\u202c",
            "{0} {prompt!r} %s %d %(x)s {{}}", "\ufeff\u200b\u200d", "segment " * 2000, junk]


def test_hostile_prompts(seg):
    model = seg.model
    specials = [model.seg_token, *model.fusion.image_tokens(), seg.tokenizer.decode([seg.tokenizer.eos_id])]
    img, _ = synthetic_image(20, 24, 3)
    for prompt in _hostile_prompts(specials):
        out = _outcome(seg, img, prompt)
        if isinstance(out, SegResult):
            assert out.prompt == prompt
        if prompt.strip() == "" or any(0xD800 <= ord(c) <= 0xDFFF for c in prompt):
            assert not isinstance(out, SegResult), repr(prompt)
    # In a batch, the same prompts are refused or answered row by row, each error naming its row.
    prompts = ["Segment the red square.", "\udcff", " "]
    for k in (1, 2):
        try:
            seg.seg_batch(img, [prompts[0], prompts[k]])
        except LisaKitError as e:
            assert "prompts[1]" in str(e)
        else:
            raise AssertionError(f"{prompts[k]!r} was accepted")
