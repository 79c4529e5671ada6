"""lisa_kit.images: limits checked before decoding, decompression bombs, truncated files,
and the one value rule (16-bit data as cv2.imread reads it, whatever its container)."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from lisa_kit.errors import ImageError, ImageSizeError, InputError
from lisa_kit.images import DEFAULT_LIMITS, ImageLimits, load_image


def _png_claiming(path, width: int, height: int) -> None:
    """A PNG whose header claims ``width x height`` (8-bit greyscale) with a few bytes of
    pixel data: what a decompression bomb or a forged header looks like before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.fixture
def decodes(monkeypatch):
    """Counts pixel decodes (``ImageFile.load``): a refused image must not reach one."""
    calls = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: calls.append(self.size) or real(self))
    return calls


def test_header_size_checked_before_decoding(tmp_path, decodes):
    over = int(np.sqrt(DEFAULT_LIMITS.max_pixels)) + 1
    _png_claiming(tmp_path / "big.png", over, over)  # above our limit, below PIL's bomb error
    with pytest.raises(ImageSizeError, match=f"{over}x{over}.*limit of {DEFAULT_LIMITS.max_pixels}") as info:
        load_image(tmp_path / "big.png")
    assert info.value.size == (over, over) and info.value.limit == ("max_pixels", DEFAULT_LIMITS.max_pixels)
    assert "big.png" in str(info.value) and decodes == []


def test_pil_decompression_bomb_error_is_typed(tmp_path, decodes):
    side = int(np.sqrt(2 * Image.MAX_IMAGE_PIXELS)) + 2  # PIL raises at open() above twice its limit
    _png_claiming(tmp_path / "bomb.png", side, side)
    with pytest.raises(ImageSizeError, match="too large"):
        load_image(tmp_path / "bomb.png", ImageLimits(max_pixels=side * side))
    assert decodes == []


def test_a_real_compressed_bomb_is_refused_without_decoding(tmp_path, decodes):
    Image.new("L", (3000, 3000)).save(tmp_path / "zeros.png")  # 9 Mpx of zeros: a few KB
    assert (tmp_path / "zeros.png").stat().st_size < 50_000
    with pytest.raises(ImageSizeError, match="9000000 pixels"):
        load_image(tmp_path / "zeros.png", ImageLimits(max_pixels=4_000_000))
    assert decodes == []
    assert load_image(tmp_path / "zeros.png").shape == (3000, 3000, 3)  # the default takes it


@pytest.mark.parametrize("hw", [(1, 33), (40, 1), (2, 65)])
def test_aspect_ratio_limit_for_every_source(tmp_path, hw, decodes):
    h, w = hw
    Image.new("RGB", (w, h)).save(tmp_path / "strip.png")
    for source in (tmp_path / "strip.png", Image.open(tmp_path / "strip.png"), np.zeros((h, w, 3), np.uint8)):
        with pytest.raises(ImageSizeError, match=f"{h}x{w}.*aspect ratio.*32:1"):
            load_image(source)
    assert decodes == []
    assert load_image(np.zeros((h, w), np.uint8), ImageLimits(max_aspect=70)).shape == (h, w, 3)


def test_limits_are_checked_themselves():
    for bad in ({"max_pixels": 0}, {"max_aspect": 0.5}, {"max_aspect": float("nan")}, {"max_pixels": 1.5}):
        with pytest.raises(InputError):
            ImageLimits(**bad)


def test_truncated_file_lazily_opened_or_by_path(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (60, 70, 3), dtype=np.uint8)).save(tmp_path / "whole.jpg", quality=90)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    for source in (tmp_path / "cut.jpg", Image.open(tmp_path / "cut.jpg")):
        with pytest.raises(ImageError, match="cut.jpg"):
            load_image(source)


def test_sixteen_bit_data_reads_the_same_from_array_png_tiff_and_pil(tmp_path):
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 1 << 16, (13, 17), dtype=np.uint16)
    grey[0, :4] = [0, 255, 256, 65535]  # 8-bit-looking values are 16-bit data too
    Image.fromarray(grey).save(tmp_path / "g16.png")
    Image.fromarray(grey).save(tmp_path / "g16.tif")
    expected = cv2.imread(str(tmp_path / "g16.png"))[..., ::-1]  # what LISA's reader gives
    for source in (grey, grey[..., None], grey.astype(">u2"), np.repeat(grey[..., None], 3, 2),
                   tmp_path / "g16.png", tmp_path / "g16.tif", Image.fromarray(grey)):
        np.testing.assert_array_equal(load_image(source), expected, err_msg=repr(type(source)))
    assert load_image(grey)[0, :4, 0].tolist() == [0, 0, 1, 255]


def test_values_of_other_dtypes_follow_one_rule():
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    expected = np.repeat(levels[..., None], 3, 2)
    for same in (levels.astype(np.int32), levels.astype(np.int64), levels.astype(np.float32),
                 levels / 255.0, (levels / 255.0).astype(np.float16), Image.fromarray(levels.astype(np.int32)),
                 Image.fromarray(levels.astype(np.float32))):
        np.testing.assert_array_equal(load_image(same), expected, err_msg=repr(getattr(same, "dtype", same)))
    assert load_image(levels > 127)[..., 0].tolist() == np.where(levels > 127, 255, 0).tolist()
    for bad, why in ((levels.astype(np.int32) * 300, "8-bit levels"), (levels.astype(np.int16) - 5, "8-bit levels"),
                     (levels * 3.0, r"\[0, 1\]"), (levels / 255.0 - 0.2, r"\[0, 1\]"),
                     (np.full((4, 4), np.nan), "NaN"), (levels.astype(np.complex64), "complex"),
                     (np.zeros((0, 5, 3), np.uint8), "empty"), (np.zeros((4, 4, 2), np.uint8), "must be")):
        with pytest.raises(ImageError, match=why):
            load_image(bad)


def test_frames_and_formats_pil_reads(tmp_path):
    frames = [Image.new("RGB", (9, 7), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert load_image(tmp_path / "anim.gif")[0, 0].tolist() == [255, 0, 0]  # the first frame
    for fmt in ("webp", "tiff", "bmp"):
        frames[1].save(tmp_path / f"x.{fmt}")
        assert load_image(tmp_path / f"x.{fmt}").shape == (7, 9, 3)
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / ("n" * 5000))  # a name too long for the file system
    with pytest.raises(ImageError, match="a path, a PIL image or an array"):
        load_image(12)


def test_a_limit_raised_past_pils_warning_is_honoured(tmp_path, decodes):
    side = int(np.sqrt(Image.MAX_IMAGE_PIXELS)) + 2  # PIL only warns here; our limit decides
    _png_claiming(tmp_path / "tall.png", side, side)
    with pytest.raises(ImageSizeError, match="limit of"):
        load_image(tmp_path / "tall.png")
    assert decodes == []
    with pytest.raises(ImageError, match="truncated"):  # allowed: decoded, and the forged file is cut short
        load_image(tmp_path / "tall.png", ImageLimits(max_pixels=side * side))
    assert decodes == [(side, side)]
