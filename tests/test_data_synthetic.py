"""The synthetic reasoning-segmentation set: determinism, exact masks, unique answers
(re-derived here independently from the stored scene), absent targets, the on-disk
round trip and the reader plumbing."""
from __future__ import annotations

import collections
import json
import math

import numpy as np
import pytest

from lisa_kit.datasets import open_dataset
from lisa_kit.datasets.synthetic import (AREA_RATIO, CORNERS, PALETTE, POSITION_MARGIN, QUESTION_TYPES,
                                         SyntheticReasoningSet)
from lisa_kit.errors import DataError, InputError


@pytest.fixture(scope="module")
def records():
    ds = SyntheticReasoningSet(None, "train", size=300, seed=1, questions_per_image=4)
    return [ds[i] for i in range(len(ds))]


def _same_record(a, b):
    assert a.key == b.key and a.explanation == b.explanation and a.meta == b.meta
    np.testing.assert_array_equal(a.image(), b.image())
    np.testing.assert_array_equal(a.labels, b.labels)
    assert [(t.text, t.kind, t.meta) for t in a.targets] == [(t.text, t.kind, t.meta) for t in b.targets]
    for ta, tb in zip(a.targets, b.targets):
        np.testing.assert_array_equal(ta.mask, tb.mask)


# ---------------------------------------------------------------- determinism


def test_same_seed_and_index_give_the_same_record_in_any_order():
    a = SyntheticReasoningSet(None, "train", size=20, seed=5)
    b = SyntheticReasoningSet(None, "train", size=20, seed=5)
    for i in (7, 0, 19, 7):
        _same_record(a[i], b[i])
    _same_record(a[-1], b[19])


def test_splits_seeds_and_indices_differ():
    imgs = {(split, seed): [SyntheticReasoningSet(None, split, size=10, seed=seed)[i].image() for i in range(10)]
            for split in ("train", "val", "test") for seed in (0, 1)}
    flat = [(k, i, im) for k, ims in imgs.items() for i, im in enumerate(ims)]
    for x in range(len(flat)):
        for y in range(x + 1, len(flat)):
            assert not np.array_equal(flat[x][2], flat[y][2]), (flat[x][:2], flat[y][:2])


# ---------------------------------------------------------------- exact masks


def test_image_and_masks_agree_pixel_for_pixel(records):
    palette = np.asarray(list(PALETTE.values()), np.uint8)
    for rec in records:
        img, labels, shapes = rec.image(), rec.labels, rec.meta["shapes"]
        h, w = rec.meta["image_size"]
        assert img.shape == (h, w, 3) and img.dtype == np.uint8 and labels.shape == (h, w)
        assert 2 <= len(shapes) <= 5 and set(np.unique(labels)) <= set(range(len(shapes) + 1))
        for j, s in enumerate(shapes):
            m = labels == j + 1
            assert s["id"] == j and s["corners"] == CORNERS[s["kind"]] and s["rgb"] == list(PALETTE[s["color"]])
            assert (img[m] == s["rgb"]).all()
            assert int(m.sum()) == s["area"] > 0
            ys, xs = np.nonzero(m)
            assert s["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert s["center"] == pytest.approx([xs.mean(), ys.mean()], abs=1e-3)
        # No background pixel takes a palette colour, so "pixels of that colour" = the shape.
        bg = img[labels == 0]
        assert not (bg[:, None, :] == palette[None]).all(-1).any()
        # Shapes never touch (no two different shapes are 4-neighbours).
        for a, b in ((labels[1:], labels[:-1]), (labels[:, 1:], labels[:, :-1])):
            assert not ((a > 0) & (b > 0) & (a != b)).any()
        for t in rec.targets:
            assert t.mask.dtype == np.uint8 and t.mask.shape == (h, w)
            np.testing.assert_array_equal(t.mask, (labels == t.meta["answer"] + 1).astype(np.uint8))


# ---------------------------------------------------------------- unique answers, re-derived


def _matching(shapes, color, kind):
    return [s for s in shapes if (color is None or s["color"] == color) and (kind is None or s["kind"] == kind)]


def _argbest(items, key):
    best = min(key(s) for s in items) if items else None
    return [s["id"] for s in items if key(s) == best]


def _resolve(qtype, q, shapes):
    """Every shape that answers the question, from the stored scene alone."""
    if qtype in ("attribute", "absent"):
        return [s["id"] for s in _matching(shapes, q["color"], q["kind"])]
    if qtype == "size":
        group = _matching(shapes, q["color"], q["kind"])
        return _argbest(group, lambda s: -s["area"] if q["order"] == "largest" else s["area"])
    if qtype == "corners":
        group = _matching(shapes, q["color"], None)
        return _argbest(group, lambda s: -s["corners"] if q["order"] == "most" else s["corners"])
    if qtype == "extreme":
        axis, sign = {"left": (0, 1), "right": (0, -1), "top": (1, 1), "bottom": (1, -1)}[q["side"]]
        return _argbest(_matching(shapes, q["color"], q["kind"]), lambda s: sign * s["center"][axis])
    anchors = _matching(shapes, q["anchor"]["color"], q["anchor"]["kind"])
    assert len(anchors) == 1, f"anchor {q['anchor']} is ambiguous"
    a = anchors[0]
    others = [s for s in shapes if s is not a]
    if qtype == "same":
        return [s["id"] for s in others if s[q["attribute"]] == a[q["attribute"]]]

    def dist(s):
        return math.dist(s["center"], a["center"])

    if qtype == "nearest":
        return _argbest(others, dist)
    assert qtype == "relation"
    axis, sign = {"left": (0, -1), "right": (0, 1), "above": (1, -1), "below": (1, 1)}[q["direction"]]
    cone = [s for s in others
            if sign * (s["center"][axis] - a["center"][axis]) > abs(s["center"][1 - axis] - a["center"][1 - axis])]
    return _argbest(cone, dist)


def test_every_question_has_exactly_its_stored_answer(records):
    for rec in records:
        shapes = rec.meta["shapes"]
        for t in rec.targets:
            qtype, q, answer = t.meta["type"], t.meta["query"], t.meta["answer"]
            assert _resolve(qtype, q, shapes) == [answer], (rec.key, t.text, q)


def test_superlatives_win_by_a_margin(records):
    side = min(records[0].meta["image_size"])
    for rec in records:
        shapes = rec.meta["shapes"]
        for t in rec.targets:
            q, s = t.meta["query"], shapes[t.meta["answer"]]
            group = [g for g in _matching(shapes, q.get("color"), q.get("kind")) if g is not s]
            if t.meta["type"] == "size":
                ratio = [(g["area"] / s["area"]) ** (1 if q["order"] == "smallest" else -1) for g in group]
                assert min(ratio) >= AREA_RATIO
            if t.meta["type"] == "extreme":
                axis, sign = {"left": (0, 1), "right": (0, -1), "top": (1, 1), "bottom": (1, -1)}[q["side"]]
                gaps = [sign * (g["center"][axis] - s["center"][axis]) for g in group]
                assert min(gaps) >= POSITION_MARGIN * side - 1e-9


def test_texts_name_what_the_query_says(records):
    for rec in records:
        for t in rec.targets:
            q, text = t.meta["query"], t.text.lower()
            for d in (q, q.get("anchor") or {}):
                for attr in ("color", "kind"):
                    if d.get(attr):
                        assert d[attr] in text, (t.text, q)
            word = q.get("side") or q.get("direction")
            if word:
                said = {"top": ("top", "highest"), "bottom": ("bottom", "lowest")}.get(word, (word,))
                assert any(w in text for w in said), (t.text, q)


def test_types_kinds_phrasings_and_explanations(records):
    by_type: dict[str, set[str]] = {}
    for rec in records:
        assert 1 <= len(rec.targets) <= 4
        queries = [json.dumps([t.meta["type"], t.meta["query"]], sort_keys=True) for t in rec.targets]
        assert len(set(queries)) == len(queries)  # no question asked twice
        assert rec.explanation == rec.targets[0].meta["explanation"]
        for t in rec.targets:
            by_type.setdefault(t.meta["type"], set()).add(t.text)
            assert t.kind == ("phrase" if t.meta["type"] == "attribute" else "sentence")
            assert t.meta["absent"] is False and not t.empty
            s = rec.meta["shapes"][t.meta["answer"]]
            assert f"the {s['color']} {s['kind']}" in t.meta["explanation"].lower()
    assert set(by_type) == set(QUESTION_TYPES)
    assert all(len(texts) >= 5 for texts in by_type.values()), {k: len(v) for k, v in by_type.items()}
    assert sum(len(r.targets) == 4 for r in records) >= 0.9 * len(records)


def test_phrase_and_name_say_what_is_asked_and_what_answers(records):
    for rec in records:
        for t in rec.targets:
            s, q, phrase = rec.meta["shapes"][t.meta["answer"]], t.meta["query"], t.meta["phrase"]
            assert t.meta["name"] == f"the {s['color']} {s['kind']}"
            assert phrase.startswith("the ") and not phrase.endswith((".", "?"))
            for d in (q, q.get("anchor") or {}):  # the same colours and kinds as the question
                for attr in ("color", "kind"):
                    if d.get(attr):
                        assert d[attr] in phrase, (phrase, q)
            word = {"left": "left", "right": "right", "top": "top", "bottom": "bottom", "above": "above",
                    "below": "below", "largest": "largest", "smallest": "smallest", "most": "most corners",
                    "fewest": "fewest corners"}.get(q.get("side") or q.get("direction") or q.get("order"))
            assert word is None or word in phrase, (phrase, q)


def test_pixel_counts_option_drops_the_number_only():
    kw = dict(size=60, seed=7, question_types=["size"], questions_per_image=1)
    counted, plain = SyntheticReasoningSet(None, "val", **kw), SyntheticReasoningSet(None, "val", **kw,
                                                                                    pixel_counts=False)
    for a, b in zip(counted, plain):
        assert a.targets[0].text == b.targets[0].text and a.meta == b.meta  # same scenes and questions
        area = a.meta["shapes"][a.targets[0].meta["answer"]]["area"]
        assert a.explanation.endswith(f", covering {area} pixels.")
        assert b.explanation == a.explanation.replace(f", covering {area} pixels.", ".")
        assert not any(ch.isdigit() for ch in b.explanation)


def test_corner_explanation_reads_naturally():
    ds = SyntheticReasoningSet(None, "val", size=200, question_types=["corners"], questions_per_image=1)
    explanations = {ds[i].explanation for i in range(len(ds))}
    assert any(e.endswith("corners, more than any other shape.") for e in explanations)
    assert any(" has no corners, fewer than any other " in e for e in explanations)


# ---------------------------------------------------------------- absent targets


def test_absent_questions_have_empty_masks():
    ds = SyntheticReasoningSet(None, "val", size=40, absent_ratio=1.0, questions_per_image=2)
    for rec in ds:
        assert rec.targets
        for t in rec.targets:
            assert t.meta["type"] == "absent" and t.meta["absent"] is True and t.meta["answer"] is None
            assert t.kind == "phrase" and t.empty and t.mask.shape == tuple(rec.meta["image_size"])
            assert not t.mask.any()
            assert _resolve("absent", t.meta["query"], rec.meta["shapes"]) == []
            assert t.meta["explanation"].startswith("There is no ")


def test_absent_name_first_names_the_missing_shape_before_saying_so():
    """The same records, only the absent explanations change: "The <noun> is not in the
    image." (a model then reads the name before it chooses [SEG] or [REJ])."""
    plain = SyntheticReasoningSet(None, "val", size=20, absent_ratio=0.5)
    named = SyntheticReasoningSet(None, "val", size=20, absent_ratio=0.5, absent_name_first=True)
    n_absent = 0
    for a, b in zip(plain, named):
        np.testing.assert_array_equal(a.image(), b.image())
        for ta, tb in zip(a.targets, b.targets, strict=True):
            assert ta.text == tb.text and ta.meta["type"] == tb.meta["type"]
            if ta.meta["absent"]:
                n_absent += 1
                noun = ta.meta["explanation"].removeprefix("There is no ").removesuffix(" in the image.")
                assert tb.meta["explanation"] == f"The {noun} is not in the image."
            else:
                assert ta.meta["explanation"] == tb.meta["explanation"]
    assert n_absent > 0
    with pytest.raises(InputError, match="absent_name_first must be true or false"):
        SyntheticReasoningSet(None, "val", absent_name_first="yes")


def test_absent_ratio_mixes_and_defaults_to_none(records):
    assert not any(t.meta["absent"] for r in records for t in r.targets)
    ds = SyntheticReasoningSet(None, "train", size=100, absent_ratio=0.3)
    flags = [t.meta["absent"] for r in ds for t in r.targets]
    assert 0.15 < sum(flags) / len(flags) < 0.45


def _lookup_form(t) -> str:
    q = t.meta["query"]
    return "colour+kind" if q["color"] and q["kind"] else "colour" if q["color"] else "kind"


def test_absent_from_lookups_keeps_a_phrase_form_from_giving_its_answer_away():
    """``absent_from="lookups"``: only attribute lookups are replaced by absent ones, each
    by one of its own form, so every form is absent about ``absent_ratio`` of the time;
    with the default (any question), a "<colour> <kind>" phrase is absent most of the time."""
    def share_absent(ds):
        counts = collections.Counter()
        for rec in ds:
            for t in rec.targets:
                if t.meta["type"] in ("attribute", "absent"):
                    counts[(_lookup_form(t), t.meta["absent"])] += 1
                else:
                    assert not t.meta["absent"]
        return {f: counts[(f, True)] / (counts[(f, True)] + counts[(f, False)])
                for f in ("colour+kind", "colour", "kind")}

    default = share_absent(SyntheticReasoningSet(None, "train", size=600, absent_ratio=0.1))
    assert default["colour+kind"] > 0.4 and default["kind"] == 0.0
    lookups = SyntheticReasoningSet(None, "train", size=600, absent_ratio=0.4, absent_from="lookups")
    shares = share_absent(lookups)
    assert all(0.25 < v < 0.55 for v in shares.values()), shares
    for rec in lookups:
        for t in rec.targets:
            if t.meta["absent"]:  # an absent lookup matches no shape and is answered as one
                assert _resolve("absent", t.meta["query"], rec.meta["shapes"]) == []
                assert not t.mask.any() and t.kind == "phrase"
                assert t.meta["explanation"].startswith("There is no ")
    # the default's records are unchanged by the new option's existence (same draws)
    a = SyntheticReasoningSet(None, "val", size=5, absent_ratio=0.3)
    b = SyntheticReasoningSet(None, "val", size=5, absent_ratio=0.3, absent_from="questions")
    assert [t.text for r in a for t in r.targets] == [t.text for r in b for t in r.targets]
    with pytest.raises(InputError, match="absent_from must be one of questions, lookups"):
        SyntheticReasoningSet(None, "val", absent_from="scenes")


# ---------------------------------------------------------------- options


def test_options_restrict_the_scene():
    ds = SyntheticReasoningSet(None, "test", size=30, image_size=(48, 80), colors=["red", "blue", "green"],
                               kinds=["circle", "square"], min_shapes=3, max_shapes=3, texture=0,
                               question_types=["size", "extreme"])
    for rec in ds:
        img = rec.image()
        assert img.shape == (48, 80, 3)
        assert len(rec.meta["shapes"]) == 3
        assert {s["color"] for s in rec.meta["shapes"]} <= {"red", "blue", "green"}
        assert {s["kind"] for s in rec.meta["shapes"]} <= {"circle", "square"}
        assert {t.meta["type"] for t in rec.targets} <= {"size", "extreme"}
        bg = img[rec.labels == 0]
        assert (bg == bg[0]).all()  # texture=0: a plain background


@pytest.mark.parametrize("bad", [{"colors": ["teal"]}, {"kinds": ["star"]}, {"question_types": ["count"]},
                                 {"image_size": (16, 16)}, {"absent_ratio": 1.5}, {"min_shapes": 1},
                                 {"texture": 50}, {"pixel_counts": "no"}])
def test_bad_options_are_input_errors(bad):
    with pytest.raises(InputError):
        SyntheticReasoningSet(None, "train", **bad)


def test_registered_and_opened_like_every_reader(tmp_path):
    ds = open_dataset("synthetic", None)
    assert isinstance(ds, SyntheticReasoningSet) and ds.split == "train" and len(ds) == 10_000
    ds = open_dataset("synthetic", tmp_path, "val", size=3, seed=2)  # a root without the layout: generated
    assert len(ds) == 3 and ds.files(0) == [] and ds[0].key == "val/000000"
    assert str(ds[0].image_path) == "synthetic/val/000000.png"
    with pytest.raises(DataError):
        open_dataset("synthetic", None, "dev")
    with pytest.raises(IndexError):
        ds[3]
    assert [r.key for r in ds] == ["val/000000", "val/000001", "val/000002"]
    report = ds.check()
    assert report.ok and report.counts["records"] == 3 and report.counts["targets"] == 9


# ---------------------------------------------------------------- materialised layout


def test_write_and_read_back(tmp_path):
    gen = SyntheticReasoningSet(None, "val", size=12, seed=3, absent_ratio=0.25, image_size=(40, 56))
    out = gen.write(tmp_path)
    assert out == tmp_path / "synthetic" / "val" and (out / "annotations.json").is_file()
    back = open_dataset("synthetic", tmp_path, "val", seed=99)  # stored options win
    assert len(back) == 12 and back.options == gen.options
    for i in range(12):
        rec = back[i]
        assert rec.pixels is None and rec.image_path == out / "images" / f"{i:06d}.png"
        assert back.files(i) == [out / "images" / f"{i:06d}.png", out / "labels" / f"{i:06d}.png"]
        _same_record(gen[i], rec)
    assert back.check().ok
    assert len(open_dataset("synthetic", tmp_path, "val", size=5)) == 5
    with pytest.raises(DataError):
        open_dataset("synthetic", tmp_path, "val", size=13)
    (out / "labels" / "000004.png").unlink()
    report = back.check()
    assert [p for p, _ in report.problems] == [str(out / "labels" / "000004.png")]
    (out / "annotations.json").write_text("{not json")
    with pytest.raises(DataError, match="annotations.json"):
        open_dataset("synthetic", tmp_path, "val")


def test_generation_is_fast():
    # Kept quick (about a millisecond per record) because tests, benchmarks and the demo
    # trainer generate on the fly; nothing is timed here to stay robust on slow machines.
    ds = SyntheticReasoningSet(None, "train", size=200)
    assert sum(len(r.targets) for r in ds) > 0
