"""lisa-kit bench: the harness on a tiny matrix, the CLI, matrix validation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lisa_kit import bench
from lisa_kit.cli import main

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "variants": {"lisa-tiny": {"recipe": "lisa-tiny"}, "lisa-tiny-seg-token": {"recipe": "lisa-tiny-seg-token"}},
    "scenarios": [{"name": "q", "questions_per_image": [1, 2], "batch_size": 1, "answer_tokens": 3,
                   "image_size": 64}],
    "repeats": 2, "warmup": 1, "device": "cpu", "dtype": "fp32",
    "quality": {"dataset": "synthetic:val", "root": None, "limit": 1, "mode": "teacher"},
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    results = bench.run_matrix(bench.parse_matrix(TINY), out, log=lambda s: None)
    return out, results


def test_results_have_every_stage(tiny_run):
    out, _ = tiny_run
    data = json.loads((out / "results.json").read_text())
    assert len(data["points"]) == 4  # 2 variants x 2 axis values
    for r in data["points"]:
        st = r["stages"]
        for key in (*bench.STAGES, "total", "decode_per_token"):
            assert st[key]["median"] > 0, (r["variant"], key)
            assert st[key]["p10"] <= st[key]["median"] <= st[key]["p90"]
            assert st[key]["n"] == 2
        # stage timers never overlap, so each run's stages fit in its total; medians
        # of separate runs get a small tolerance
        measured = sum(st[k]["median"] for k in bench.STAGES)
        assert st["total"]["median"] >= measured - 0.05 * st["total"]["median"]
        assert st["other"]["median"] >= 0
        assert r["rows"] == r["questions_per_image"] * r["batch_size"]
        assert r["masks"] == r["rows"]  # one [SEG] per forced answer -> one mask per query
        extra = 1 if r["variant"] == "lisa-tiny-seg-token" else 0  # seg_hidden: token feeds [SEG] once more
        assert r["decode_steps"] == r["answer_tokens"] - 1 + extra
        # several rows on one image: the shared prefix once, then the rows' own tokens
        assert r["calls"]["llm_prefill"] == (1 if r["rows"] == 1 else 2) and r["calls"]["mask_encoder"] == 1
        assert r["throughput"]["queries_per_s"] == pytest.approx(r["rows"] / st["total"]["median"])
        assert r["memory"]["method"]
    env = data["environment"]
    assert env["device"] == "cpu" and env["versions"]["torch"] == torch.__version__ and "git_commit" in env
    for name, v in data["variants"].items():
        assert 0.0 <= v["quality"]["giou"] <= 1.0 and v["quality"]["n_queries"] >= 1


def test_param_counts_match_modules(tiny_run):
    _, results = tiny_run
    from lisa_kit.builder import load

    model = load("lisa-tiny")
    p = results["variants"]["lisa-tiny"]["params"]
    for name in ("vision_encoder", "projector", "llm", "mask_decoder", "seg_head"):
        assert p[name] == sum(t.numel() for t in getattr(model, name).parameters()), name
    assert p["total"] == sum(t.numel() for t in model.parameters())
    assert p["mask_decoder.image_encoder"] == sum(t.numel() for t in model.mask_decoder.image_encoder.parameters())


def test_markdown_and_plots(tiny_run):
    out, _ = tiny_run
    md = (out / "results.md").read_text()
    assert "| lisa-tiny | q | 1 | 2 |" in md and "## Parameters" in md and "## Quality" in md
    for png in ("latency_breakdown.png", "scaling_questions_per_image.png"):
        assert (out / png).stat().st_size > 1000, png
    assert not (out / "scaling_batch_size.png").exists()  # not swept


def test_generation_restored_after_bench(tiny_run):
    import lisa_kit.generation as gen
    from lisa_kit.builder import load

    assert gen._pick.__module__ == "lisa_kit.generation"
    model = load("lisa-tiny")
    assert "forward" not in model.llm.__dict__ and "encode_vision" not in model.__dict__


def test_cli_tiny_matrix(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["bench", str(REPO / "benchmarks" / "tiny.yaml"), "--out", str(out), "--repeats", "1",
                 "--warmup", "0", "--no-quality", "--variant", "lisa-tiny"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["matrix"]["repeats"] == 1 and {r["variant"] for r in data["points"]} == {"lisa-tiny"}
    assert (out / "results.md").exists() and (out / "latency_breakdown.png").exists()


@pytest.mark.parametrize("name", ["tiny.yaml", "gpu.yaml", "designs_gpu.yaml"])
def test_shipped_matrices_validate(name, capsys):
    assert main(["bench", str(REPO / "benchmarks" / name), "--validate"]) == 0
    assert "OK" in capsys.readouterr().out


@pytest.mark.parametrize("patch, key", [
    ({"repeat": 3}, "repeat"),
    ({"scenarios": [{"name": "a", "batchsize": 2}]}, "scenarios[0].batchsize"),
    ({"variants": {"v": {"recipe": "lisa-tiny", "override": []}}}, "variants.v.override"),
    ({"scenarios": [{"name": "a", "answer_tokens": [0]}]}, "scenarios[0].answer_tokens"),
    ({"quality": {"datasets": "synthetic:val"}}, "quality.datasets"),
    ({"dtype": "int3"}, "dtype"),
    ({"variants": {"v": {"recipe": "lisa-tiny", "overrides": ["model.projector.name=nope"]}}}, "variants.v"),
])
def test_bad_matrix_names_the_key(tmp_path, capsys, patch, key):
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**TINY, **patch}))
    with pytest.raises(bench.BenchMatrixError, match=key.replace("[", r"\[").replace("]", r"\]")):
        bench.parse_matrix(path)
    assert main(["bench", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and key in err and str(path) in err


def test_bf16_matrix_keeps_the_parts_a_component_declares_fp32(tmp_path, monkeypatch):
    """The bench casts by the API's one precision rule: SAM's prompt encoder (which fails
    against bf16 weights) stays fp32, its image encoder and the LLM take bf16."""
    import torch

    import lisa_kit.generation

    seen = {}
    real = lisa_kit.generation.generate

    def spy(model, *args, **kwargs):
        sam = model.mask_decoder
        seen.update(llm=next(model.llm.parameters()).dtype,
                    image_encoder=next(sam.image_encoder.parameters()).dtype,
                    prompt_encoder=next(sam.prompt_encoder.parameters()).dtype)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(lisa_kit.generation, "generate", spy)
    matrix = {k: v for k, v in TINY.items() if k != "quality"}
    matrix.update(variants={"lisa-tiny": {"recipe": "lisa-tiny"}}, dtype="bf16", repeats=1, warmup=0,
                  scenarios=[{**TINY["scenarios"][0], "questions_per_image": 1}])
    bench.run_matrix(bench.parse_matrix(matrix), tmp_path, log=lambda s: None)
    assert seen == {"llm": torch.bfloat16, "image_encoder": torch.bfloat16, "prompt_encoder": torch.float32}


def test_native_vlm_base_is_benched_with_its_own_image_input(tmp_path):
    """A VLM tower's collated input is a dict (Qwen's patches and grids), not a pixel tensor:
    the bench moves it as it is and times every stage (it crashed on ``.to``)."""
    matrix = {"variants": {"qwen": {"recipe": "lisa-tiny-qwen2.5vl"}},
              "scenarios": [{"name": "q", "questions_per_image": 2, "batch_size": 1, "answer_tokens": 3,
                             "image_size": 64}], "repeats": 1, "warmup": 0, "device": "cpu", "dtype": "fp32"}
    (r,) = bench.run_matrix(bench.parse_matrix(matrix), tmp_path, log=lambda s: None)["points"]
    assert r["masks"] == r["rows"] == 2
    assert r["stages"]["vision_encoder"]["median"] > 0 and r["stages"]["mask_decode"]["median"] > 0


def test_text_geometry_model_decodes_its_forced_answer(tmp_path):
    """A text_geometry model has no [SEG]: the bench forces a well-formed answer in its own
    format instead, so its box/point mask path runs once per question and is timed."""
    from lisa_kit.builder import load
    from lisa_kit.generation import GenerationConfig, generate

    matrix = {"variants": {"textbox": {"recipe": "lisa-tiny-textbox"}},
              "scenarios": [{"name": "q", "questions_per_image": 2, "batch_size": 1, "answer_tokens": 3,
                             "image_size": 64}], "repeats": 1, "warmup": 0, "device": "cpu", "dtype": "fp32"}
    results = bench.run_matrix(bench.parse_matrix(matrix), tmp_path, log=lambda s: None)
    (r,) = results["points"]
    model = load("lisa-tiny-textbox")
    prompts, rows, vis, sam, metas = bench.make_inputs(model, 1, 2, 64)
    forced = bench.answer_tokens(model, 3, metas[0].original_size)
    assert r["answer_tokens"] == len(forced) and r["decode_steps"] == len(forced) - 1
    assert r["stages"]["mask_decode"]["median"] > 0 and r["calls"]["mask_decode"] >= 1
    assert r["masks"] == r["rows"] == 2
    # the forced answer parses to one box around the image centre, and decodes to a mask
    (obj,) = model.text_geometry.parse(model.tokenizer.decode(forced), metas[0].original_size).objects
    h, w = metas[0].original_size
    assert obj.problem is None and obj.box[0] < w / 2 < obj.box[2] and obj.box[1] < h / 2 < obj.box[3]
    with torch.inference_mode(), bench.forced_answer(forced):
        outs = generate(model, prompts, rows, vis, sam, metas, GenerationConfig(max_new_tokens=len(forced)))
    assert [o.malformed for o in outs] == [[None], [None]] and all(o.scores[0] != 0 for o in outs)


def test_designs_gpu_matrix_builds_each_design_at_real_size():
    """benchmarks/designs_gpu.yaml, built without memory: each variant is its design (the
    prompt strategy and decoder asked for), and the Qwen2.5-VL variants split the whole of
    transformers' own Qwen2.5-VL built from the same config (vision + LM, once the bench
    restores the vocabulary), as SAM 3's decoder holds the whole Sam3Model."""
    from omegaconf import OmegaConf
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Sam3Config,
        Sam3Model,
    )

    from lisa_kit.builder import build_model
    from lisa_kit.checkpoint.io import empty_weights
    from lisa_kit.recipes import load_recipe

    kinds = ("vision_encoder", "projector", "llm", "mask_decoder", "seg_head", "fusion")
    matrix = bench.parse_matrix(REPO / "benchmarks" / "designs_gpu.yaml")
    assert matrix.device == "cuda" and matrix.dtype == "bf16"
    built = {}
    for v in matrix.variants:
        recipe = load_recipe(v.recipe, v.overrides)
        model = build_model(recipe, empty=kinds)
        model.llm.resize_vocab(v.vocab_size)  # as run_matrix does
        assert {p.device.type for p in model.parameters()} == {"meta"}
        built[v.name] = (recipe.cfg.model, model, bench.param_counts(model))

    def count(module):
        return sum(p.numel() for p in module.parameters())

    qwen_cfg = built["sa2va-qwen2.5vl"][0].llm.config
    with empty_weights():
        qwen = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**OmegaConf.to_container(qwen_cfg)))
        sam3 = Sam3Model(Sam3Config())
    for name in ("sa2va-qwen2.5vl", "seg-zero-7b"):
        _, model, p = built[name]
        assert p["vision_encoder"] + p["llm"] == count(qwen), name
        assert model.llm.vocab_size == qwen.config.text_config.vocab_size
    assert built["seg-zero-7b"][1].text_geometry.format.name == "seg_zero"
    assert built["sa2va-qwen2.5vl"][1].text_geometry is None and built["sa2va-qwen2.5vl"][0].seg_hidden == "token"
    assert built["lisa-7b-sam3"][2]["mask_decoder"] == count(sam3)
    # LISA-7B's LLM and tower in both LISA variants, only the decoder differs
    for k in ("vision_encoder", "llm", "seg_head"):
        assert built["lisa-7b"][2][k] == built["lisa-7b-sam3"][2][k], k
    assert built["lisa-7b"][2]["llm"] == pytest.approx(6.74e9, rel=0.01)  # LLaMA-7B
