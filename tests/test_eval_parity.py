"""LISA's validation reproduced: the seed0 checkpoint scored on the mini ReasonSeg and
refCOCO sets of ``eval_seed0`` through our readers, prompts, model and metrics gives the
mask logits and the gIoU/cIoU the original ``validate()`` recorded."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lisa_kit.testing import eval_fixture_dir, fixture_dir

EV, FX = eval_fixture_dir(), fixture_dir()
pytestmark = [pytest.mark.parity,
              pytest.mark.skipif(EV is None or FX is None, reason="LISA fixtures (../shared) not present")]

TAGS = {"ReasonSeg|val": ("reason_seg", "val", "ReasonSeg_val"),
        "refcoco|unc|val": ("refcoco", "val", "refcoco_unc_val"),
        "refcoco|unc|testA": ("refcoco", "testA", "refcoco_unc_testA")}
LOGIT_ATOL = 1e-4


@pytest.fixture(scope="module")
def model():
    from lisa_kit.builder import load_checkpoint

    m = json.loads((FX / "manifest.json").read_text())
    return load_checkpoint(FX / m["checkpoint_dir"], vision_tower=str(FX / m["vision_tower_dir"]),
                           sam=m["sam_config"]).eval()


@pytest.fixture(scope="module")
def ref():
    from safetensors.torch import load_file

    return json.loads((EV / "eval_reference.json").read_text()), load_file(str(EV / "eval_tensors.safetensors"))


@pytest.mark.parametrize("tag", list(TAGS))
def test_validate_reproduced(model, ref, tag):
    from lisa_kit.datasets import open_dataset
    from lisa_kit.evaluate import Evaluator, queries_of

    meta, tensors = ref
    ev = meta["evals"][tag]
    name, split, key = TAGS[tag]
    reader = open_dataset(name, EV / "dataset", split)
    evaluator = Evaluator(model, reader, progress=False)
    by_path = {s["image_path"].rsplit("/", 1)[1]: s for s in ev["samples"]}
    assert len(reader) == len(by_path) == ev["n_samples"]
    near_zero = 0
    for rec in reader:
        sample = by_path[rec.image_path.name]
        want = tensors[f"{key}.{sample['index']}.pred_logits"]
        got = torch.stack(evaluator.teacher(rec, rec.image(), queries_of(rec)))
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=LOGIT_ATOL, rtol=0)
        flips = ((got > 0) != (want > 0))
        assert bool((want[flips].abs() < LOGIT_ATOL).all())  # only last-ulp neighbours of 0 may differ
        near_zero += int(flips.sum())
    result = evaluator.run()["teacher"]["all"]
    assert result["n_queries"] == ev["n_masks"]
    if near_zero == 0:  # same predicted pixels -> the metric is bit-identical
        assert f"{np.float32(result['giou']).view(np.uint32):08x}" == ev["giou_if_sorted_by_path_f32_hex"]
        assert f"{np.float32(result['ciou']).view(np.uint32):08x}" == ev["ciou_f32_hex"]
    else:
        assert result["giou"] == pytest.approx(ev["giou"], abs=1e-5)
        assert result["ciou"] == pytest.approx(ev["ciou"], abs=1e-5)
