"""ReasonSeg reader: tiny datasets written in the real layout, masks checked pixel-exactly,
plus parity with masks LISA itself built (eval fixture, skipped when absent)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lisa_kit.datasets import open_dataset
from lisa_kit.datasets.reason_seg import ReasonSegReader, mask_from_shapes, polygon_pixels
from lisa_kit.errors import DataError
from lisa_kit.testing import eval_fixture_dir

H, W = 40, 60


def rect(x0, y0, x1, y1):
    """Corner points of an axis-aligned rectangle (labelme polygon)."""
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def shape(label, points):
    return {"label": label, "points": points, "group_id": None, "shape_type": "polygon", "flags": {}}


def write_sample(split_dir: Path, name: str, anno: dict | str | bytes, hw=(H, W), encoding="utf-8"):
    """``<name>.jpg`` (solid grey) and ``<name>.json`` (dict -> JSON in ``encoding``; str/bytes as is)."""
    split_dir.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (hw[1], hw[0]), (90, 90, 90)).save(split_dir / f"{name}.jpg")
    if isinstance(anno, dict):
        anno = json.dumps(anno, ensure_ascii=False).encode(encoding)
    elif isinstance(anno, str):
        anno = anno.encode(encoding)
    (split_dir / f"{name}.json").write_bytes(anno)


def anno(text, shapes, is_sentence=True):
    return {"version": "4.5.6", "flags": {}, "text": text, "is_sentence": is_sentence, "shapes": shapes,
            "imagePath": "x.jpg", "imageData": None}


def box(y0, y1, x0, x1, value, base=None):
    """Expected mask: ``base`` (or zeros) with rows y0..y1 and columns x0..x1 (inclusive) set."""
    m = np.zeros((H, W), np.uint8) if base is None else base.copy()
    m[y0:y1 + 1, x0:x1 + 1] = value
    return m


@pytest.fixture()
def root(tmp_path):
    val = tmp_path / "reason_seg" / "ReasonSeg" / "val"
    # a: big target with a smaller ignore inside (ignore painted later: 255 wins) and a
    #    small separate target; fractional points truncate toward zero.
    write_sample(val, "a", anno(["  Where would you sit?  ", "the seat"], [
        shape("target", rect(2.9, 3.7, 30.2, 25.99)),  # -> x 2..30, y 3..25
        shape("ignore", rect(10, 10, 20, 15)),
        shape("target", rect(40, 30, 45, 35)),
    ]))
    # b: big ignore with a smaller target inside (target wins); "flag"/"FLAG" shapes are
    #    dropped, "red flag" is not exactly "flag" so it is a target; "Ignore_x" is ignore.
    write_sample(val, "b", anno("Blue Bottle", [
        shape("Ignore_x", rect(0, 0, 20, 20)),
        shape("target", rect(5, 5, 8, 8)),
        shape("flag", rect(30, 0, 59, 39)),
        shape("FLAG", rect(25, 25, 28, 28)),
        shape("red flag", rect(50, 30, 52, 33)),
    ], is_sentence=False))
    # c: cp1252-encoded JSON (LISA retries utf-8 failures as cp1252).
    write_sample(val, "c", anno(["Which object makes a café latte?"], [shape("car", rect(1, 1, 2, 2))]),
                 encoding="cp1252")
    train = tmp_path / "reason_seg" / "ReasonSeg" / "train"
    write_sample(train, "t0", anno(["What keeps the rain off?"], [shape("target", rect(0, 0, 9, 9))]))
    write_sample(train, "t1", anno(["dog"], [shape("target", rect(0, 0, 4, 4))], is_sentence=False))
    expl = tmp_path / "reason_seg" / "ReasonSeg" / "explanatory"
    expl.mkdir()
    (expl / "train.json").write_text(json.dumps([
        {"image": "t0.jpg", "json": "t0.json", "query": "What keeps the rain off?", "outputs": "The umbrella."},
        {"image": "a.jpg", "json": "a.json", "query": "not in train", "outputs": "ignored"},
    ]))
    return tmp_path


def test_masks_pixel_exact(root):
    ds = open_dataset("reason_seg", root, "val")
    assert isinstance(ds, ReasonSegReader) and len(ds) == 3
    a, b, c = ds[0], ds[1], ds[2]
    assert [a.key, b.key, c.key] == ["a", "b", "c"]

    want_a = box(3, 25, 2, 30, 1)
    want_a = box(10, 15, 10, 20, 255, want_a)
    want_a = box(30, 35, 40, 45, 1, want_a)
    for t in a.targets:
        np.testing.assert_array_equal(t.mask, want_a)
        assert t.mask.dtype == np.uint8 and t.mask.shape == (H, W)

    want_b = box(0, 20, 0, 20, 255)
    want_b = box(5, 8, 5, 8, 1, want_b)
    want_b = box(30, 33, 50, 52, 1, want_b)  # "red flag"
    np.testing.assert_array_equal(b.targets[0].mask, want_b)

    np.testing.assert_array_equal(c.targets[0].mask, box(1, 2, 1, 2, 1))


def test_texts_kinds_and_meta(root):
    ds = open_dataset("reason_seg", root, "val")
    a, b, c = ds[0], ds[1], ds[2]
    assert [t.text for t in a.targets] == ["Where would you sit?", "the seat"]
    assert a.targets[0].meta["raw_text"] == "  Where would you sit?  "
    assert a.meta["texts"] == ["  Where would you sit?  ", "the seat"]
    assert {t.kind for t in a.targets} == {"sentence"} and a.meta["is_sentence"] is True
    # text stored as a bare string is one text, not one per character
    assert [t.text for t in b.targets] == ["Blue Bottle"] and b.meta["text_was_string"]
    assert b.targets[0].kind == "phrase" and b.meta["is_sentence"] is False
    assert c.targets[0].text == "Which object makes a café latte?" and c.meta["json_encoding"] == "cp1252"
    assert a.meta["json_encoding"] == "utf-8"
    assert a.image().shape == (H, W, 3)
    assert ds.files(0) == [root / "reason_seg/ReasonSeg/val/a.jpg", root / "reason_seg/ReasonSeg/val/a.json"]
    assert a.explanation is None  # explanations are only attached on train


def test_explanatory_on_train(root):
    ds = open_dataset("reason_seg", root)  # default split: train
    assert ds.split == "train"
    t0, t1 = ds[0], ds[1]
    assert t0.explanation == "The umbrella." and t0.meta["explanation_query"] == "What keeps the rain off?"
    assert t1.explanation is None
    assert open_dataset("reason_seg", root, explanatory=False)[0].explanation is None
    rep = ds.check()
    assert rep.ok and rep.counts == {"records": 2, "targets": 2, "empty_targets": 0}


# Masks OpenCV 4.8 (LISA's environment) paints with polylines + fillPoly, bit-packed rows.
# "two_points" and "quad" come out differently under OpenCV >= 4.11.
OPENCV_48 = {
    "triangle": ([[1.9, 1.2], [14.7, 4.4], [5.5, 10.8]], 12, 16,
                 "000070007f003ff03ffe1ffc1ff00fe00f80070004000000"),
    "two_points": ([[11, 4], [0, 18]], 20, 14,
                   "0000000000000000100080040010008004002001800400200100080020010008000000"),
    "outside_triangle": ([[-6.5, 2.0], [20.3, -3.1], [9.9, 15.0]], 12, 16,
                         "1ffffffffffffffffffffffffffe7ffe3ffc1ff80ff807f0"),
    "bow_tie": ([[1, 1], [13, 10], [13, 1], [1, 10]], 12, 16, "00004004700c783c7c7c7ffc7ffc7c7c783c700c40040000"),
    "quad": ([[1.09, 8.31], [1.62, 1.11], [7.48, 9.61], [6.61, 0.73]], 10, 9, "0223198fc7e3f99cce430080"),
    "outside_rect": ([[-5, -5], [3, -5], [3, 4], [-5, 4]], 8, 8, "f0f0f0f0f0000000"),
}


@pytest.mark.parametrize("name", sorted(OPENCV_48))
def test_rasterisation_matches_opencv_48(name):
    points, h, w, packed = OPENCV_48[name]
    want = np.unpackbits(np.frombuffer(bytes.fromhex(packed), np.uint8))[: h * w].reshape(h, w).astype(bool)
    got = polygon_pixels(np.array(points, dtype=np.float64).astype(np.int32), h, w)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(mask_from_shapes([shape("target", points)], h, w), want.astype(np.uint8))


def test_errors(root, tmp_path):
    with pytest.raises(DataError, match="no split 'dev'"):
        open_dataset("reason_seg", root, "dev")
    with pytest.raises(DataError) as e:
        open_dataset("reason_seg", root, "test")  # split directory absent
    assert e.value.path.endswith("ReasonSeg/test")

    val = root / "reason_seg" / "ReasonSeg" / "val"
    write_sample(val, "d_corrupt", '{"text": ["x"], "is_sentence": true, "shapes": [')
    write_sample(val, "e_points", anno(["x"], [shape("target", rect(0, 0, 2, 2)), shape("target", [[1, 2, 3]])]))
    write_sample(val, "f_nosent", {"text": ["x"], "shapes": []})
    ds = open_dataset("reason_seg", root, "val")
    with pytest.raises(DataError) as e:
        ds[3]
    assert e.value.path == str(val / "d_corrupt.json") and e.value.field == "<json>"
    assert "d_corrupt.json" in str(e.value)
    with pytest.raises(DataError) as e:
        ds[4]
    assert e.value.path == str(val / "e_points.json") and e.value.field == "shapes[1].points"
    with pytest.raises(DataError) as e:
        ds[5]
    assert e.value.field == "is_sentence"

    (val / "b.jpg").unlink()  # image vanished after indexing
    with pytest.raises(DataError) as e:
        ds[1]
    assert e.value.path == str(val / "b.jpg")
    (val / "a.json").unlink()
    with pytest.raises(DataError) as e:
        ds[0]
    assert e.value.path == str(val / "a.json")

    rep = ds.check()
    assert not rep.ok
    bad = {Path(p).name for p, _ in rep.problems}
    assert bad == {"a.json", "b.jpg", "d_corrupt.json", "e_points.json", "f_nosent.json"}


# --- parity with LISA's own output ---------------------------------------------------------

def _fixture():
    fx = eval_fixture_dir()
    if fx is None:
        pytest.skip("LISA eval fixture (eval_seed0) not available")
    return fx


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_fixture_val_masks_and_texts():
    fx = _fixture()
    ds = open_dataset("reason_seg", fx / "dataset", "val")
    records = {r.key: r for r in ds}
    gt_dir = fx / "gt_masks" / "ReasonSeg_val"
    assert set(records) == {p.stem for p in gt_dir.glob("*.png")}
    for key, rec in records.items():
        want = _png(gt_dir / f"{key}.png")
        for t in rec.targets:
            np.testing.assert_array_equal(t.mask, want, err_msg=key)

    samples = json.loads((fx / "eval_reference.json").read_text())["evals"]["ReasonSeg|val"]["samples"]
    assert len(samples) == len(records)
    for s in samples:
        rec = records[Path(s["image_path"]).stem]
        assert rec.meta["texts"] == s["json_text"]
        assert rec.meta["is_sentence"] == s["is_sentence"]
        assert rec.meta["json_encoding"] == s["json_encoding"]
        assert rec.targets[0].text == s["text_used"]  # LISA validates on text[0].strip()
        assert list(rec.targets[0].mask.shape) == s["image_hw"]


def test_fixture_train_masks_and_explanations():
    fx = _fixture()
    ref = json.loads((fx / "reader_reference.json").read_text())
    ds = open_dataset("reason_seg", fx / "dataset", "train")
    records = {r.image_path.name: r for r in ds}
    expected = ref["deterministic"]["reason_seg_train_masks"]
    assert sorted(records) == sorted(Path(e["image"]).name for e in expected)
    for e in expected:
        rec = records[Path(e["image"]).name]
        np.testing.assert_array_equal(rec.targets[0].mask, _png(fx / e["mask_png"]), err_msg=e["image"])
        assert rec.meta["texts"] == e["texts"] and rec.meta["is_sentence"] == e["is_sentence"]

    # LISA's draws that used the explanatory answer contain our record's explanation.
    used = [d for d in ref["sources"]["reason_seg"]["draws"] if d.get("branch") in ("seg+explanation", "text_only")]
    assert used
    for d in used:
        rec = records[Path(d["image_path"]).name]
        assert rec.explanation and all(rec.explanation in c for c in d["conversations"])
