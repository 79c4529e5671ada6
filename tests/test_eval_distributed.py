"""``lisa-kit eval`` under torchrun (2 gloo ranks, CPU) gives the single-process numbers
for every dataset of one run, also when the ranks' shares hold different ReasonSeg
subsets (one rank only "long" queries, the other "short" and "long"): every collective
must be entered the same number of times on every rank."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lisa_kit.cli import main
from lisa_kit.testing import eval_fixture_dir, fixture_dir

DEMO_MODEL = Path(__file__).resolve().parent.parent / "lisa_kit" / "assets" / "demo_model"
RANKS = 2
TIMEOUT_S = 300  # a rank stuck in a mismatched collective must fail the test, not hang it


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _torchrun(args: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}",
           "-m", "lisa_kit", "eval", *args, "--out", str(out), "--device", "cpu"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "metrics.json").read_text())


def _single(args: list[str], out: Path) -> dict:
    assert main(["eval", *args, "--out", str(out), "--device", "cpu"]) == 0
    return json.loads((out / "metrics.json").read_text())


def _scores(report: dict) -> dict:
    """``{dataset:split: {mode: {subset: result}}}`` of a metrics.json."""
    return {f"{e['dataset']}:{e['split']}": e["modes"] for e in report["evals"]}


def _assert_same(distributed: dict, single: dict) -> None:
    assert distributed["world_size"] == RANKS and single["world_size"] == 1
    got, want = _scores(distributed), _scores(single)
    assert list(got) == list(want)
    for name in want:
        assert got[name] == want[name], name  # keyed statistics: bit-identical, not approximately


def _write_reason_seg(root: Path, kinds: list[bool]) -> None:
    """A ReasonSeg val split, one image per entry of ``kinds`` (True: a sentence query)."""
    val = root / "reason_seg" / "ReasonSeg" / "val"
    val.mkdir(parents=True)
    for i, is_sentence in enumerate(kinds):
        h, w = 48 + 8 * i, 64
        Image.new("RGB", (w, h), (40 * i, 90, 200 - 30 * i)).save(val / f"img{i}.jpg")
        x0, y0 = 4 + 3 * i, 5 + 2 * i
        shapes = [{"label": "target", "points": [[x0, y0], [x0 + 20, y0], [x0 + 20, y0 + 15], [x0, y0 + 15]],
                   "group_id": None, "shape_type": "polygon", "flags": {}}]
        text = "What would a child play with here?" if is_sentence else "the ball"
        (val / f"img{i}.json").write_text(json.dumps({"text": [text], "is_sentence": is_sentence,
                                                      "shapes": shapes}))


def test_two_ranks_several_datasets_uneven_subsets_synthetic(tmp_path):
    # Rank 0 gets images 0 and 2 (long only), rank 1 images 1 and 3 (short and long);
    # a second dataset follows in the same run.
    _write_reason_seg(tmp_path / "data", [True, False, True, True])
    args = ["--checkpoint", str(DEMO_MODEL), "--dataset", "reason_seg:val", "--dataset", "synthetic:val",
            "--root", str(tmp_path / "data"), "--mode", "both", "--max-new-tokens", "8", "--limit", "4"]
    single = _single(args, tmp_path / "one")
    assert set(_scores(single)["reason_seg:val"]["teacher"]) == {"all", "long", "short"}
    _assert_same(_torchrun(args, tmp_path / "two"), single)


@pytest.mark.parity
@pytest.mark.skipif(eval_fixture_dir() is None or fixture_dir() is None,
                    reason="LISA fixtures (../shared) not present")
def test_two_ranks_fixture_reason_seg_then_refcoco(tmp_path):
    # eval_seed0's ReasonSeg val: rank 0 holds records 0, 2, 4 (all "long"), rank 1
    # records 1, 3, 5 ("short" and "long"); then refCOCO val (2 images).
    fx = fixture_dir()
    manifest = json.loads((fx / "manifest.json").read_text())
    sam_config = tmp_path / "sam.json"
    sam_config.write_text(json.dumps(manifest["sam_config"]))
    args = ["--checkpoint", str(fx / manifest["checkpoint_dir"]),
            "--vision-tower", str(fx / manifest["vision_tower_dir"]), "--sam-config", str(sam_config),
            "--dataset", "reason_seg:val", "--dataset", "refcoco:val",
            "--root", str(eval_fixture_dir() / "dataset"), "--mode", "teacher"]
    single = _single(args, tmp_path / "one")
    refcoco = _scores(single)["refcoco:val"]["teacher"]["all"]
    assert refcoco["n_samples"] == 2 and refcoco["n_queries"] == 7  # what LISA's validate() counted
    _assert_same(_torchrun(args, tmp_path / "two"), single)
