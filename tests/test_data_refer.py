"""Referring-segmentation readers (refcoco, refcoco+, refcocog, refclef, grefcoco).

Tiny datasets in the real on-disk formats are written into ``tmp_path``; expected masks
are built with numpy slicing (pycocotools rasterises an integer-cornered rectangle
``x0..x1, y0..y1`` as rows ``y0:y1``, columns ``x0:x1``). The fixture tests compare with
what LISA's own code produced (``eval_seed0``).
"""
from __future__ import annotations

import collections
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lisa_kit.datasets import dataset_names, open_dataset
from lisa_kit.errors import DataError
from lisa_kit.testing import eval_fixture_dir, uncompressed_rle

# pycocotools' decode trips numpy 2's copy-keyword deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# image id -> (height, width)
IMAGES = {10: (40, 60), 262148: (30, 50), 393225: (32, 48), 20: (24, 24), 21: (24, 24)}


def rect(h, w, x0, y0, x1, y1, value=1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = value
    return m


def poly(x0, y0, x1, y1):
    return [float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]


def compressed_rle(m):
    from pycocotools import mask as coco_mask

    r = coco_mask.encode(np.asfortranarray(m))
    return {"size": list(r["size"]), "counts": r["counts"].decode()}


# Expected masks of the annotations (value 2 where the two polygons of ann 3 overlap).
H1, W1 = IMAGES[10]
H2, W2 = IMAGES[262148]
H3, W3 = IMAGES[393225]
M1 = rect(H1, W1, 5, 4, 25, 20)
M2 = rect(H1, W1, 30, 10, 50, 35)  # crowd, uncompressed dict RLE
M3 = rect(H2, W2, 2, 3, 20, 15) + rect(H2, W2, 10, 8, 30, 25)
M4 = rect(H2, W2, 35, 2, 48, 12)  # compressed dict RLE
M5 = rect(H3, W3, 10, 5, 30, 25)
M5[10:20, 15:25] = 0  # a ring with a hole, list of one compressed RLE (refclef style)
M7 = rect(24, 24, 1, 1, 10, 10)
M8 = rect(24, 24, 12, 12, 20, 22)
M9 = rect(24, 24, 0, 0, 5, 5)
M11 = rect(H2, W2, 40, 8, 50, 20)  # overlaps M4 (grefcoco two-target union)

ANNS = [
    (1, 10, [poly(5, 4, 25, 20)], 0),
    (2, 10, uncompressed_rle(M2), 1),
    (3, 262148, [poly(2, 3, 20, 15), poly(10, 8, 30, 25)], 0),
    (4, 262148, compressed_rle(M4), 0),
    (5, 393225, [compressed_rle(M5)], 0),
    (6, 393225, uncompressed_rle(rect(H3, W3, 0, 0, 4, 4)), 1),  # crowd, never referenced
    (7, 20, [poly(1, 1, 10, 10)], 0),
    (8, 21, [poly(12, 12, 20, 22)], 0),
    (9, 21, [poly(0, 0, 5, 5)], 0),
    (10, 20, [], 0),  # empty segmentation: all-zero mask, as LISA
    (11, 262148, [poly(40, 8, 50, 20)], 0),
]

# (ref_id, image_id, ann_id, split, sentences), in file order.
REFS = [
    (0, 10, 1, "train", ["man in red", "  Left Man "]),
    (1, 10, 2, "train", ["the crowd"]),
    (2, 262148, 3, "val", ["  The CHAIR on the Left  ", "chair"]),
    (3, 393225, 5, "val", ["ring"]),
    (4, 262148, 4, "val", ["blue box"]),
    (5, 20, 7, "testA", ["a"]),
    (6, 21, 8, "testB", ["b"]),
    (7, 21, 9, "testAB", ["ab"]),
    (8, 20, 10, "testA", ["nothing drawn"]),
]


def ref_dicts(refs=REFS):
    out, sid = [], 0
    for ref_id, image_id, ann_id, split, sents in refs:
        sentences = []
        for s in sents:
            sentences.append({"tokens": s.split(), "raw": s, "sent_id": sid, "sent": s})
            sid += 1
        out.append({"sent_ids": [x["sent_id"] for x in sentences], "ann_id": ann_id, "ref_id": ref_id,
                    "image_id": image_id, "split": split, "sentences": sentences, "category_id": 1,
                    "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg"})
    return out


def instances(file_name=lambda i: f"COCO_train2014_{i:012d}.jpg"):
    return {
        "info": {}, "licenses": [],
        "images": [{"id": i, "height": h, "width": w, "file_name": file_name(i)} for i, (h, w) in IMAGES.items()],
        "annotations": [{"id": a, "image_id": im, "segmentation": seg, "iscrowd": crowd, "category_id": 1,
                         "area": 0.0, "bbox": [0, 0, 1, 1]} for a, im, seg, crowd in ANNS],
        "categories": [{"id": 1, "name": "thing", "supercategory": "thing"}],
    }


def write_images(image_dir: Path, file_name):
    rng = np.random.default_rng(0)
    for i, (h, w) in IMAGES.items():
        p = image_dir / file_name(i)
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)


def write_refer(root: Path, name="refcoco", split_by="unc", refs=None):
    """A ``dataset/`` dir with ``refer_seg/<name>/refs(<split_by>).p`` + instances + images."""
    d = root / "refer_seg" / name
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"refs({split_by}).p", "wb") as f:
        pickle.dump(ref_dicts() if refs is None else refs, f, protocol=2)
    if name == "refclef":
        fname = lambda i: f"{i % 100:02d}/images/{i}.jpg"  # noqa: E731
        image_dir = root / "refer_seg" / "images" / "saiapr_tc-12"
    else:
        fname = lambda i: f"COCO_train2014_{i:012d}.jpg"  # noqa: E731
        image_dir = root / "refer_seg" / "images" / "mscoco" / "images" / "train2014"
    (d / "instances.json").write_text(json.dumps(instances(fname)))
    write_images(image_dir, fname)
    return root


@pytest.fixture
def refcoco(tmp_path):
    return write_refer(tmp_path)


def by_text(rec):
    return {t.text: t for t in rec.targets}


# -- tiny datasets ---------------------------------------------------------------------------


def test_names_registered():
    assert {"refcoco", "refcoco+", "refcocog", "refclef", "grefcoco"} <= set(dataset_names())


def test_val_grouping_order_texts_and_masks(refcoco):
    r = open_dataset("refcoco", refcoco, "val")
    # LISA's image order is list(set(ids)): 393225 before 262148 (neither file nor sorted order).
    assert [rec.meta["image_id"] for rec in r] == [393225, 262148]
    ring, chairs = r[0], r[1]
    assert ring.key == "COCO_train2014_000000393225"
    assert ring.image_path == refcoco / "refer_seg/images/mscoco/images/train2014/COCO_train2014_000000393225.jpg"
    assert ring.image().shape == (H3, W3, 3)
    np.testing.assert_array_equal(ring.targets[0].mask, M5)

    # refs in file order (ref 2 then ref 4), sentences in order; text stripped, case kept.
    assert [t.text for t in chairs.targets] == ["The CHAIR on the Left", "chair", "blue box"]
    assert [t.meta["sent_id"] for t in chairs.targets] == [3, 4, 6]
    assert chairs.targets[0].meta == {"ref_id": 2, "ann_id": 3, "sent_id": 3, "category_id": 1}
    assert all(t.kind == "phrase" for t in chairs.targets)
    # Overlapping polygons are summed as in LISA: value 2 in the overlap.
    expected = np.zeros((H2, W2), np.uint8)
    expected[3:15, 2:20] += 1
    expected[8:25, 10:30] += 1
    assert (expected == 2).sum() == 7 * 10
    for t in chairs.targets[:2]:
        assert t.mask.dtype == np.uint8 and t.mask.shape == (H2, W2)
        np.testing.assert_array_equal(t.mask, expected)
    np.testing.assert_array_equal(chairs.targets[2].mask, M4)
    assert chairs.masks().shape == (3, H2, W2)


def test_train_split_polygon_and_uncompressed_crowd_rle(refcoco):
    r = open_dataset("refcoco", refcoco, "train")
    assert len(r) == 1
    t = by_text(r[0])
    assert list(t) == ["man in red", "Left Man", "the crowd"]
    np.testing.assert_array_equal(t["man in red"].mask, M1)
    np.testing.assert_array_equal(t["Left Man"].mask, M1)
    np.testing.assert_array_equal(t["the crowd"].mask, M2)


def test_refer_split_semantics_and_empty_segmentation(refcoco):
    # REFER: testA also takes "testAB" refs; testB takes "testB" and "testAB".
    a = open_dataset("refcoco", refcoco, "testA")
    assert sorted(rec.meta["image_id"] for rec in a) == [20, 21]
    rec20 = next(rec for rec in a if rec.meta["image_id"] == 20)
    np.testing.assert_array_equal(by_text(rec20)["a"].mask, M7)
    empty = by_text(rec20)["nothing drawn"]
    assert empty.empty and not empty.mask.any() and empty.mask.shape == (24, 24)
    b = open_dataset("refcoco", refcoco, "testB")
    (rec21,) = list(b)
    assert [t.text for t in rec21.targets] == ["b", "ab"]
    np.testing.assert_array_equal(rec21.targets[0].mask, M8)
    np.testing.assert_array_equal(rec21.targets[1].mask, M9)
    assert sorted(rec.meta["image_id"] for rec in open_dataset("refcoco", refcoco, "test")) == [20, 21]


def test_options_order_overlap_split_by(refcoco):
    r = open_dataset("refcoco", refcoco, "val", image_order="sorted", overlap="union")
    assert [rec.meta["image_id"] for rec in r] == [262148, 393225]
    np.testing.assert_array_equal(r[0].targets[0].mask, (M3 > 0).astype(np.uint8))
    src = refcoco / "refer_seg/refcoco"
    (src / "refs(google).p").write_bytes((src / "refs(unc).p").read_bytes())
    (src / "refs(unc).p").unlink()
    g = open_dataset("refcoco", refcoco, "val", split_by="google")
    assert g.split_by == "google" and len(g) == 2
    with pytest.raises(DataError, match=r"refs\(unc\)\.p"):
        open_dataset("refcoco", refcoco, "val")


def test_root_may_be_refer_seg_dir(refcoco):
    """LISA's ValDataset reads refs from ``--dataset_dir <root>/refer_seg``; accept both."""
    a = open_dataset("refcoco", refcoco, "val")
    b = open_dataset("refcoco", refcoco / "refer_seg", "val")
    assert [x.image_path for x in a] == [x.image_path for x in b]


@pytest.mark.parametrize("name,split_by", [("refcoco+", "unc"), ("refcocog", "umd")])
def test_other_coco_datasets(tmp_path, name, split_by):
    write_refer(tmp_path, name, split_by)
    r = open_dataset(name, tmp_path, "val")
    assert r.split_by == split_by and r.refs_file.name == f"refs({split_by}).p"
    assert r.files(0) == [r[0].image_path, r.refs_file, tmp_path / "refer_seg" / name / "instances.json"]
    assert r.check().ok


def test_refclef_images_and_rle_list(tmp_path):
    write_refer(tmp_path, "refclef")
    r = open_dataset("refclef", tmp_path, "val")
    rec = r[0]
    assert rec.image_path == tmp_path / "refer_seg/images/saiapr_tc-12/25/images/393225.jpg"
    np.testing.assert_array_equal(rec.targets[0].mask, M5)
    rep = r.check()
    assert rep.ok and rep.counts == {"records": 2, "targets": 4, "empty_targets": 0}


def test_grefcoco_no_target_and_multi_target(tmp_path):
    write_refer(tmp_path, "refcoco")  # images + instances layout; grefcoco reuses them
    d = tmp_path / "refer_seg" / "grefcoco"
    d.mkdir()
    (d / "instances.json").write_bytes((tmp_path / "refer_seg/refcoco/instances.json").read_bytes())
    grefs = [
        {"ref_id": 0, "image_id": 262148, "ann_id": [-1], "category_id": [], "split": "val", "no_target": True,
         "sent_ids": [0], "sentences": [{"tokens": ["x"], "raw": "the unicorn", "sent_id": 0, "sent": "the unicorn"}]},
        {"ref_id": 1, "image_id": 262148, "ann_id": [4, 11], "category_id": [1], "split": "val", "no_target": False,
         "sent_ids": [1], "sentences": [{"tokens": ["x"], "raw": "both boxes", "sent_id": 1, "sent": "both boxes"}]},
        {"ref_id": 2, "image_id": 10, "ann_id": 1, "category_id": 1, "split": "train", "no_target": False,
         "sent_ids": [2], "sentences": [{"tokens": ["x"], "raw": "man", "sent_id": 2, "sent": "man"}]},
    ]
    (d / "grefs(unc).json").write_text(json.dumps(grefs))
    r = open_dataset("grefcoco", tmp_path, "val")
    assert len(r) == 1 and r.refs_file.name == "grefs(unc).json"
    none, both = r[0].targets
    assert none.text == "the unicorn" and none.meta["no_target"] is True and none.empty
    assert none.mask.shape == (H2, W2) and not none.mask.any()
    assert both.meta["no_target"] is False and both.meta["ann_id"] == [4, 11]
    union = ((M4 + M11) > 0).astype(np.uint8)
    assert (M4 & M11).any()  # the two targets overlap; the union is still 0/1
    np.testing.assert_array_equal(both.mask, union)
    (train,) = list(open_dataset("grefcoco", tmp_path, "train"))
    np.testing.assert_array_equal(train.targets[0].mask, M1)
    with pytest.raises(DataError, match="testA"):
        open_dataset("grefcoco", tmp_path, "testA")


# -- errors ----------------------------------------------------------------------------------


def test_missing_files_name_the_path(refcoco, tmp_path):
    with pytest.raises(DataError) as e:
        open_dataset("refcoco+", refcoco, "val")
    assert e.value.path.endswith("refer_seg/refcoco+/refs(unc).p")
    (refcoco / "refer_seg/refcoco/instances.json").unlink()
    with pytest.raises(DataError) as e:
        open_dataset("refcoco", refcoco, "val")
    assert e.value.path == str(refcoco / "refer_seg/refcoco/instances.json")


def test_ref_with_missing_annotation(tmp_path):
    refs = ref_dicts()
    refs[3]["ann_id"] = 999
    write_refer(tmp_path, refs=refs)
    with pytest.raises(DataError) as e:
        open_dataset("refcoco", tmp_path, "val")
    assert e.value.path == str(tmp_path / "refer_seg/refcoco/refs(unc).p")
    assert e.value.field == "ref_id=3.ann_id" and "999" in str(e.value)


def test_bad_split_and_bad_segmentation(refcoco):
    with pytest.raises(DataError, match="splits in the file: test.*train, val"):
        open_dataset("refcoco", refcoco, "testC")
    with pytest.raises(DataError, match="no split 'foo'"):
        open_dataset("refcoco", refcoco, "foo")
    inst_file = refcoco / "refer_seg/refcoco/instances.json"
    inst = json.loads(inst_file.read_text())
    inst["annotations"][4]["segmentation"] = compressed_rle(np.zeros((5, 5), np.uint8))  # ann 5: wrong size
    inst_file.write_text(json.dumps(inst))
    r = open_dataset("refcoco", refcoco, "val")
    with pytest.raises(DataError) as e:
        r[0]
    assert e.value.path == str(inst_file) and e.value.field == "annotations[id=5].segmentation"
    rep = r.check()
    assert not rep.ok and rep.problems[0][0] == str(inst_file)
    (refcoco / r.files(1)[0]).unlink()
    assert (str(r.files(1)[0]), "missing") in r.check(decode=False).problems


# -- parity with LISA (eval_seed0 fixture) ---------------------------------------------------


def _fixture():
    d = eval_fixture_dir()
    if d is None:
        pytest.skip("eval fixture (eval_seed0) not available")
    return d


def _png(path):
    return np.asarray(Image.open(path))


@pytest.mark.parametrize("split", ["val", "testA"])
def test_fixture_parity_val(split):
    d = _fixture()
    ev = json.loads((d / "eval_reference.json").read_text())["evals"][f"refcoco|unc|{split}"]
    r = open_dataset("refcoco", d / "dataset", split)
    assert [rec.meta["image_id"] for rec in r] == ev["image_order"]
    assert len(r) == len(ev["samples"])
    for rec, s in zip(r, ev["samples"]):
        assert rec.meta["image_id"] == s["image_id"]
        assert rec.image_path == d / "dataset" / s["image_path"]
        assert [len(rec.targets)] == [len(s["masks"])] and rec.image().shape[:2] == tuple(s["image_hw"])
        for t, m, png in zip(rec.targets, s["masks"], s["gt_mask_png"]):
            assert (t.meta["ref_id"], t.meta["ann_id"], t.meta["sent_id"]) == (m["ref_id"], m["ann_id"], m["sent_id"])
            assert t.text == m["sent_raw_field"].strip()
            assert t.text.lower() == m["text_used"]  # LISA's eval lower-cases (prompt builder's job)
            np.testing.assert_array_equal(t.mask, _png(d / png))


def test_fixture_parity_training_reader():
    d = _fixture()
    src = json.loads((d / "reader_reference.json").read_text())["sources"]["refer_seg"]
    r = open_dataset("refcoco", d / "dataset", "train")
    recs = {str(rec.image_path.relative_to(d / "dataset")): rec for rec in r}
    for draw in src["draws"]:
        rec = recs[draw["image_path"]]
        texts = by_text(rec)
        assert tuple(draw["masks_shape"][1:]) == rec.targets[0].mask.shape
        for cls, png in zip(draw["sampled_classes"], draw["mask_png"]):
            np.testing.assert_array_equal(texts[cls.strip()].mask, _png(d / png))


# -- hostile refs pickles -----------------------------------------------------------------------


class _RunsCommand:
    """A pickle payload: unpickling it calls ``os.system(command)``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


class _Builds:
    """A payload that rebuilds an arbitrary object through a class (``find_class`` too)."""

    def __reduce__(self):
        return collections.OrderedDict, ()


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_hostile_refs_pickle_runs_nothing(tmp_path, protocol):
    marker = tmp_path / "pwned"
    write_refer(tmp_path)
    refs = ref_dicts()
    refs[0]["sentences"][0]["sent"] = _RunsCommand(f"touch {marker}")  # nested deep inside plain data
    with open(tmp_path / "refer_seg/refcoco/refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=protocol)
    with pytest.raises(DataError) as e:
        open_dataset("refcoco", tmp_path, "val")
    assert not marker.exists()
    assert "posix.system" in str(e.value) or "os.system" in str(e.value)
    assert e.value.path == str(tmp_path / "refer_seg/refcoco/refs(unc).p")


def test_refs_pickle_with_any_class_or_garbage_is_refused(tmp_path):
    write_refer(tmp_path)
    path = tmp_path / "refer_seg/refcoco/refs(unc).p"
    with open(path, "wb") as f:
        pickle.dump([_Builds()], f, protocol=2)
    with pytest.raises(DataError, match="OrderedDict"):
        open_dataset("refcoco", tmp_path, "val")
    path.write_bytes(b"\x80\x02not a pickle at all")
    with pytest.raises(DataError, match="cannot read refs"):
        open_dataset("refcoco", tmp_path, "val")

