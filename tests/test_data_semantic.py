"""Semantic-segmentation readers (ade20k, cocostuff, mapillary, paco_lvis, pascal_part) on tiny
datasets written in their real layouts, and ADE20K parity with LISA's own reader output."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lisa_kit.datasets import open_dataset
from lisa_kit.datasets.semantic import ade20k_classes, cocostuff_classes
from lisa_kit.errors import DataError
from lisa_kit.testing import eval_fixture_dir, uncompressed_rle


def _png(path: Path, arr: np.ndarray, mode: str = "L", palette: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8), mode) if not palette else Image.fromarray(arr.astype(np.uint8), "L")
    if palette:
        im = im.convert("P")  # keep the values as palette indices
        im.putpalette([v for k in range(256) for v in ((k * 7) % 256, (k * 13) % 256, (k * 29) % 256)])
    im.save(path)
    return path


def _jpg(path: Path, h: int, w: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(path)
    return path


def _raw_label(h: int, w: int, blocks: dict[int, tuple[slice, slice]], fill: int = 0) -> np.ndarray:
    a = np.full((h, w), fill, np.uint8)
    for value, (ys, xs) in blocks.items():
        a[ys, xs] = value
    return a


# ---------------------------------------------------------------- class lists


def test_class_lists_are_lisas():
    ade = ade20k_classes()
    assert len(ade) == 150 and len(set(ade)) == 150
    assert (ade[0], ade[2], ade[3], ade[19], ade[20], ade[149]) == ("wall", "sky", "floor", "chair", "car", "flag")
    coco = cocostuff_classes()
    # The header line "0: unlabeled" is skipped: stuffthingmaps value 0 is "person".
    assert len(coco) == 182 and coco[0] == "person" and coco[181] == "wood" and coco[95] == "building-other"


# ---------------------------------------------------------------- ADE20K


def _ade(root: Path, stem: str, raw: np.ndarray) -> None:
    _jpg(root / "ade20k" / "images" / "training" / f"{stem}.jpg", *raw.shape)
    _png(root / "ade20k" / "annotations" / "training" / f"{stem}.png", raw)


def test_ade20k_remap_and_targets(tmp_path):
    raw = _raw_label(12, 16, {1: (slice(0, 4), slice(None)), 4: (slice(4, 8), slice(0, 8)),
                              150: (slice(8, 12), slice(0, 3)), 255: (slice(8, 12), slice(12, 16))})
    _ade(tmp_path, "ADE_train_00000002", raw)
    _ade(tmp_path, "ADE_train_00000001", _raw_label(5, 6, {3: (slice(0, 2), slice(0, 2))}))
    (tmp_path / "ade20k" / "images" / "training" / "notes.txt").write_text("not an image")

    ds = open_dataset("ade20k", tmp_path)
    assert len(ds) == 2 and [p.name for p in ds.images] == ["ADE_train_00000001.jpg", "ADE_train_00000002.jpg"]
    assert ds.files(1) == [tmp_path / "ade20k/images/training/ADE_train_00000002.jpg",
                           tmp_path / "ade20k/annotations/training/ADE_train_00000002.png"]
    rec = ds[1]
    expected = np.where((raw == 0) | (raw == 255), 255, raw.astype(np.int64) - 1)
    np.testing.assert_array_equal(rec.meta["label_map"], expected)
    np.testing.assert_array_equal(ds.label_map(1), expected)
    assert [t.text for t in rec.targets] == ["wall", "floor", "flag"]
    for t, raw_id in zip(rec.targets, (1, 4, 150)):
        assert t.kind == "class" and t.mask.dtype == np.uint8 and t.mask.shape == raw.shape
        np.testing.assert_array_equal(t.mask, (raw == raw_id).astype(np.uint8))
    assert rec.targets[2].meta["class_id"] == 149
    assert rec.key == "ADE_train_00000002" and rec.image().shape == (12, 16, 3)
    assert ds.check().ok


def test_ade20k_all_ignored_image_has_no_targets(tmp_path):
    _ade(tmp_path, "a", np.zeros((4, 4), np.uint8))
    rec = open_dataset("ade20k", tmp_path)[0]
    assert rec.targets == [] and (rec.meta["label_map"] == 255).all()


def test_ade20k_missing_unreadable_and_out_of_range_labels(tmp_path):
    _jpg(tmp_path / "ade20k/images/training/x_missing.jpg", 4, 4)
    _ade(tmp_path, "y_bad_value", _raw_label(4, 4, {200: (slice(0, 1), slice(0, 1))}))
    _jpg(tmp_path / "ade20k/images/training/z_garbage.jpg", 4, 4)
    garbage = tmp_path / "ade20k/annotations/training/z_garbage.png"
    garbage.write_bytes(b"not a png at all")
    ds = open_dataset("ade20k", tmp_path)

    with pytest.raises(DataError, match="not found") as e:
        ds[0]
    assert e.value.path == str(tmp_path / "ade20k/annotations/training/x_missing.png")
    with pytest.raises(DataError, match=r"\[199\]") as e:  # raw 200 -> class 199 of 150
        ds[1]
    assert e.value.path.endswith("y_bad_value.png")
    with pytest.raises(DataError, match="cannot decode") as e:
        ds[2]
    assert e.value.path == str(garbage)
    rep = ds.check()
    assert {p for p, _ in rep.problems} == {str(tmp_path / "ade20k/annotations/training/x_missing.png"),
                                           e.value.path, str(tmp_path / "ade20k/annotations/training/y_bad_value.png")}


def test_ade20k_missing_directory(tmp_path):
    with pytest.raises(DataError) as e:
        open_dataset("ade20k", tmp_path)
    assert e.value.path == str(tmp_path / "ade20k/images/training")


# ---------------------------------------------------------------- COCO-Stuff


def test_cocostuff_layout_and_dash_classes_ignored(tmp_path):
    # 0 person, 95 building-other (has "-": ignored), 156 sky, 170 wall-brick (ignored), 255 unlabeled
    raw = _raw_label(10, 10, {0: (slice(0, 3), slice(None)), 95: (slice(3, 5), slice(None)),
                              156: (slice(5, 7), slice(None)), 170: (slice(7, 8), slice(None))}, fill=255)
    _png(tmp_path / "cocostuff/train2017/000000000009.png", raw)
    _jpg(tmp_path / "coco/train2017/000000000009.jpg", 10, 10)
    ds = open_dataset("cocostuff", tmp_path)
    assert ds.files(0) == [tmp_path / "coco/train2017/000000000009.jpg",
                           tmp_path / "cocostuff/train2017/000000000009.png"]
    rec = ds[0]
    expected = raw.copy()
    expected[(raw == 95) | (raw == 170)] = 255
    np.testing.assert_array_equal(rec.meta["label_map"], expected)
    assert [t.text for t in rec.targets] == ["person", "sky"]
    np.testing.assert_array_equal(rec.targets[0].mask, (raw == 0).astype(np.uint8))
    np.testing.assert_array_equal(rec.targets[1].mask, (raw == 156).astype(np.uint8))
    assert 95 in ds.ignored_ids and 170 in ds.ignored_ids and 0 not in ds.ignored_ids
    assert len(ds.ignored_ids) == 28  # every "-" stuff class of cocostuff_classes.txt
    assert ds.check().ok


# ---------------------------------------------------------------- Mapillary


def _mapillary(root: Path, labels: list[dict]) -> Path:
    base = root / "mapillary"
    base.mkdir(parents=True, exist_ok=True)
    (base / "config_v2.0.json").write_text(json.dumps({"labels": labels, "version": "2.0"}))
    return base


def test_mapillary_palette_labels_and_lisa_class_rules(tmp_path):
    labels = [{"name": "animal--bird", "readable": "Bird", "evaluate": True, "color": [1, 2, 3]},
              {"name": "object--vehicle--car", "readable": "Car", "evaluate": True, "color": [4, 5, 6]},
              {"name": "object--vehicle--car-2", "readable": "Car", "evaluate": True, "color": [7, 8, 9]},
              {"name": "void--unlabeled", "readable": "Unlabeled", "evaluate": False, "color": [0, 0, 0]}]
    base = _mapillary(tmp_path, labels)
    raw = _raw_label(8, 9, {0: (slice(0, 2), slice(None)), 2: (slice(2, 4), slice(None)),
                            255: (slice(6, 8), slice(None))}, fill=3)
    _png(base / "training/v2.0/labels/img_b.png", raw, palette=True)
    _jpg(base / "training/images/img_b.jpg", 8, 9)
    _png(base / "training/v2.0/labels/img_a.png", np.ones((3, 3), np.uint8), palette=True)
    _jpg(base / "training/images/img_a.jpg", 3, 3)

    ds = open_dataset("mapillary", tmp_path)
    assert ds.classes == ("bird", "car", "car", "unlabeled")
    assert ds.class_meta[3] == {"name": "void--unlabeled", "readable": "Unlabeled", "evaluate": False}
    assert [p.name for p in ds.images] == ["img_a.jpg", "img_b.jpg"]
    assert ds.files(1)[0] == base / "training/images/img_b.jpg"
    rec = ds[1]
    np.testing.assert_array_equal(rec.meta["label_map"], raw)  # no remapping in LISA
    # "unlabeled" is an ordinary class in LISA. A repeated name ("car", ids 1 and 2) is one
    # target whose mask is label == FIRST id (LISA's list.index), here empty.
    assert [t.text for t in rec.targets] == ["bird", "car", "unlabeled"]
    np.testing.assert_array_equal(rec.targets[0].mask, (raw == 0).astype(np.uint8))
    assert rec.targets[1].meta == {"class_id": 1, "label_ids": [2]} and rec.targets[1].empty
    np.testing.assert_array_equal(rec.targets[2].mask, (raw == 3).astype(np.uint8))


def test_mapillary_missing_config(tmp_path):
    with pytest.raises(DataError) as e:
        open_dataset("mapillary", tmp_path)
    assert e.value.path == str(tmp_path / "mapillary/config_v2.0.json")
    (tmp_path / "mapillary").mkdir()
    (tmp_path / "mapillary/config_v2.0.json").write_text(json.dumps({"labels": [{"name": "x"}]}))
    with pytest.raises(DataError, match="readable"):
        open_dataset("mapillary", tmp_path)


# ---------------------------------------------------------------- PACO-LVIS / PASCAL-Part


def _coco_json(path: Path, images, anns, cats) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools + numpy 2, in COCO.annToMask
def test_paco_lvis_names_masks_and_layout(tmp_path):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    h, w = 20, 30
    rle_mask = np.zeros((h, w), np.uint8)
    rle_mask[5:9, 10:25] = 1
    compressed = mask_utils.encode(np.asfortranarray(rle_mask))
    compressed["counts"] = compressed["counts"].decode()
    raw_mask = np.zeros((h, w), np.uint8)
    raw_mask[12:20, 0:4] = 1
    raw_mask[0:2, 28:30] = 1
    polygon = [2.0, 3.0, 12.0, 3.0, 12.0, 9.0, 2.0, 9.0]
    ann_file = _coco_json(
        tmp_path / "vlpart/paco/annotations/paco_lvis_v1_train.json",
        images=[{"id": 139, "file_name": "train2017/000000000139.jpg", "height": h, "width": w},
                {"id": 7, "file_name": "train2017/000000000007.jpg", "height": 4, "width": 4}],
        anns=[{"id": 11, "image_id": 139, "category_id": 1, "segmentation": [polygon], "iscrowd": 0},
              {"id": 12, "image_id": 139, "category_id": 2, "segmentation": compressed, "iscrowd": 1},
              {"id": 13, "image_id": 139, "category_id": 3,
               "segmentation": uncompressed_rle(raw_mask), "iscrowd": 1}],
        cats=[{"id": 1, "name": "car_(automobile):wheel"}, {"id": 2, "name": " dog "},
              {"id": 3, "name": "trash_can:lid_(cover)"}])
    _jpg(tmp_path / "coco/train2017/000000000139.jpg", h, w)

    ds = open_dataset("paco_lvis", tmp_path)
    assert len(ds) == 2
    assert ds.files(0) == [tmp_path / "coco/train2017/000000000139.jpg", ann_file]
    rec = ds[0]
    assert [t.text for t in rec.targets] == ["car wheel", "dog", "trash_can lid"]
    assert rec.targets[0].meta["phrasings"] == ["car wheel", "the wheel of the car"]
    assert rec.targets[2].meta["object"] == "trash_can" and rec.targets[2].meta["part"] == "lid"
    assert "phrasings" not in rec.targets[1].meta and rec.targets[1].meta["ann_id"] == 12
    # Reference: pycocotools' own COCO.annToMask (what LISA calls) and the masks we encoded.
    coco = COCO(str(ann_file))
    np.testing.assert_array_equal(rec.targets[0].mask, coco.annToMask(coco.anns[11]))
    assert abs(int(rec.targets[0].mask.sum()) - 10 * 6) <= 20  # the 10x6 rectangle, up to edge rules
    np.testing.assert_array_equal(rec.targets[1].mask, rle_mask)
    np.testing.assert_array_equal(rec.targets[2].mask, raw_mask)
    assert all(t.mask.dtype == np.uint8 and t.mask.shape == (h, w) for t in rec.targets)
    assert ds[1].targets == []  # LISA redraws such images; the record is kept, empty
    assert [p for p, _ in ds.check().problems] == [str(tmp_path / "coco/train2017/000000000007.jpg")]


def test_paco_lvis_errors(tmp_path):
    with pytest.raises(DataError) as e:
        open_dataset("paco_lvis", tmp_path)
    assert e.value.path.endswith("paco_lvis_v1_train.json")
    ann = tmp_path / "vlpart/paco/annotations/paco_lvis_v1_train.json"
    _coco_json(ann, [], [], [{"id": 1, "name": "a:b:c"}])
    with pytest.raises(DataError) as e:
        open_dataset("paco_lvis", tmp_path)
    assert e.value.field == "categories[0].name"
    _coco_json(ann, [{"id": 1, "file_name": "a.jpg", "height": 4, "width": 4}],
               [{"id": 5, "image_id": 1, "category_id": 1, "segmentation": [[1.0, 1.0]]},
                {"id": 6, "image_id": 1, "category_id": 9, "segmentation": []}], [{"id": 1, "name": "cup"}])
    ds = open_dataset("paco_lvis", tmp_path)
    with pytest.raises(DataError) as e:
        ds[0]
    assert e.value.field == "annotations[id=5].segmentation" and e.value.path == str(ann)


def test_pascal_part_layout_and_names(tmp_path):
    h, w = 6, 8
    ann_file = _coco_json(
        tmp_path / "vlpart/pascal_part/train.json",
        images=[{"id": 2008000001, "file_name": "2008_000001.jpg", "height": h, "width": w}],
        anns=[{"id": 1, "image_id": 2008000001, "category_id": 4,
               "segmentation": {"size": [h, w], "counts": [8, 4, 36]}},
              {"id": 2, "image_id": 2008000001, "category_id": 5,
               "segmentation": {"size": [h, w], "counts": [0, 2, 46]}}],
        cats=[{"id": 4, "name": "cow:left horn"}, {"id": 5, "name": "aeroplane:body_(x)"}])
    ds = open_dataset("pascal_part", tmp_path)
    img = tmp_path / "vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/2008_000001.jpg"
    assert ds.files(0) == [img, ann_file]
    rec = ds[0]
    assert rec.image_path == img and rec.key == "2008000001"
    # No "_(" trimming for PASCAL-Part (only PACO does it).
    assert [t.text for t in rec.targets] == ["cow left horn", "aeroplane body_(x)"]
    assert rec.targets[0].meta["phrasings"][1] == "the left horn of the cow"
    expected = np.zeros((h, w), np.uint8)
    expected[2:6, 1] = 1  # column-major: 8 zeros = column 0 and rows 0-1 of column 1, then 4 ones
    np.testing.assert_array_equal(rec.targets[0].mask, expected)
    expected = np.zeros((h, w), np.uint8)
    expected[0:2, 0] = 1
    np.testing.assert_array_equal(rec.targets[1].mask, expected)

    _coco_json(ann_file, [], [], [{"id": 4, "name": "cow"}])
    with pytest.raises(DataError) as e:
        open_dataset("pascal_part", tmp_path)
    assert e.value.field == "categories[0].name"


# ---------------------------------------------------------------- parity with LISA's SemSegDataset


def test_ade20k_matches_lisa_reader_fixture():
    fx = eval_fixture_dir()
    if fx is None:
        pytest.skip("LISA eval fixture not available")
    ref = json.loads((fx / "reader_reference.json").read_text())["sources"]["sem_seg"]
    ds = open_dataset("ade20k", fx / "dataset")
    index = {p.relative_to(fx / "dataset").as_posix(): i for i, p in enumerate(ds.images)}
    covered = set()
    for draw in ref["draws"]:
        rec = ds[index[draw["image_path"]]]
        covered.add(draw["image_path"])
        lisa_label = np.array(Image.open(fx / draw["label_png"]))
        np.testing.assert_array_equal(rec.meta["label_map"], lisa_label)
        values, counts = np.unique(rec.meta["label_map"], return_counts=True)
        assert {str(v): int(c) for v, c in zip(values, counts)} == draw["label_value_counts"]
        by_text = {t.text: t for t in rec.targets}
        # Every class LISA could draw is a target (sampled ones included), nothing else.
        assert set(by_text) == {ade20k_classes()[int(v)] for v in draw["label_value_counts"] if v != "255"}
        for cls, png in zip(draw["sampled_classes"], draw["mask_png"]):
            np.testing.assert_array_equal(by_text[cls].mask, np.array(Image.open(fx / png)))
    assert len(covered) == len(ds) == 3
