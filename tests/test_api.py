"""lisa_kit.api on the tiny recipe (random weights, CPU): shapes, [SEG] <-> masks,
batching, input checks, image modes, checkpoint detection."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lisa_kit import api
from lisa_kit.api import Segmenter, SegResult
from lisa_kit.errors import CheckpointError, ImageError, InputError
from lisa_kit.testing import force_generation, synthetic_image

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "lisa_reference" / "seed0"


@pytest.fixture(scope="module")
def seg():
    return Segmenter.from_recipe("lisa-tiny")


def _force(monkeypatch, plan: dict[int, int]):
    force_generation(monkeypatch, plan)


def _ids(seg):
    tok = seg.tokenizer
    return seg.model.seg_token_id, tok.eos_id


def test_result_shapes_at_odd_size_and_masks_per_seg(seg, monkeypatch):
    seg_id, eos = _ids(seg)
    img, _ = synthetic_image(37, 53, 0)
    _force(monkeypatch, {1: seg_id, 3: seg_id, 4: eos})
    r = seg.seg(img, "Can you segment the red circle in this image?")
    assert isinstance(r, SegResult) and r.image_size == (37, 53) and r.finished
    assert r.token_ids.count(seg_id) == 2 == r.num_masks
    assert r.masks.dtype == bool and r.masks.shape == (2, 37, 53)
    assert len(r.scores) == 2 and all(isinstance(s, float) for s in r.scores)
    assert [r.text[a:b] for a, b in r.seg_spans] == ["[SEG]", "[SEG]"]
    assert r.text.count("[SEG]") == 2 and "</s>" not in r.text and "<im_start>" not in r.text
    assert r.prompt == "Can you segment the red circle in this image?"
    json.dumps(r.to_dict())

    _force(monkeypatch, {2: eos})
    none = seg.seg(img, "Is there a circle?")
    assert none.masks.shape == (0, 37, 53) and none.masks.dtype == bool and none.scores == [] == none.seg_spans


def test_exif_rotated_jpeg_gives_masks_at_rotated_size(seg, monkeypatch, tmp_path):
    seg_id, eos = _ids(seg)
    img, _ = synthetic_image(40, 60, 1)  # stored 60 wide x 40 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(img).save(tmp_path / "rot.jpg", exif=exif)
    _force(monkeypatch, {0: seg_id, 1: eos})
    r = seg.seg(tmp_path / "rot.jpg", "Segment the red square.")
    assert r.image_size == (60, 40) and r.masks.shape == (1, 60, 40)


def test_batch_on_one_image_equals_single_calls(seg, monkeypatch, tmp_path):
    seg_id, eos = _ids(seg)
    img, _ = synthetic_image(45, 50, 2)
    Image.fromarray(img).save(tmp_path / "one.png")
    prompts = ["Segment the red square.", "Please segment the blue square in this image.",
               "What is the green triangle in this image? Please output segmentation mask."]
    _force(monkeypatch, {2: seg_id, 5: eos})
    singles = [seg.seg(img, p) for p in prompts]

    loads = []
    real = Segmenter._load
    monkeypatch.setattr(Segmenter, "_load", lambda self, s: loads.append(s) or real(self, s))
    batch = seg.seg_batch(str(tmp_path / "one.png"), prompts)  # one image for every prompt
    by_index = seg.seg_batch([img, 0, 0], prompts)  # an int points at another entry
    same_obj = seg.seg_batch([img, img, img], prompts, batch_size=2)
    assert len(loads) == 3  # each call read/encoded its one distinct image once
    for group in (batch, by_index, same_obj):
        for one, b in zip(singles, group):
            assert b.text == one.text and b.token_ids == one.token_ids and b.seg_spans == one.seg_spans
            assert b.masks.shape == one.masks.shape == (1, 45, 50)
            assert (b.masks != one.masks).mean() < 0.01
            np.testing.assert_allclose(b.scores, one.scores, atol=1e-4)


def test_empty_and_overlong_prompts_are_input_errors(seg):
    img, _ = synthetic_image(20, 20, 3)
    for bad in ("", "   \n"):
        with pytest.raises(InputError, match="empty"):
            seg.seg(img, bad)
    with pytest.raises(InputError, match="1024"):
        seg.seg(img, "segment the red circle " * 300)
    with pytest.raises(InputError, match="2 images for 3 prompts"):
        seg.seg_batch([img, img], ["a", "b", "c"])
    with pytest.raises(InputError):
        seg.seg(img, "ok", history=[("only one",)])


def test_user_markers_stay_text(seg):
    tok, model = seg.tokenizer, seg.model
    ids = seg.prompt_ids("What about [SEG] and <image> and <im_start>?")
    assert model.seg_token_id not in ids
    assert ids.count(model.fusion.IMAGE_SLOT) == 1
    assert ids.count(tok.token_id("<im_start>")) == 1  # the fusion's own
    # A history answer is the model's own text: its [SEG] is a token again, the image comes once.
    hist = seg.prompt_ids("And the other one?", history=[("Segment the [SEG] circle.", "Sure, [SEG] .")])
    assert hist.count(model.seg_token_id) == 1 and hist.count(model.fusion.IMAGE_SLOT) == 1


def test_history_turn_runs(seg, monkeypatch):
    seg_id, eos = _ids(seg)
    img, _ = synthetic_image(30, 41, 4)
    _force(monkeypatch, {0: seg_id, 1: eos})
    first = seg.seg(img, "Segment the red square.")
    again = seg.seg(img, "And now?", history=[("Segment the red square.", first)])
    assert again.masks.shape == (1, 30, 41)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "I;16"])
def test_odd_image_modes(seg, monkeypatch, tmp_path, mode):
    seg_id, eos = _ids(seg)
    rgb, _ = synthetic_image(33, 27, 5)
    if mode == "I;16":
        im = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
        assert im.mode == "I;16"
    else:
        im = Image.fromarray(rgb).convert(mode)
    im.save(tmp_path / f"x_{mode.replace(';', '')}.png")
    _force(monkeypatch, {0: seg_id, 1: eos})
    for source in (tmp_path / f"x_{mode.replace(';', '')}.png", im):
        r = seg.seg(source, "Segment the red square.")
        assert r.masks.shape == (1, 33, 27)


def test_corrupt_and_missing_images(seg, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(ImageError, match="bad.png"):
        seg.seg(tmp_path / "bad.png", "Segment it.")
    with pytest.raises(ImageError, match="not found"):
        seg.seg(tmp_path / "nope.jpg", "Segment it.")
    with pytest.raises(InputError, match="image is a path"):
        seg.seg(12.5, "Segment it.")


def test_precision_and_quantization_checks():
    model = type("M", (), {})  # never reached: the checks come first
    with pytest.raises(InputError, match="fp16 is not supported on CPU"):
        Segmenter(model, device="cpu", precision="fp16")
    with pytest.raises(InputError, match="CUDA"):
        Segmenter(model, device="cpu", quantization="4bit")
    with pytest.raises(InputError, match="precision"):
        Segmenter(model, precision="fp8")


def test_bf16_on_cpu(monkeypatch):
    from lisa_kit.builder import build_model
    from lisa_kit.testing import tiny_recipe

    seg_bf16 = Segmenter(build_model(tiny_recipe()), precision="bf16")
    assert seg_bf16.model.llm.model.lm_head.weight.dtype == torch.bfloat16
    assert seg_bf16.model.vision_encoder.model.dtype == torch.bfloat16
    assert seg_bf16.model.mask_decoder.mask_decoder.iou_token.weight.dtype == torch.float32  # SAM decoder stays fp32
    seg_id, eos = _ids(seg_bf16)
    _force(monkeypatch, {0: seg_id, 1: eos})
    r = seg_bf16.seg(synthetic_image(21, 34, 6)[0], "Segment the red square.")
    assert r.masks.shape == (1, 21, 34) and r.masks.dtype == bool


def test_checkpoint_detection_and_default(seg, monkeypatch, tmp_path):
    from lisa_kit.checkpoint.native import save_model

    seg_id, eos = _ids(seg)
    img, _ = synthetic_image(25, 30, 7)
    _force(monkeypatch, {1: seg_id, 2: eos})
    ref = seg.seg(img, "Segment the red square.")
    save_model(seg.model, tmp_path / "native")
    again = Segmenter.from_checkpoint(tmp_path / "native").seg(img, "Segment the red square.")
    assert again.text == ref.text and np.array_equal(again.masks, ref.masks)

    monkeypatch.setattr(api, "DEMO_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(InputError, match="--recipe.*--checkpoint"):
        api.load()
    monkeypatch.setattr(api, "DEMO_MODEL_DIR", tmp_path / "native")
    assert api.load().seg(img, "Segment the red square.").text == ref.text

    llava = tmp_path / "llava"
    llava.mkdir()
    (llava / "config.json").write_text(json.dumps({"model_type": "llava", "text_config": {}, "vision_config": {}}))
    with pytest.raises(CheckpointError, match="no trained \\[SEG\\] head"):
        Segmenter.from_checkpoint(llava)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        Segmenter.from_checkpoint(tmp_path)  # holds only other directories
    with pytest.raises(CheckpointError, match="not found"):
        Segmenter.from_checkpoint(tmp_path / "missing")
    with pytest.raises(InputError, match="not both"):
        api.load("lisa-tiny", checkpoint=tmp_path / "native")


@pytest.mark.skipif(not (FIXTURE / "manifest.json").exists(), reason="reference fixture not present")
def test_released_lisa_directory_is_imported(monkeypatch):
    m = json.loads((FIXTURE / "manifest.json").read_text())
    s = Segmenter.from_checkpoint(FIXTURE / m["checkpoint_dir"], vision_tower=str(FIXTURE / m["vision_tower_dir"]),
                                  sam=m["sam_config"])
    seg_id, eos = _ids(s)
    _force(monkeypatch, {0: seg_id, 1: eos})
    r = s.seg(synthetic_image(30, 40, 8)[0], "Segment the red square.")
    assert r.masks.shape == (1, 30, 40) and r.text == "[SEG]"


# -- per-row budgets, named rows, undecodable text (issue 15) -------------------------
def _prompt_leaving(seg, budget_range):
    """A prompt that fits the LLM but leaves a number of new tokens in ``budget_range``."""
    lo, hi = 1, seg.max_positions
    while lo < hi:  # largest repeat count that still leaves budget_range.start positions
        mid = (lo + hi + 1) // 2
        total, _ = seg._positions(seg.prompt_ids("red " * mid))
        lo, hi = (mid, hi) if seg.max_positions - total >= budget_range.start else (lo, mid - 1)
    prompt = "red " * lo
    left = seg.max_positions - seg._positions(seg.prompt_ids(prompt))[0]
    assert left in budget_range
    return prompt, left


def test_seg_batch_gives_each_row_its_own_budget(seg, monkeypatch):
    word = seg.tokenizer.encode_text("red")[0]  # never the end of sequence: answers run to their cap
    want = 12
    _force(monkeypatch, {k: word for k in range(want)})
    long_prompt, left = _prompt_leaving(seg, range(2, want))
    img, _ = synthetic_image(20, 22, 9)
    short, long_, short2 = seg.seg_batch(img, ["Segment the red square.", long_prompt, "And the blue one?"],
                                         max_new_tokens=want)
    assert len(short.token_ids) == want == len(short2.token_ids)  # not cut to the long row's leftover
    assert short.stop == short2.stop == "max_new_tokens" and not short.finished
    assert len(long_.token_ids) == left and long_.stop == "context" and long_.to_dict()["stop"] == "context"
    _force(monkeypatch, {0: seg.tokenizer.eos_id})
    assert seg.seg(img, "Segment it.").stop == "end"


def test_seg_batch_names_the_row_at_fault(seg):
    img, _ = synthetic_image(20, 20, 3)
    with pytest.raises(InputError, match=r"prompts\[2\] is empty"):
        seg.seg_batch(img, ["Segment the red square.", "ok", " \t"])
    with pytest.raises(InputError, match=r"prompts\[1\] is too long"):
        seg.seg_batch(img, ["Segment the red square.", "segment the red circle " * 300])
    with pytest.raises(InputError, match=r"prompts\[0\]'s history\[0\] prompt is empty"):
        seg.seg_batch(img, ["a", "b"], histories=[[("", "Sure.")], []])


def test_undecodable_text_is_an_input_error(seg):
    img, _ = synthetic_image(20, 20, 3)
    bad = b"segment the caf\xe9 sign".decode("utf-8", "surrogateescape")  # as Python reads invalid UTF-8
    for call in (lambda: seg.seg(img, bad), lambda: seg.seg(img, "\ud83d alone"),
                 lambda: seg.seg(img, "And now?", history=[("first", bad)]),
                 lambda: seg.seg_batch(img, ["fine", bad])):
        with pytest.raises(InputError, match="not valid text"):
            call()


# -- the image intake through the API --------------------------------------------------
def test_extreme_aspect_ratio_refused_before_any_resize(seg, tmp_path):
    from lisa_kit.errors import ImageSizeError

    Image.new("L", (400000, 1)).save(tmp_path / "strip.png")  # a few KB on disk
    assert (tmp_path / "strip.png").stat().st_size < 10_000
    for source in (tmp_path / "strip.png", np.zeros((1, 200, 3), np.uint8), Image.new("RGB", (3, 300))):
        with pytest.raises(ImageSizeError, match="aspect ratio") as info:
            seg.seg(source, "Segment it.")
        assert info.value.limit == ("max_aspect", seg.image_limits.max_aspect)
    from lisa_kit.images import ImageLimits

    wide = Segmenter(seg.model, image_limits=ImageLimits(max_aspect=60))
    assert wide.seg(np.zeros((1, 50, 3), np.uint8), "Segment it.", max_new_tokens=1).image_size == (1, 50)
    with pytest.raises(ImageSizeError, match="pixels"):
        Segmenter(seg.model, image_limits=ImageLimits(max_pixels=100)).seg(np.zeros((11, 10, 3), np.uint8), "x")
    # Limits raised past what the tiny SAM (64 px) can resize: still a typed error, naming the component.
    with pytest.raises(ImageSizeError, match="mask_decoder cannot resize a 1x300 image"):
        Segmenter(seg.model, image_limits=ImageLimits(max_aspect=1000)).seg(np.zeros((1, 300, 3), np.uint8), "x")


def test_lazily_opened_truncated_image_is_an_image_error(seg, tmp_path):
    rgb, _ = synthetic_image(40, 50, 10)
    Image.fromarray(rgb).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    lazy = Image.open(tmp_path / "cut.png")  # header read, pixels not yet
    with pytest.raises(ImageError, match="cut.png"):
        seg.seg(lazy, "Segment it.")


def test_demo_answer_reads_through_the_segmenters_limits(seg, tmp_path):
    from lisa_kit.demo_app import answer
    from lisa_kit.errors import ImageSizeError
    from lisa_kit.images import ImageLimits

    Image.new("RGB", (40, 1)).save(tmp_path / "strip.png")
    with pytest.raises(ImageSizeError, match="aspect ratio"):
        answer(seg, str(tmp_path / "strip.png"), "Segment it.")
    small = Segmenter(seg.model, image_limits=ImageLimits(max_pixels=100))
    Image.fromarray(synthetic_image(20, 20, 1)[0]).save(tmp_path / "ok.png")
    with pytest.raises(ImageSizeError, match="limit of 100"):
        answer(small, str(tmp_path / "ok.png"), "Segment it.")
