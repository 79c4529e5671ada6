"""Each design's tiny recipe end to end through the user-facing entry points: the web demo
app answers a request with a result image, ``lisa-kit segment`` writes its mask, and
``lisa-kit eval`` scores two synthetic images.

The three designs: a native VLM base (``lisa-tiny-qwen2.5vl``: Qwen2.5-VL's own tower,
processor and M-RoPE; [SEG]), the text box/point answers of Seg-Zero (``lisa-tiny-textbox``:
no [SEG], the LLM writes the box) and SAM 3 as the mask decoder (``lisa-tiny-sam3``).
Random weights: generation is forced to the answer the bench forces
(:func:`lisa_kit.bench.answer_tokens`: text then [SEG], or one well-formed box answer in
the model's own format), then end of sequence, so every entry point must produce exactly
one mask per question.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lisa_kit import api, bench
from lisa_kit.cli import main
from lisa_kit.testing import force_generation, synthetic_image

DESIGNS = ["lisa-tiny-qwen2.5vl", "lisa-tiny-textbox", "lisa-tiny-sam3"]
SIZE = (48, 64)  # (H, W) of the test image; the forced box answer is written for it
QUESTION = "Segment the red square."

# gradio's queue calls pandas options that pandas 3 deprecates (not ours to fix).
pytestmark = pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting':Warning",
                                        "ignore:The copy keyword is deprecated:Warning")


@pytest.fixture(scope="module", params=DESIGNS)
def design(request):
    """``(recipe name, Segmenter)``, built once per design."""
    return request.param, api.Segmenter.from_recipe(request.param, device="cpu")


@pytest.fixture
def forced(design, monkeypatch, one_thread):
    """Every generation answers the bench's forced answer for the design, then ends (on
    one thread: these tiny models' steps are all overhead, and two threads stall when
    another process shares the cores)."""
    def plan(model):
        toks = bench.answer_tokens(model, 2, SIZE) + [model.tokenizer.eos_id]
        return dict(enumerate(toks))

    force_generation(monkeypatch, plan)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(synthetic_image(*SIZE, 0)[0]).save(path)
    return path


def test_demo_app_answers_with_a_result_image(design, forced, image_path):
    pytest.importorskip("gradio", reason="gradio is not installed (pip install 'lisa-kit[demo]')")
    from lisa_kit.demo_app import build_demo, describe_model

    name, seg = design
    demo = build_demo(seg, examples=[])
    try:
        (fn,) = [f for f in demo.fns.values() if f.api_name == "segment"]  # the page's submit handler
        overlay, masks, text = fn.fn(str(image_path), QUESTION)
    finally:
        demo.close()
    assert overlay.dtype == np.uint8 and overlay.ndim == 3 and overlay.shape[0] >= SIZE[0]
    assert len(masks) == 1 and masks[0][0].shape == SIZE and "no mask" not in text
    # the page says how this design answers (from its recipe)
    about = describe_model(seg)
    assert name in about
    if seg.model.text_geometry is not None:
        assert "box" in about and "[SEG]" not in about and "[SEG]" not in masks[0][1]
    else:
        assert "[SEG]" in masks[0][1]


def test_segment_cli_writes_one_mask(design, forced, image_path, tmp_path, capsys):
    name, _ = design
    out = tmp_path / "out"
    assert main(["segment", "--recipe", name, "--device", "cpu", "--image", str(image_path),
                 "--prompt", QUESTION, "--out", str(out)]) == 0, capsys.readouterr().err
    (r,) = json.loads((out / "result.json").read_text())["results"]
    assert r["image_size"] == list(SIZE) and len(r["masks"]) == 1
    mask = np.asarray(Image.open(out / r["masks"][0]["file"]))
    assert mask.shape == SIZE and set(np.unique(mask)) <= {0, 255}


def test_eval_cli_scores_two_images(design, forced, tmp_path, capsys):
    name, _ = design
    out = tmp_path / "eval"
    assert main(["eval", name, "--dataset", "synthetic:val", "--limit", "2", "--device", "cpu",
                 "--out", str(out)]) == 0, capsys.readouterr().err
    (entry,) = json.loads((out / "metrics.json").read_text())["evals"]
    assert set(entry["modes"]) == {"teacher", "generate"}
    for mode, subsets in entry["modes"].items():
        a = subsets["all"]
        assert a["n_samples"] == 2 and a["n_queries"] >= 2 and 0.0 <= a["giou"] <= 1.0, mode
