"""``data.phrasing: any``: every target of a synthetic record, present or absent, is asked
as a bare noun phrase, an imperative, a question or one of LISA's templates (with and
without the segmentation-mask suffix); answers name the shape they paint, absent targets
are rejected with what is missing, and no answer states a number."""
from __future__ import annotations

import re

import numpy as np
import pytest

from lisa_kit.conversation import get_template
from lisa_kit.datasets.hybrid import hybrid_from_config
from lisa_kit.datasets.synthetic import CORNERS, PALETTE, QUESTION_TYPES, SyntheticReasoningSet
from lisa_kit.errors import RecipeError
from lisa_kit.prompts import (IMPERATIVES, PHRASING_KINDS, SEG, WHERE_QUESTIONS, build_sample, phrasing_kinds,
                              seg_turns)
from lisa_kit.recipes import load_recipe, validate_recipe

TPL = get_template("llava_v1")
REJ = "[REJ]"
SUFFIX = re.compile(r"Please (output|respond with) segmentation mask\.$")
SHAPE_NAME = re.compile(r"\b(%s) (%s)\b" % ("|".join(PALETTE), "|".join(CORNERS)))


@pytest.fixture(scope="module")
def records():
    ds = SyntheticReasoningSet(None, "train", size=300, seed=4, absent_ratio=0.25, pixel_counts=False)
    return list(ds)


def _kind_of(question: str, target) -> str:
    """The phrasing kind of ``question``, recognised from its text alone."""
    phrase = target.meta["phrase"]
    if question in (phrase, phrase.removeprefix("the "), target.text) and not question.endswith((".", "?")):
        return "noun"
    if SUFFIX.search(question):
        return "lisa"
    if question == target.text and target.kind == "sentence":
        return "lisa_plain"  # the record's own sentence, without the suffix
    verbs = tuple(t.split("{")[0] for t in IMPERATIVES)
    if question.startswith(verbs) and question.endswith("."):
        return "imperative"
    if question.startswith(tuple(t.split("{")[0] for t in WHERE_QUESTIONS)) and question.endswith("?"):
        return "question"
    return "lisa_plain"  # LISA's short question without the suffix


def _turns(records, **kw):
    out = []
    for i, rec in enumerate(records):
        rng = np.random.default_rng(i)
        out += [(rec, t) for t in seg_turns(rec, rng, 3, -1.0, None, kw.get("reject", REJ),
                                            kw.get("explain_first", False), "any")]
    return out


@pytest.mark.parametrize("explain_first", [False, True, "after_name"])
def test_every_kind_for_every_question_type_present_and_absent(records, explain_first):
    seen: dict[str, set[str]] = {}
    for rec, turn in _turns(records, explain_first=explain_first):
        tgt = rec.targets[turn.target]
        seen.setdefault(tgt.meta["type"], set()).add(_kind_of(turn.question, tgt))
    assert set(seen) == set(QUESTION_TYPES) | {"absent"}
    for qtype, kinds in seen.items():
        assert kinds == set(PHRASING_KINDS), (qtype, kinds)


def test_lisa_plain_questions_lack_the_suffix_and_lisa_ones_have_it(records):
    plain = [t.question for rec, t in _turns(records) if _kind_of(t.question, rec.targets[t.target]) == "lisa_plain"]
    assert plain and not any("segmentation mask" in q for q in plain)


@pytest.mark.parametrize("explain_first", [False, True, "after_name"])
def test_masks_stay_paired_with_seg_and_answers_name_what_they_paint(records, explain_first):
    n_named = 0
    for i, rec in enumerate(records):
        sample = build_sample(rec, np.random.default_rng(i), TPL, 3, -1.0, None, REJ, explain_first, "any")
        turns = seg_turns(rec, np.random.default_rng(i), 3, -1.0, None, REJ, explain_first, "any")
        assert len(sample.conversations) == len(turns)
        expected = []
        for t in turns:
            tgt = rec.targets[t.target]
            if tgt.meta["absent"]:
                assert SEG not in t.answer and t.answer.count(REJ) == 1
                noun = tgt.meta["phrase"].removeprefix("the ")
                assert t.answer == f"There is no {noun} in the image. {REJ}."
            else:
                assert t.answer.count(SEG) == 1 and REJ not in t.answer
                named = SHAPE_NAME.search(t.answer)
                assert named and f"the {named.group(0)}" == tgt.meta["name"], t.answer
                n_named += 1
                expected.append(tgt.mask)
        assert sample.masks.shape[0] == len(expected)
        for got, want in zip(sample.masks, expected):
            np.testing.assert_array_equal(got, want.astype(np.float32))
    assert n_named > 100


def test_after_name_puts_seg_right_after_the_name_and_the_rest_after_it(records):
    """``explain_first: after_name``: "<Name> [SEG] <predicate>", which reads as the
    explanation with [SEG] inserted after the name; absent targets keep "... [REJ]."."""
    n = 0
    for i, rec in enumerate(records):
        first = seg_turns(rec, np.random.default_rng(i), 3, -1.0, None, REJ, True, "any")
        after = seg_turns(rec, np.random.default_rng(i), 3, -1.0, None, REJ, "after_name", "any")
        for a, b in zip(first, after):
            tgt = rec.targets[b.target]
            assert a.question == b.question and a.target == b.target
            if tgt.meta["absent"]:
                assert b.answer == a.answer
                continue
            name = tgt.meta["name"]
            assert b.answer.startswith(name[0].upper() + name[1:] + f" {SEG} ")
            assert b.answer.replace(f" {SEG}", "") == tgt.meta["explanation"]
            assert a.answer == f"{tgt.meta['explanation']} {SEG}."
            n += 1
    assert n > 100


def test_no_digits_in_answers_without_pixel_counts():
    counted = SyntheticReasoningSet(None, "train", size=80, seed=2, question_types=["size"])
    plain = SyntheticReasoningSet(None, "train", size=80, seed=2, question_types=["size"], pixel_counts=False)
    answers = {}
    for name, ds in (("counted", counted), ("plain", plain)):
        answers[name] = [t.answer for i, rec in enumerate(ds)
                         for t in seg_turns(rec, np.random.default_rng(i), 3, -1.0, None, REJ, True, "any")]
    assert any(re.search(r"\d", a) for a in answers["counted"])  # the default still counts pixels
    assert answers["plain"] and not any(re.search(r"\d", a) for a in answers["plain"])
    assert all(a.endswith(f"{SEG}.") and " pixels" not in a for a in answers["plain"])
    everything = SyntheticReasoningSet(None, "val", size=60, absent_ratio=0.2, pixel_counts=False)
    texts = [t.answer for i, rec in enumerate(everything)
             for ef in (False, True)
             for t in seg_turns(rec, np.random.default_rng(i), 3, -1.0, None, REJ, ef, "any")]
    assert not [a for a in texts if re.search(r"\d", a)]


def test_sentences_without_a_phrase_keep_their_own_forms():
    rec = SyntheticReasoningSet(None, "val", size=1, question_types=["size"])[0]
    tgt = rec.targets[0]
    bare = type(tgt)(text=tgt.text, mask=tgt.mask, kind="sentence", meta={})  # e.g. a ReasonSeg sentence
    assert phrasing_kinds(bare) == ("lisa", "lisa_plain")
    assert phrasing_kinds(tgt) == PHRASING_KINDS


def test_lisa_phrasing_is_the_default_and_unknown_values_are_refused(records):
    rec = records[0]
    a = seg_turns(rec, np.random.default_rng(0), 3, -1.0, None, None, False)
    b = seg_turns(rec, np.random.default_rng(0), 3, -1.0, None, None, False, "lisa")
    assert a == b
    with pytest.raises(RecipeError, match="phrasing"):
        seg_turns(rec, np.random.default_rng(0), 3, phrasing="anything")


def test_recipe_key_reaches_the_sampler_and_is_validated():
    cfg = {"samples_per_epoch": 8, "phrasing": "any",
           "sources": {"s": {"datasets": ["synthetic"], "options": {"size": 8}}}}
    assert hybrid_from_config(cfg, TPL).phrasing == "any"
    with pytest.raises(RecipeError):
        hybrid_from_config({**cfg, "phrasing": "some"}, TPL)
    recipe = load_recipe("lisa-tiny-synthetic", ["data.phrasing=some"])
    assert any("data.phrasing" in p for p in validate_recipe(recipe, allow_missing=True))
    assert validate_recipe(load_recipe("lisa-tiny-synthetic", ["data.phrasing=any"]), allow_missing=True) == []
