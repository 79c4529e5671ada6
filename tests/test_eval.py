"""Evaluation: modes, empty answers, rank-independence, the CLI's outputs."""
from __future__ import annotations

import json

import pytest

from lisa_kit import generation
from lisa_kit.datasets import open_dataset
from lisa_kit.errors import UnknownComponentError
from lisa_kit.evaluate import Evaluator, parse_dataset


@pytest.fixture(scope="module")
def reader():
    return open_dataset("synthetic", None, "val", size=4)


def test_parse_dataset():
    assert parse_dataset("refcoco+:testB") == ("refcoco+", "testB")
    assert parse_dataset("reason_seg") == ("reason_seg", "val")
    with pytest.raises(UnknownComponentError, match="refcocog"):
        parse_dataset("coco:val")
    with pytest.raises(UnknownComponentError, match="testA"):
        parse_dataset("refcoco:train")


def test_shards_merge_to_the_single_process_numbers(tiny_model, reader):
    ev = Evaluator(tiny_model, reader, modes=("teacher",), progress=False)
    single = ev.collect(0, 1)["teacher"]["all"]
    shards = [ev.collect(r, 3)["teacher"]["all"] for r in range(3)]
    merged = shards[2].merge(shards[0]).merge(shards[1])
    a, b = single.result(), merged.result()
    assert (a["giou"], a["ciou"], a["n_queries"]) == (b["giou"], b["ciou"], b["n_queries"])
    assert a["n_queries"] == sum(len(r.targets) for r in reader)


def test_generate_mode_scores_missing_seg_as_empty(tiny_model, reader, monkeypatch):
    """No [SEG] in the answer -> an empty prediction (IoU 0 on a present target)."""
    eos = tiny_model.tokenizer.eos_id
    monkeypatch.setattr(generation, "_pick", lambda logits, cfg, gen: logits.new_full((logits.shape[0],), eos).long())
    res = Evaluator(tiny_model, reader, modes=("generate",), progress=False).run()["generate"]["all"]
    assert res["giou"] == 0.0 and res["ciou"] == 0.0
    seg = tiny_model.seg_token_id
    calls = {"n": 0}

    def seg_then_eos(logits, cfg, gen):
        calls["n"] += 1
        return logits.new_full((logits.shape[0],), seg if calls["n"] % 2 else eos).long()

    monkeypatch.setattr(generation, "_pick", seg_then_eos)
    ev = Evaluator(tiny_model, reader, modes=("generate",), progress=False)
    res = ev.run()["generate"]["all"]
    assert res["giou"] > 0.0  # random masks overlap the targets somewhat
    assert all("[SEG]" in t for t in ev.answers["generate"].values())


def test_cli_writes_metrics(tmp_path, capsys):
    from lisa_kit.cli import main

    rc = main(["eval", "lisa-tiny", "--dataset", "synthetic:val", "--limit", "2", "--mode", "teacher",
               "--max-new-tokens", "4", "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    ev = report["evals"][0]
    assert ev["dataset"] == "synthetic" and ev["split"] == "val"
    r = ev["modes"]["teacher"]["all"]
    assert r["n_samples"] == 2 and len(r["per_query"]) == r["n_queries"] > 0
    assert report["versions"]["torch"] and report["recipe"] == "lisa-tiny"
    assert "| teacher | all |" in (tmp_path / "metrics.md").read_text()
    assert "gIoU" in capsys.readouterr().out


def test_synthetic_results_add_family_subsets_beside_all(tiny_model, reader):
    """``all`` keeps LISA's keys; synthetic records add ``family:<name>`` subsets, and
    teacher mode (the answer is given) reports no answer-mask consistency."""
    ev = Evaluator(tiny_model, reader, modes=("teacher",), progress=False)
    res = ev.run()["teacher"]
    assert {"giou", "ciou", "n_queries", "n_samples", "per_query", "intersection", "union"} <= set(res["all"])
    families = {k for k in res if k.startswith("family:")}
    assert families and sum(res[k]["n_queries"] for k in families) == res["all"]["n_queries"]
    assert ev.consistency == {}
