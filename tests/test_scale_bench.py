"""``benchmarks/scale.py`` at tiny widths: the generator writes loadable checkpoints in all
three forms, every measurement runs, the fit and the extrapolation are what they say, and
a whole run writes the documented results (in seconds; the real widths are run by hand)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lisa_kit.checkpoint.io import load_state_dict

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


@pytest.fixture(scope="module")
def scale(repo_script):
    return repo_script("benchmarks/scale.py")


@pytest.fixture(scope="module")
def generated(scale, tmp_path_factory):
    work = tmp_path_factory.mktemp("scale")
    model = scale.meta_model("tiny", 1, None)
    dirs = scale.generate(model, work / "layers_1", work / "clip-vit-tiny-patch14", "tiny", 100_000)
    return model, dirs, work


def test_fit_and_extrapolation(scale):
    f = scale.fit([1e6, 2e6, 4e6], [3.0 + 2e-6 * x for x in (1e6, 2e6, 4e6)])
    assert f["a"] == pytest.approx(3.0) and f["b"] == pytest.approx(2e-6) and f["r2"] == pytest.approx(1.0)
    noisy = scale.fit([1, 2, 3], [1.0, 2.5, 2.9])
    assert noisy["r2"] < 1 and noisy["max_abs_residual"] > 0
    assert scale.fit([5, 5], [1.0, 2.0]) is None  # one depth cannot make a line
    points = [{"params": n, "measurements": {"export": {"wall_s": 1 + n / 100, "peak_rss_bytes": 10 * n}}}
              for n in (100, 300)]
    fits, ext = scale.fits_and_extrapolation(points, {"big": 1000})
    assert set(fits) == {"export"} and set(fits["export"]) == {"wall_s", "peak_rss_bytes"}
    assert ext["big"]["params"] == 1000
    assert ext["big"]["export"]["wall_s"] == pytest.approx(11.0)
    assert ext["big"]["export"]["peak_rss_bytes"] == pytest.approx(10_000)


def test_parameter_formula_counts_the_model(scale, generated):
    model = generated[0]
    widths = scale._llm_widths(model)
    for layers in (1, 3):
        m = model if layers == 1 else scale.meta_model("tiny", layers, None)
        held = sum(scale.count(getattr(m, k)) for k in ("vision_encoder", "projector", "llm", "mask_decoder",
                                                          "seg_head", "fusion"))
        assert scale.lisa_params(model, widths, layers) == held
    # LLaMA's published sizes (vocabulary 32000): 6,738,415,616 and 13,015,864,320
    assert scale.llama_params(scale.LLAMA_7B, 32, 32000) == 6_738_415_616
    assert scale.llama_params(scale.LLAMA_13B, 40, 32000) == 13_015_864_320


def test_generated_forms_load_to_the_same_model(scale, generated):
    from lisa_kit.checkpoint.lisa_hf import import_lisa_hf
    from lisa_kit.checkpoint.native import load_model

    model, dirs, work = generated
    assert sorted(dirs) == sorted(scale.FORMS)
    index = json.loads((dirs["lisa_hf_bin"] / "pytorch_model.bin.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded as a release is
    assert (dirs["lisa_hf_safetensors"] / "model.safetensors.index.json").exists()
    a, b = load_state_dict(dirs["lisa_hf_bin"]), load_state_dict(dirs["lisa_hf_safetensors"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same key, same tensor
    assert {v.dtype for k, v in a.items() if not k.endswith("inv_freq")} == {torch.bfloat16}
    assert all(torch.isfinite(v.float()).all() for v in a.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = import_lisa_hf(dirs["lisa_hf_bin"], vision_tower=str(work / "clip-vit-tiny-patch14"))
        native = load_model(dirs["lisa_kit"])
    for kind in ("vision_encoder", "projector", "llm", "mask_decoder", "seg_head"):
        assert getattr(hf, kind).state_dict().keys() == getattr(model, kind).state_dict().keys()
        assert getattr(native, kind).state_dict().keys() == getattr(model, kind).state_dict().keys()
    emb = native.llm.model.get_input_embeddings().weight
    assert emb.shape == hf.llm.model.get_input_embeddings().weight.shape and emb.abs().sum() > 0


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable:FutureWarning")
@pytest.mark.parametrize("name", ["seg", "seg_q8", "export", "train"])
def test_measurements_run(scale, generated, tmp_path, name):
    _, dirs, work = generated
    r = scale.measure(name, dirs, str(work / "clip-vit-tiny-patch14"), "cpu", 3, tmp_path)
    assert r["measurement"] == name and r["wall_s"] > 0 and r["setup_s"] > 0
    assert r["peak_rss_bytes"] >= r["rss_before_bytes"] > 0
    assert r["loadavg_before"] >= 0 and r["loadavg_after"] >= 0  # how busy the machine was
    if name == "train":  # the trained text's shape, for the report: conversations x tokens
        assert r["input_ids_shape"][0] >= 1 and r["input_ids_shape"][1] > 1
    if name == "export":
        assert load_state_dict(tmp_path / "export").keys() == load_state_dict(dirs["lisa_hf_safetensors"]).keys()


def test_questions_ratio_per_depth_and_extrapolated(scale):
    def point(layers, params, one, eight):
        return {"layers": layers, "params": params,
                "measurements": {"seg": {"wall_s": one}, "seg_q8": {"wall_s": eight}}}

    points = [point(2, 100, 10.0, 18.0), point(4, 200, 20.0, 30.0)]
    fits, ext = scale.fits_and_extrapolation(points, {"big": 1000})
    lines = scale.questions_ratio({"points": points, "fits": fits, "extrapolated": ext})
    assert "| 2 | 1.80 |" in lines and "| 4 | 1.50 |" in lines
    # seg = 0.1 * params, seg_q8 = 6 + 0.12 * params: at 1000 params 126 / 100
    assert "| big (extrapolated) | 1.26 |" in lines
    noisy = [point(2, 100, 10.0, 18.0), point(4, 200, 8.0, 30.0)]  # one question got faster with depth
    fits, ext = scale.fits_and_extrapolation(noisy, {"big": 1000})
    lines = scale.questions_ratio({"points": noisy, "fits": fits, "extrapolated": ext})
    assert "| 4 | 3.75 |" in lines and not any("extrapolated" in x for x in lines)
    assert scale.questions_ratio({"points": [], "fits": {}, "extrapolated": {}}) == []


def test_training_budget_splits_fixed_and_per_sample(scale):
    gib = 2**30

    def point(layers, params, fixed, per):
        # the step's own peak (RSS before it + its growth) is split; the process peak, here
        # a load that peaked higher, is not what the batch adds to
        return {"layers": layers, "params": params, "measurements": {
            m: {"rss_before_bytes": 3 * gib, "action_peak_growth_bytes": (fixed - 3 + per * b) * gib,
                "peak_rss_bytes": 99 * gib, "input_ids_shape": [b, 90]} for m, b in scale.TRAIN_BATCH.items()}}

    # fixed 10 / 12 GiB, one sample 1 / 2 GiB at 2 / 4 layers: fixed = 8 + params / 100 GiB,
    # per sample = params / 200 GiB -> at 1000 params 18 GiB fixed, 5 GiB per sample
    points = [point(2, 200, 10.0, 1.0), point(4, 400, 12.0, 2.0)]
    ext = {"big": {"params": 1000}, "huge": {"params": 8000}}
    lines = scale.training_budget({"device": "cpu", "points": points, "fits": {}, "extrapolated": ext})
    # (24 - 10) // 1 = 14, (40 - 10) // 1 = 30, (80 - 10) // 1 = 70
    assert "| 2 layers (measured) | 10.00 GiB | 1.00 GiB | 14 | 30 | 70 |" in lines
    assert "| 4 layers (measured) | 12.00 GiB | 2.00 GiB | 6 | 14 | 34 |" in lines
    assert "| big (extrapolated) | 18.00 GiB | 5.00 GiB | 1 | 4 | 12 |" in lines
    assert any(x.startswith("| huge (extrapolated) | 88.00 GiB | 40.00 GiB | none | none | none |") for x in lines)
    assert any("0.50 GiB more per LLM layer" in x for x in lines)  # (2 - 1) GiB / (4 - 2) layers
    assert any("1 x 90, 2 x 90, 4 x 90" in x for x in lines)
    # one batch size only: nothing to split
    single = [{"layers": 2, "params": 200, "measurements": {"train": {"rss_before_bytes": gib,
                                                                     "action_peak_growth_bytes": gib}}}]
    assert scale.training_budget({"device": "cpu", "points": single, "fits": {}, "extrapolated": {}}) == []


def test_tiny_run_writes_results(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, str(SCRIPT), "--widths", "tiny", "--layers", "1", "2", "--measure",
                          "load_lisa_hf_safetensors", "--out", str(out)], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert {"widths", "device", "dtype", "layers", "env", "points", "fits", "extrapolated", "notes"} <= set(r)
    assert r["widths"] == "tiny" and r["layers"] == [1, 2] and r["dtype"] == "bfloat16"
    assert [p["layers"] for p in r["points"]] == [1, 2] and r["points"][0]["params"] < r["points"][1]["params"]
    for p in r["points"]:
        m = p["measurements"]["load_lisa_hf_safetensors"]
        assert "error" not in m, m
        assert m["wall_s"] > 0 and m["peak_rss_bytes"] > 0
        assert set(p["checkpoint_bytes"]) == {"lisa_hf_bin", "lisa_hf_safetensors", "lisa_kit"}
    f = r["fits"]["load_lisa_hf_safetensors"]["peak_rss_bytes"]
    for p in r["points"]:  # two depths: the line goes through both
        y = p["measurements"]["load_lisa_hf_safetensors"]["peak_rss_bytes"]
        assert f["a"] + f["b"] * p["params"] == pytest.approx(y, rel=1e-9)
    for name in ("LISA-7B", "LISA-13B"):
        e = r["extrapolated"][name]
        assert e["load_lisa_hf_safetensors"]["peak_rss_bytes"] == pytest.approx(f["a"] + f["b"] * e["params"])
    assert r["extrapolated"]["LISA-13B"]["params"] > r["extrapolated"]["LISA-7B"]["params"]
    md = (out / "results.md").read_text()
    assert "extrapolated" in md and "LISA-13B" in md
    assert not list(tmp_path.glob("lisa_scale_*"))  # generated checkpoints are cleaned up

    again = subprocess.run([sys.executable, str(SCRIPT), "--report", str(out / "results.json"), "--out",
                            str(tmp_path / "again"), "--note", "measured on a busy machine"],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    r2 = json.loads((tmp_path / "again" / "results.json").read_text())
    assert r2["points"] == r["points"] and r2["fits"] == r["fits"]  # refitted from the same measurements
    assert r2["notes"][-1] == "measured on a busy machine"
    assert "measured on a busy machine" in (tmp_path / "again" / "results.md").read_text()
