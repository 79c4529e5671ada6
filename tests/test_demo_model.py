"""The model that works out of the box: lisa_kit/assets/demo_model, trained by the recipe
it names (``recipes/lisa-demo-v11.yaml``) on the synthetic shapes set and used when no
model is named."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf
from PIL import Image

from lisa_kit.api import DEMO_MODEL_DIR
from lisa_kit.datasets.synthetic import SyntheticReasoningSet
from lisa_kit.demo_app import EXAMPLES_DIR
from lisa_kit.recipes import load_recipe

MAX_BYTES = 20 * 2**20  # the brief's limit for a model kept in the repository
IOU_MIN = 0.5  # "a right mask": more than half of the union is the asked-for shape


def _examples():
    return json.loads((EXAMPLES_DIR / "examples.json").read_text())


def _truth(example, size) -> np.ndarray:
    src = example["source"]
    rec = SyntheticReasoningSet(split=src["split"], seed=src["seed"])[src["index"]]
    gt = (rec.targets[src["target"]].mask == 1).astype(np.uint8) * 255
    return np.asarray(Image.fromarray(gt).resize(size, Image.NEAREST)) > 0


def test_shipped_and_small_and_built_by_the_recipe():
    files = [p for p in DEMO_MODEL_DIR.rglob("*") if p.is_file()]
    assert files and sum(p.stat().st_size for p in files) <= MAX_BYTES
    shipped = yaml.safe_load((DEMO_MODEL_DIR / "recipe.yaml").read_text())
    recipe = OmegaConf.to_container(load_recipe(shipped["name"]).cfg, resolve=True)
    for kind in ("vision_encoder", "projector", "mask_decoder", "seg_head"):
        assert shipped["model"][kind]["name"] == recipe["model"][kind]["name"]
    assert shipped["model"]["llm"]["config"]["hidden_size"] == recipe["model"]["llm"]["config"]["hidden_size"]
    assert shipped["model"]["seg_hidden"] == recipe["model"]["seg_hidden"]


@pytest.mark.parametrize("phrasing", ["lisa", "plain"])
def test_segment_with_no_model_named_gives_the_right_mask(tmp_path, phrasing):
    """On a fresh install `lisa-kit segment --image <example> --prompt <question>` uses the
    demo model, answers with [SEG] and paints the shape the question asks for, whether or
    not the question ends with LISA's "Please output segmentation mask."."""
    from lisa_kit.cli import main

    ex = _examples()[1]  # "Which shape has the most vertices?"
    image = EXAMPLES_DIR / ex["image"]
    prompt = ex["question"] if phrasing == "lisa" else ex["source"]["text"]
    assert main(["segment", "--image", str(image), "--prompt", prompt, "--out", str(tmp_path),
                 "--device", "cpu"]) == 0
    res = json.loads((tmp_path / "result.json").read_text())
    (entry,) = res["results"]
    assert "[SEG]" in entry["answer"] and entry["masks"]
    mask = np.asarray(Image.open(tmp_path / entry["masks"][0]["file"])) > 0
    gt = _truth(ex, mask.shape[::-1])
    iou = (mask & gt).sum() / (mask | gt).sum()
    assert iou > IOU_MIN, (entry["answer"], iou)

