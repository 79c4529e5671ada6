"""The side-by-side adapter for the original LISA code (lisa_kit.original).

The original's outputs here are the real ones: the reference fixture was produced by
the original code (chat.py path), so its ``infer.*`` tensors are written in the runner's
output format and compared through ``lisa-kit compare-original --original-output``.
The runner itself runs the original only where a checkout and its environment are
given (``LISA_KIT_ORIGINAL_REPO``, ``LISA_KIT_ORIGINAL_PYTHON``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lisa_kit import original
from lisa_kit.testing import fixture_dir

FX = fixture_dir()
needs_fixture = pytest.mark.skipif(FX is None, reason="reference fixture (../shared) not present")


def _original_output_from_fixture(out):
    from safetensors.numpy import load_file

    m = json.loads((FX / "manifest.json").read_text())
    t = load_file(str(FX / "fixtures.safetensors"))
    inf = m["infer"]
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / original.ORIGINAL_MASKS, t["infer.pred_masks.0"].astype(np.float32))
    info = {"input_ids": t["infer.input_ids"][0].tolist(), "new_ids": inf["generated_ids"],
            "text": inf["text_output_chat"], "seconds": [0.5, 0.4, 0.6], "device": "cpu", "precision": "fp32"}
    (out / original.ORIGINAL_JSON).write_text(json.dumps(info))
    return m


@needs_fixture
def test_compare_with_the_originals_outputs(tmp_path):
    from lisa_kit.cli import main

    m = _original_output_from_fixture(tmp_path / "orig")
    (tmp_path / "sam.json").write_text(json.dumps(m["sam_config"]))
    rc = main(["compare-original", "--checkpoint", str(FX / m["checkpoint_dir"]),
               "--vision-tower", str(FX / m["vision_tower_dir"]), "--sam-config", str(tmp_path / "sam.json"),
               "--image", str(FX / m["infer"]["image_path"]), "--prompt", m["infer"]["user_text"],
               "--original-output", str(tmp_path / "orig"), "--repeats", "1", "--out", str(tmp_path / "cmp")])
    assert rc == 0
    r = json.loads((tmp_path / "cmp/compare.json").read_text())
    assert r["prompt_ids_equal"] and r["tokens_equal"] and r["tokens_first_difference"] is None
    assert r["masks"]["logit_max_abs_diff"] < 1e-4 and r["masks"]["iou"] == 1.0
    assert r["original"]["seconds_median"] == 0.5 and r["ours"]["seconds_median"] > 0
    assert "| generated tokens equal | True |" in (tmp_path / "cmp/compare.md").read_text()

    # a different prompt is caught: the prompt ids part at the question
    from lisa_kit.api import Segmenter

    seg = Segmenter.from_checkpoint(FX / m["checkpoint_dir"], vision_tower=str(FX / m["vision_tower_dir"]),
                                    sam=m["sam_config"])
    orig = original.OriginalOutput.read(tmp_path / "orig")
    r2 = original.compare(seg, orig, FX / m["infer"]["image_path"], "Please segment the red square in this image.",
                          repeats=1)
    assert not r2["prompt_ids_equal"]
    assert orig.input_ids[:r2["prompt_ids_first_difference"]] == seg.prompt_ids("Please segment the")[:-1][
        :r2["prompt_ids_first_difference"]]


def test_runner_refuses_what_is_not_the_original(tmp_path):
    from lisa_kit.errors import CheckpointError, InputError

    # the runner script runs without lisa_kit and checks its repository first
    proc = subprocess.run([sys.executable, str(original.RUNNER), "--lisa-repo", str(tmp_path), "--checkpoint", "x",
                           "--image", "y", "--prompt", "z", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "not a LISA checkout" in proc.stderr
    with pytest.raises(InputError, match="not a checkout of the original LISA code"):
        original.run_original(tmp_path, "ckpt", "img.png", "q", tmp_path / "o")
    with pytest.raises(CheckpointError, match="original.json"):
        original.OriginalOutput.read(tmp_path)


ENV = ("LISA_KIT_ORIGINAL_REPO", "LISA_KIT_ORIGINAL_CHECKPOINT", "LISA_KIT_ORIGINAL_IMAGE")


@pytest.mark.skipif(not all(os.environ.get(k) for k in ENV),
                    reason="the original LISA code is not installed here: set LISA_KIT_ORIGINAL_REPO (a checkout), "
                           "LISA_KIT_ORIGINAL_PYTHON (its environment), LISA_KIT_ORIGINAL_CHECKPOINT (a released "
                           "LISA directory; the original hard-codes SAM ViT-H), LISA_KIT_ORIGINAL_IMAGE "
                           "[, LISA_KIT_ORIGINAL_VISION_TOWER, LISA_KIT_ORIGINAL_DEVICE]")
def test_runner_runs_the_original_and_agrees(tmp_path):
    from lisa_kit.cli import main

    e = os.environ
    args = ["compare-original", "--lisa-repo", e["LISA_KIT_ORIGINAL_REPO"], "--checkpoint",
            e["LISA_KIT_ORIGINAL_CHECKPOINT"], "--image", e["LISA_KIT_ORIGINAL_IMAGE"],
            "--prompt", "What is the main object in this image? Please output segmentation mask.",
            "--device", e.get("LISA_KIT_ORIGINAL_DEVICE", "cpu"), "--repeats", "1", "--out", str(tmp_path)]
    for k, flag in (("LISA_KIT_ORIGINAL_PYTHON", "--lisa-python"), ("LISA_KIT_ORIGINAL_VISION_TOWER", "--vision-tower")):
        if e.get(k):
            args += [flag, e[k]]
    assert main(args) == 0
    r = json.loads((tmp_path / "compare.json").read_text())
    assert r["prompt_ids_equal"] and r["tokens_equal"]
    assert r["masks"].get("iou", 0) > 0.99
