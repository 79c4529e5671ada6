"""Text box/point answers (prompt_strategy: text_geometry, lisa_kit.geometry_answers): the
Seg-Zero and VisionReasoner formats, every malformed class flagged (never raised), SAM's
decode_geometry in the input frame, recipe checks, and the tiny recipe end to end
(Segmenter with a forced answer, training on synthetic shapes, evaluation)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lisa_kit.errors import RecipeError
from lisa_kit.geometry_answers import (FORMATS, PROBLEMS, AnswerFormat, TextGeometry, decode_answers,
                                       register_format, text_geometry_of)
from lisa_kit.interfaces import ImageMeta

RECIPE = "lisa-tiny-textbox"
H, W = 48, 64  # a non-square image: x and y scale differently


def geo(**kw) -> TextGeometry:
    return TextGeometry.from_config(kw)


def vr(objs) -> str:
    return f"<think>looking</think><answer>{json.dumps(objs)}</answer>"


# -- parsing ---------------------------------------------------------------------------------
def test_vision_reasoner_several_objects_in_original_pixels():
    text = vr([{"bbox_2d": [1, 2, 30, 40], "point_2d": [10, 20]}, {"bbox_2d": [0, 0, W, H]}])
    p = geo(format="vision_reasoner").parse(text, (H, W))
    assert p.problem is None and p.think == "looking"
    assert [o.box for o in p.objects] == [(1, 2, 30, 40), (0, 0, W, H)]
    assert p.objects[0].points == [(10, 20)] and p.objects[1].points == []
    assert p.problems() == [None, None]
    # each object's span is its own JSON text
    assert [json.loads(text[a:b]) for a, b in (o.span for o in p.objects)] == json.loads(
        text[text.index("<answer>") + 8:text.index("</answer>")])


def test_seg_zero_one_object_two_points_in_its_840_frame():
    answer = {"bbox": [84, 420, 840, 840], "points_1": [168, 630], "points_2": [420, 504]}
    p = geo(format="seg_zero", frame="format").parse(f"<think>t</think><answer>{json.dumps(answer)}</answer>", (H, W))
    (o,) = p.objects
    sx, sy = W / 840, H / 840  # Seg-Zero's frame maps back by W/840 and H/840 per axis
    assert o.problem is None
    assert o.box == pytest.approx((84 * sx, 420 * sy, 840 * sx, 840 * sy))
    assert o.points == [pytest.approx((168 * sx, 630 * sy)), pytest.approx((420 * sx, 504 * sy))]


def test_seg_zero_single_quotes_and_a_list_of_objects():
    g = geo(format="seg_zero")
    one = g.parse("<answer>{'bbox': [1, 2, 3, 4], 'points_1': [2, 3], 'points_2': [1, 2]}</answer>", (H, W))
    assert one.problem is None and one.objects[0].box == (1, 2, 3, 4) and len(one.objects[0].points) == 2
    two = g.parse('<answer>[{"bbox": [1, 2, 3, 4]}, {"bbox": [5, 6, 7, 8], "points_1": [6, 7]}]</answer>', (H, W))
    assert [o.box for o in two.objects] == [(1, 2, 3, 4), (5, 6, 7, 8)]


@pytest.mark.parametrize("text, code", [
    ("The red circle, clearly.", "no_answer"),
    ("<think>x</think><answer>[{'bbox_2d': [1, 2, 3,", "no_answer"),  # cut before </answer>
    ("<answer>[{bbox_2d: [1, 2, 3, 4]}]</answer>", "bad_json"),
    ("<answer></answer>", "bad_json"),
    ("<answer>[]</answer>", "no_objects"),
])
def test_whole_answer_problems(text, code):
    p = geo().parse(text, (H, W))
    assert p.objects == [] and p.problem.code == code and p.problems() == [p.problem]


@pytest.mark.parametrize("obj, code", [
    ({"point_2d": [3, 4]}, "missing_box"),
    ({"bbox_2d": None}, "missing_box"),
    ({"bbox_2d": ["1", 2, 3, 4]}, "not_numeric"),
    ({"bbox_2d": [1, 2, 3]}, "not_numeric"),
    ({"bbox_2d": [True, 2, 3, 4]}, "not_numeric"),
    ({"bbox_2d": [1, 2, 3, 4], "point_2d": ["a", 1]}, "not_numeric"),
    ({"bbox_2d": [30, 2, 10, 4]}, "inverted_box"),
    ({"bbox_2d": [1, 20, 10, 4]}, "inverted_box"),
    ({"bbox_2d": [-1, 2, 10, 4]}, "outside_image"),
    ({"bbox_2d": [1, 2, 10, 4], "point_2d": [5, -1]}, "outside_image"),
    ({"bbox_2d": [1, 2, 900, 40]}, "outside_image"),  # outside the image and the 840 frame
    ({"bbox_2d": [100, 200, 700, 800], "point_2d": [300, 400]}, "resized_frame"),  # fits only 840 x 840
])
def test_object_problems_next_to_a_good_object(obj, code):
    p = geo().parse(vr([{"bbox_2d": [1, 2, 10, 12]}, obj]), (H, W))
    assert p.problem is None and p.objects[0].problem is None
    assert p.objects[1].problem.code == code and p.objects[1].problem.message.startswith("object 1")
    assert [q is None for q in p.problems()] == [True, False]


def test_nan_and_infinity_are_not_numbers():
    for bad in ("NaN", "Infinity", "1e999"):
        p = geo().parse(f'<answer>[{{"bbox_2d": [1, 2, {bad}, 4]}}]</answer>', (H, W))
        assert p.objects[0].problem.code == "not_numeric", bad


def test_resized_frame_bounds_and_max_objects():
    g = geo(frame=[100, 200])  # (H, W) of the frame the model writes in
    ok = g.parse(vr([{"bbox_2d": [0, 0, 200, 100]}]), (H, W)).objects[0]
    assert ok.problem is None and ok.box == pytest.approx((0, 0, W, H))
    assert g.parse(vr([{"bbox_2d": [0, 0, 201, 100]}]), (H, W)).objects[0].problem.code == "outside_image"
    many = geo(max_objects=2).parse(vr([{"bbox_2d": [1, 1, 2, 2]}] * 5), (H, W))
    assert len(many.objects) == 2


def test_random_garbage_never_raises():
    """Mutations of good answers and random strings over JSON-ish pieces: every outcome is a
    parsed object or a problem with a known code."""
    rng = np.random.default_rng(0)
    good = [vr([{"bbox_2d": [1, 2, 30, 40], "point_2d": [10, 20]}, {"bbox_2d": [3, 4, 5, 6]}]),
            "<answer>{'bbox': [1, 2, 3, 4], 'points_1': [2, 3], 'points_2': [1, 2]}</answer>"]
    pieces = ["<answer>", "</answer>", "<think>", "</think>", "{", "}", "[", "]", ",", ":", '"', "'", "bbox_2d",
              "point_2d", "bbox", "points_1", "-", "1e309", "NaN", "null", "true", "1", "42", "3.5", " ", "\\", "[[["]
    texts = []
    for _ in range(300):
        t = list(good[int(rng.integers(2))])
        for _ in range(int(rng.integers(1, 6))):  # delete, duplicate or replace a few characters
            i = int(rng.integers(len(t)))
            op = int(rng.integers(3))
            if op == 0:
                del t[i]
            elif op == 1:
                t.insert(i, t[i])
            else:
                t[i] = chr(int(rng.integers(32, 127)))
        texts.append("".join(t))
    texts += ["".join(rng.choice(pieces, int(rng.integers(1, 40)))) for _ in range(300)]
    texts += ["<answer>" + "[" * 5000 + "</answer>", "<answer>" + "9" * 400 + "</answer>"]
    seen = set()
    for fmt in ("vision_reasoner", "seg_zero"):
        for frame in ("original", "format"):
            g = geo(format=fmt, frame=frame)
            for t in texts:
                p = g.parse(t, (H, W))
                for o in p.objects:
                    if o.problem is None:
                        x0, y0, x1, y1 = o.box
                        assert 0 <= x0 <= x1 <= W and 0 <= y0 <= y1 <= H and all(map(math.isfinite, o.box))
                seen |= {q.code for q in p.problems() if q is not None}
    assert seen <= set(PROBLEMS) and len(seen) >= 5


def test_write_then_parse_gives_the_targets_box_and_point():
    mask = np.zeros((H, W), np.uint8)
    mask[5:20, 10:41] = 1
    mask[0, 0] = 255  # ignored pixels are not the object
    for frame in ("original", "format"):
        g = geo(frame=frame, think=True)
        text = g.write_masks([mask, np.zeros_like(mask)], (H, W), think="the bar")
        assert text.startswith("<think>the bar</think><answer>")
        (o,) = g.parse(text, (H, W)).objects  # the empty (absent) target is left out
        tol = 0 if frame == "original" else max(W, H) / 840 + 1e-6
        assert o.box == pytest.approx((10, 5, 41, 20), abs=tol)
        assert mask[int(o.points[0][1]), int(o.points[0][0])] == 1
    assert geo().write_masks([np.zeros((H, W))], (H, W)) == "<answer>[]</answer>"


# -- recipe choice ---------------------------------------------------------------------------
@pytest.mark.parametrize("node, key", [
    ({"format": "bogus"}, "model.text_geometry.format"),
    ({"frame": "resized"}, "model.text_geometry.frame"),
    ({"frame": [0, 840]}, "model.text_geometry.frame"),
    ({"points": "yes"}, "model.text_geometry.points"),
    ({"max_objects": 0}, "model.text_geometry.max_objects"),
    ({"colour": 1}, "model.text_geometry.colour"),
])
def test_bad_settings_name_the_key(node, key):
    with pytest.raises(RecipeError) as e:
        text_geometry_of({"prompt_strategy": "text_geometry", "text_geometry": node})
    assert e.value.key == key
    with pytest.raises(RecipeError, match="prompt_strategy"):
        text_geometry_of({"prompt_strategy": "boxes"})
    assert text_geometry_of({}) is None


def _problems(**model):
    from lisa_kit.recipes import load_recipe, validate_recipe

    over = [f"model.{k}={v}" for k, v in model.items()]
    return [p for p in validate_recipe(load_recipe(RECIPE, over))]


def test_validate_rejects_bad_choices_without_building(monkeypatch, capsys):
    from lisa_kit.cli import main

    assert _problems() == []
    assert main(["validate", "--set", "model.text_geometry.format=bogus", RECIPE]) == 1
    assert "model.text_geometry.format: unknown answer format 'bogus'" in capsys.readouterr().out
    assert any("unknown answer format 'bogus'" in str(p) for p in _problems(**{"text_geometry.format": "bogus"}))
    assert any("model.seg_head.name" in str(p) for p in _problems(prompt_strategy="seg_token", text_geometry="null"))
    assert any("only with model.prompt_strategy" in str(p) for p in _problems(prompt_strategy="seg_token"))
    assert any("model.reject_token" in str(p) for p in _problems(reject_token="[REJ]"))
    from lisa_kit.components.sam import SamMaskDecoder

    monkeypatch.setattr(SamMaskDecoder, "accepts_geometry", False)
    assert any("box/point prompts" in str(p) for p in _problems())
    from lisa_kit.builder import build_model
    from lisa_kit.recipes import load_recipe

    with pytest.raises(RecipeError, match="box/point prompts") as e:
        build_model(load_recipe(RECIPE).cfg)
    assert e.value.key == "model.mask_decoder"


def test_a_plugin_format_is_accepted():
    class Plain(AnswerFormat):  # "<answer>x0 y0 x1 y1</answer>" as a JSON list
        name = "test_plain_list"

        def objects(self, data):
            return [{"box": data, "points": []}] if isinstance(data, list) else None

        def render(self, objects):
            return objects[0][0]

    register_format(Plain)
    try:
        g = geo(format="test_plain_list")
        assert g.parse("<answer>[1, 2, 3, 4]</answer>", (H, W)).objects[0].box == (1, 2, 3, 4)
        assert g.parse("<answer>7</answer>", (H, W)).problem.code == "no_objects"
        with pytest.raises(RecipeError, match="already registered"):
            register_format(type("Other", (Plain,), {}))
    finally:
        FORMATS.pop("test_plain_list")


# -- the decoder in the input frame ------------------------------------------------------------
def test_to_input_scales_each_axis():
    meta = ImageMeta(original_size=(H, W), input_size=(24, 32))
    assert meta.to_input(torch.tensor([[W, H], [10.0, 6.0]])).tolist() == [[32, 24], [5, 3]]


@pytest.fixture(scope="module")
def segmenter():
    from lisa_kit.api import Segmenter

    torch.manual_seed(0)
    return Segmenter.from_recipe(RECIPE)


def test_decode_answers_sends_input_frame_boxes_and_padded_points(segmenter, monkeypatch):
    model = segmenter.model
    dec = model.mask_decoder
    calls = []
    real = type(dec).decode_geometry

    def spy(self, feats, boxes, points, labels):  # records, then runs the real decoder
        calls.append((boxes.clone(), None if points is None else points.clone(), labels))
        return real(self, feats, boxes, points, labels)

    monkeypatch.setattr(type(dec), "decode_geometry", spy)
    image = np.zeros((H, W, 3), np.uint8)
    px, meta = dec.preprocess(image)
    with torch.no_grad():
        feats = dec.encode_image(px[None])
        out = decode_answers(model, [vr([{"bbox_2d": [0, 0, W, H], "point_2d": [W, H]}, {"bbox_2d": [8, 6, 16, 12]}]),
                                     vr([{"bbox_2d": [30, 6, 20, 12]}]), "no answer"], [0, 0, 0], feats, [meta])
    # valid objects only, one call per number of points (no padding between objects)
    (b0, p0, l0), (b1, p1, l1) = sorted(calls, key=lambda c: c[1] is not None)
    s = torch.tensor([meta.input_size[1] / W, meta.input_size[0] / H])
    assert torch.allclose(b0, torch.tensor([[8, 6, 16, 12]]) * s.repeat(2)) and p0 is None and l0 is None
    assert torch.allclose(b1, torch.tensor([[0, 0, W, H]]) * s.repeat(2))
    assert torch.allclose(p1, (torch.tensor([W, H]) * s).view(1, 1, 2)) and l1.tolist() == [[1]]
    assert [o["masks"].shape for o in out] == [(2, H, W), (1, H, W), (1, H, W)]
    assert [o["malformed"][0] is None for o in out] == [True, False, False]
    assert not (out[1]["masks"] > 0).any() and out[1]["scores"].tolist() == [0.0]
    with torch.no_grad():  # each object decoded alone gives the mask it got in the batch
        for k, obj in enumerate([{"bbox_2d": [0, 0, W, H], "point_2d": [W, H]}, {"bbox_2d": [8, 6, 16, 12]}]):
            (alone,) = decode_answers(model, [vr([obj])], [0], feats, [meta])
            torch.testing.assert_close(alone["masks"][0], out[0]["masks"][k], atol=1e-5, rtol=1e-5)


# -- end to end: Segmenter, training, evaluation ------------------------------------------------
def _force(monkeypatch, tok, answers: list[str]):
    """Generation picks these answers' tokens (row b: answers[b], then end of sequence):
    only the token choice is replaced; the LLM, cache, parsing and decoder all run."""
    import lisa_kit.generation as gen

    seqs = [tok.encode_text(a) + [tok.eos_id] for a in answers]
    step = {"i": 0}

    def pick(logits, cfg, generator):
        i = step["i"]
        step["i"] += 1
        return torch.tensor([s[min(i, len(s) - 1)] for s in seqs], dtype=torch.long)

    monkeypatch.setattr(gen, "_pick", pick)


def test_segmenter_gives_one_mask_per_object_and_flags_malformed(segmenter, monkeypatch):
    image = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    good = vr([{"bbox_2d": [4, 4, 40, 30], "point_2d": [20, 15]}, {"bbox_2d": [40, 10, 30, 20]}])
    _force(monkeypatch, segmenter.tokenizer, [good, "<answer>{not json</answer>"])
    a, b = segmenter.seg_batch(image, ["Where are the shapes?", "Where is the moon?"], max_new_tokens=120)
    assert a.masks.shape == (2, H, W) and a.masks[0].any() and not a.masks[1].any()
    assert a.malformed[0] is None and "x1 < x0" in a.malformed[1] and a.scores[1] == 0
    assert [a.text[s:e] for s, e in a.seg_spans] == ['{"bbox_2d": [4, 4, 40, 30], "point_2d": [20, 15]}',
                                                      '{"bbox_2d": [40, 10, 30, 20]}']
    assert "mask 1 is empty" in a.no_mask_reason() and a.to_dict()["masks"][1]["malformed"] == a.malformed[1]
    assert b.masks.shape == (1, H, W) and not b.masks.any() and b.seg_spans == []
    assert "not JSON" in b.no_mask_reason() and b.stop == "end"
    # the same well-formed answer alone gives the same mask (rows decode independently)
    _force(monkeypatch, segmenter.tokenizer, [good])
    alone = segmenter.seg(image, "Where are the shapes?", max_new_tokens=120)
    assert (alone.masks == a.masks).all()
    # cut before </answer>: flagged, and the reason says it was cut
    _force(monkeypatch, segmenter.tokenizer, [good])
    cut = segmenter.seg(image, "Where are the shapes?", max_new_tokens=10)
    assert cut.stop == "max_new_tokens" and not cut.masks.any() and "cut" in cut.no_mask_reason()


def test_trains_on_synthetic_with_falling_token_loss_and_evaluates(tmp_path, one_thread):
    from lisa_kit.datasets.base import open_dataset
    from lisa_kit.evaluate import Evaluator
    from lisa_kit.train.loop import Trainer

    tr = Trainer(RECIPE, tmp_path / "run", overrides=[
        "train.steps=16", "train.warmup_steps=2", "train.batch_size=2", "train.val=null", "train.save_every=0",
        "train.val_every=0", "train.lr=1e-2", "data.samples_per_epoch=32", "data.sources.synthetic.options.size=32"],
        progress=False)
    assert not any("mask_decoder" in n or "seg_head" in n for n in tr.trainable_names)  # the decoder stays frozen
    sample = tr.dataset[0]
    answer = sample.conversations[0].rounds[-1][1]
    assert "<answer>[" in str(answer) and sample.masks.shape[0] == 0
    tr.fit()
    log = [json.loads(line) for line in (tmp_path / "run" / "train.jsonl").read_text().splitlines()]
    assert all(r["bce"] == 0 and r["dice"] == 0 for r in log)  # token loss only
    first, last = np.mean([r["ce"] for r in log[:3]]), np.mean([r["ce"] for r in log[-3:]])
    assert last < 0.7 * first, (first, last)

    reader = open_dataset("synthetic", None, "val", size=2)
    ev = Evaluator(tr.model.eval(), reader, modes=("teacher", "generate"), max_new_tokens=48, progress=False)
    res = ev.run()
    for mode in ("teacher", "generate"):
        r = res[mode]["all"]
        assert r["n_queries"] > 0 and 0.0 <= r["giou"] <= 1.0 and 0.0 <= r["ciou"] <= 1.0
    assert all(isinstance(t, str) for t in ev.answers["generate"].values())


def test_segment_cli_and_demo_show_why_a_mask_is_empty(segmenter, monkeypatch, tmp_path, capsys):
    from PIL import Image

    from lisa_kit.cli import main
    from lisa_kit.demo_app import answer

    image = np.random.default_rng(1).integers(0, 256, (H, W, 3), dtype=np.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(image).save(path)
    bad = vr([{"bbox_2d": [2, 2, 20, 20]}, {"bbox_2d": [2, 2, 2000, 20]}])
    _force(monkeypatch, segmenter.tokenizer, [bad])
    assert main(["segment", "--recipe", RECIPE, "--image", str(path), "--prompt", "Where?", "--out",
                 str(tmp_path / "out"), "--max-new-tokens", "100"]) == 0
    entry = json.loads((tmp_path / "out" / "result.json").read_text())["results"][0]
    assert [("malformed" in m) for m in entry["masks"]] == [False, True]
    assert "outside the 64x48 image" in entry["masks"][1]["malformed"]
    assert "mask 1 is empty" in capsys.readouterr().err
    _force(monkeypatch, segmenter.tokenizer, ["no tags at all"])
    _, masks, text = answer(segmenter, image, "Where?")
    assert len(masks) == 1 and not masks[0][0].any() and "<answer>" in text.splitlines()[-1]


def test_training_answers_list_every_target_of_a_turn_with_its_box():
    from lisa_kit.datasets.base import open_dataset
    from lisa_kit.geometry_answers import geometry_turns
    from lisa_kit.prompts import MultiSeg, seg_turns

    reader = open_dataset("synthetic", None, "train", size=4)
    g = geo(think=True)
    record = next(r for r in (reader[i] for i in range(len(reader))) if len(r.targets) >= 3)
    turns = seg_turns(record, np.random.default_rng(0), 3, multi_seg=MultiSeg(prob=1.0, max_targets=3))
    assert any(len(t.mask_targets()) >= 2 for t in turns)
    shapes = record.meta["shapes"]
    for t, new in zip(turns, geometry_turns(record, turns, g)):
        assert new.mask_targets() == [] and new.question == t.question
        size = record.targets[0].mask.shape[:2]
        objects = g.parse(new.answer, size).objects
        present = [k for k in t.mask_targets() if record.targets[k].mask.any()]
        assert [o.box for o in objects] == [tuple(shapes[record.targets[k].meta["answer"]]["bbox"]) for k in present]
        assert new.answer.startswith("<think>")


def test_native_checkpoint_keeps_the_strategy(segmenter, tmp_path):
    from lisa_kit.checkpoint.native import load_model, save_model

    save_model(segmenter.model, tmp_path / "ckpt")
    back = load_model(tmp_path / "ckpt")
    assert back.text_geometry == segmenter.model.text_geometry and type(back.seg_head).__name__ == "NoSegHead"


def test_instruction_wraps_every_question(segmenter, monkeypatch):
    from lisa_kit.datasets.base import open_dataset
    from lisa_kit.geometry_answers import geometry_turns
    from lisa_kit.prompts import seg_turns

    with pytest.raises(RecipeError) as e:
        geo(instruction="no field here")
    assert e.value.key == "model.text_geometry.instruction"
    g = geo(instruction='Find {question} and answer {"bbox_2d": [..]}.')
    assert g.ask("the cat") == 'Find the cat and answer {"bbox_2d": [..]}.'
    record = open_dataset("synthetic", None, "train", size=1)[0]
    turns = seg_turns(record, np.random.default_rng(0), 2)
    assert [t.question for t in geometry_turns(record, turns, g)] == [g.ask(t.question) for t in turns]
    monkeypatch.setattr(segmenter.model, "text_geometry", g)
    text = segmenter.tokenizer.decode([i for i in segmenter.prompt_ids("the cat") if i >= 0])
    assert 'Find the cat and answer {"bbox_2d": [..]}.' in text


def test_a_plugin_format_that_reads_naively_gives_problems_not_exceptions():
    class Naive(AnswerFormat):
        name = "test_naive"

        def objects(self, data):
            return [{"box": item["b"], "points": item["p"]} if item["b"] else "junk" for item in data]

    register_format(Naive)
    try:
        g = geo(format="test_naive")
        assert g.parse('<answer>{"x": 1}</answer>', (H, W)).problem.code == "no_objects"  # KeyError inside
        p = g.parse('<answer>[{"b": [1, 2, 3, 4], "p": [5, 6]}, {"b": 0, "p": 0}]</answer>', (H, W))
        assert p.objects[0].problem.code == "not_numeric"  # a lone number is not a point
        assert p.objects[1].problem.code == "missing_box"
    finally:
        FORMATS.pop("test_naive")
