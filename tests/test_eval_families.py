"""Evaluation beyond LISA's numbers: gIoU/cIoU per synthetic question family and per
phrasing kind (subsets that partition ``all``), and answer-mask consistency (does the
answer name the shape its mask paints?) on hand-built scenes and through the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lisa_kit.datasets import open_dataset
from lisa_kit.datasets.synthetic import QUESTION_TYPES
from lisa_kit.errors import RecipeError
from lisa_kit.evaluate import (CONSISTENCY_VERDICTS, Evaluator, answer_consistency, consistency_summary,
                               painted_shape, question_family)
from lisa_kit.prompts import PHRASING_KINDS

FAMILIES = {"colour", "kind", "colour+kind", "size", "corners", "position", "relations", "absent"}


@pytest.fixture(scope="module")
def reader():
    return open_dataset("synthetic", None, "val", size=12, absent_ratio=0.25, questions_per_image=4)


def test_every_question_type_has_a_family(reader):
    seen = {}
    big = open_dataset("synthetic", None, "train", size=200, absent_ratio=0.2)
    for rec in big:
        for t in rec.targets:
            seen.setdefault(t.meta["type"], set()).add(question_family(t.meta))
    assert set(seen) == set(QUESTION_TYPES) | {"absent"}
    assert set().union(*seen.values()) == FAMILIES
    assert seen["attribute"] == {"colour", "kind", "colour+kind"} and seen["extreme"] == {"position"}
    assert question_family({"type": "attribute", "query": {"color": "red", "kind": None}}) == "colour"
    assert question_family({}) is None  # not a synthetic target: no family


def _partition(results: dict, prefix: str) -> None:
    """The ``prefix`` subsets hold every query of ``all`` exactly once, with its stats."""
    every = {q["key"]: q for q in results["all"]["per_query"]}
    parts = {name: r for name, r in results.items() if name.startswith(prefix)}
    assert parts
    assert sum(r["n_queries"] for r in parts.values()) == results["all"]["n_queries"] == len(every)
    seen = [q["key"] for r in parts.values() for q in r["per_query"]]
    assert sorted(seen) == sorted(every)
    for r in parts.values():
        for q in r["per_query"]:
            assert (q["intersection"], q["union"]) == (every[q["key"]]["intersection"], every[q["key"]]["union"])
    total_i = sum(r["intersection"][1] for r in parts.values())
    assert total_i == pytest.approx(results["all"]["intersection"][1])


@pytest.mark.parametrize("phrasing", ["lisa", "any"])
def test_families_and_phrasings_sum_back_to_all(tiny_model, reader, phrasing):
    res = Evaluator(tiny_model, reader, modes=("teacher",), progress=False, phrasing=phrasing).run()["teacher"]
    _partition(res, "family:")
    assert {n.removeprefix("family:") for n in res if n.startswith("family:")} <= FAMILIES
    if phrasing == "any":
        _partition(res, "phrasing:")
        assert {n.removeprefix("phrasing:") for n in res if n.startswith("phrasing:")} == set(PHRASING_KINDS)
    else:
        assert not any(n.startswith("phrasing:") for n in res)


def test_any_phrasing_asks_other_questions_deterministically(tiny_model, reader):
    lisa = Evaluator(tiny_model, reader, progress=False)
    any_ = Evaluator(tiny_model, reader, progress=False, phrasing="any")
    rec = reader[0]
    assert all(q.question is None for q in lisa.queries(rec, 0))  # LISA's eval_question, unchanged
    asked = [q.question for q in any_.queries(rec, 0)]
    assert asked == [q.question for q in any_.queries(rec, 0)]
    kinds = [q.phrasing for q in any_.queries(rec, 0)]
    assert len(set(kinds)) == len(kinds) == len(rec.targets)  # consecutive queries: different kinds
    with pytest.raises(RecipeError):
        Evaluator(tiny_model, reader, phrasing="every")


# ---------------------------------------------------------------- consistency, by hand


def _scene():
    """Two shapes on 20x20: a blue square (label 1) left, a red circle (label 2) right."""
    labels = np.zeros((20, 20), np.uint8)
    labels[5:12, 1:8] = 1
    labels[5:12, 11:18] = 2
    shapes = [{"color": "blue", "kind": "square"}, {"color": "red", "kind": "circle"}]
    return labels, shapes


def test_consistency_right_and_wrong_shape():
    labels, shapes = _scene()
    on_square = labels == 1
    assert answer_consistency("The blue square is the largest shape. [SEG].", on_square, labels, shapes) \
        == "consistent"
    assert answer_consistency("The red circle [SEG].", on_square, labels, shapes) == "wrong_shape"
    # named but absent from the scene: still a named shape, not the painted one
    assert answer_consistency("It is the purple triangle, [SEG].", on_square, labels, shapes) == "wrong_shape"
    # the mask spills onto the circle but mostly covers the square
    spill = on_square.copy()
    spill[5:7, 11:13] = True
    assert painted_shape(spill, labels, 2) == 0
    assert answer_consistency("The blue square [SEG].", spill, labels, shapes) == "consistent"
    # anchors named later do not count: the first named shape is the answer's subject
    assert answer_consistency("The red circle is the nearest shape to the right of the blue square. [SEG].",
                              labels == 2, labels, shapes) == "consistent"


def test_consistency_empty_masks_and_rejections():
    labels, shapes = _scene()
    empty = np.zeros_like(labels, bool)
    assert answer_consistency("There is no purple triangle in the image. [REJ].", empty, labels, shapes) \
        == "consistent"
    assert answer_consistency("[REJ].", None, labels, shapes, rejected=True) == "consistent"
    assert answer_consistency("The purple triangle is not in the image.", empty, labels, shapes) == "consistent"
    assert answer_consistency("Sorry, the image has no such object.", None, labels, shapes) == "consistent"
    assert answer_consistency("There is no green hexagon.", labels == 2, labels, shapes) == "rejected_with_mask"
    assert answer_consistency("The blue square is the largest shape.", None, labels, shapes) == "empty_mask"
    background_only = np.zeros_like(labels, bool)
    background_only[15:, :] = True  # paints no shape at all
    assert answer_consistency("The blue square [SEG].", background_only, labels, shapes) == "empty_mask"
    assert answer_consistency("Sure, [SEG].", labels == 1, labels, shapes) == "unnamed"


def test_consistency_summary_counts_and_rate():
    verdicts = {"a#0": ("size", "consistent"), "a#1": ("size", "wrong_shape"), "b#0": ("absent", "consistent"),
                "b#1": ("colour", "unnamed")}
    s = consistency_summary(verdicts)
    assert (s["n"], s["consistent"], s["rate"]) == (4, 2, 0.5)
    assert sum(s["verdicts"].values()) == 4 and set(s["verdicts"]) == set(CONSISTENCY_VERDICTS)
    assert s["families"]["size"]["rate"] == 0.5 and s["families"]["absent"]["rate"] == 1.0
    assert consistency_summary({})["rate"] is None
    # a rejection of a shape that is there is consistent (empty mask) but counted apart
    s = consistency_summary({"a#0": ("colour", "consistent", True, True), "a#1": ("colour", "consistent", True, False),
                             "b#0": ("absent", "consistent", False, True)})
    assert (s["rate"], s["present"], s["rejected_present"]) == (1.0, 2, 1)
    assert s["families"]["absent"]["rejected_present"] == 0 and s["families"]["colour"]["present"] == 2


# ---------------------------------------------------------------- through the evaluator and CLI


def test_generate_mode_gives_every_query_a_verdict(tiny_model, reader):
    ev = Evaluator(tiny_model, reader, modes=("teacher", "generate"), max_new_tokens=2, limit=2, progress=False,
                   phrasing="any")
    res = ev.run()
    assert set(ev.consistency) == {"generate"}  # teacher mode gives the answer: nothing to check
    c = ev.consistency["generate"]
    assert c["n"] == res["generate"]["all"]["n_queries"] == sum(c["verdicts"].values())
    assert sum(f["n"] for f in c["families"].values()) == c["n"]
    assert c["present"] == sum(f["present"] for f in c["families"].values())
    assert c["present"] == c["n"] - c["families"].get("absent", {"n": 0})["n"] and 0 <= c["rejected_present"] <= c["present"]


def test_cli_reports_families_phrasings_and_consistency(tmp_path):
    from lisa_kit.cli import main

    rc = main(["eval", "lisa-tiny", "--dataset", "synthetic:val", "--limit", "3", "--mode", "generate",
               "--max-new-tokens", "4", "--phrasing", "any", "--dataset-option", "absent_ratio=0.5",
               "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    ev = report["evals"][0]
    assert report["phrasing"] == "any" and report["dataset_options"] == {"absent_ratio": 0.5}
    modes = ev["modes"]["generate"]
    assert "all" in modes and "family:absent" in modes and any(k.startswith("phrasing:") for k in modes)
    assert ev["consistency"]["generate"]["n"] == modes["all"]["n_queries"]
    md = (tmp_path / "metrics.md").read_text()
    assert "| generate | family:absent |" in md and "Answer-mask consistency (generate)" in md
    assert "present target rejected" in md


def test_cli_refuses_malformed_dataset_options(tmp_path):
    from lisa_kit.cli import main

    for bad in ("absent_ratio", "absent_ratio=2", "colour=red", "dataset=refcoco"):
        assert main(["eval", "lisa-tiny", "--dataset", "synthetic:val", "--limit", "1", "--mode", "teacher",
                     "--dataset-option", bad, "--out", str(tmp_path)]) != 0
