"""LLaVA-Instruct reader: tiny datasets in the real layout, and parity with the
conversations LISA's VQADataset built (eval fixture, skipped when absent)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from lisa_kit.datasets import open_dataset
from lisa_kit.datasets.vqa import LlavaInstructReader, lisa_image_first
from lisa_kit.errors import DataError
from lisa_kit.testing import eval_fixture_dir


def turn(who, value):
    return {"from": who, "value": value}


ENTRIES = [
    {"id": "1", "image": "000000000001.jpg", "conversations": [
        turn("human", "<image>\nWhat is shown?"), turn("gpt", "A cat.")]},
    {"id": "2", "image": "000000000002.jpg", "conversations": [
        turn("human", "Describe it.\n<image>"), turn("gpt", "A dog."),
        turn("human", "What colour?"), turn("gpt", "Brown.")]},
    # a leading gpt turn is dropped, as LISA does
    {"id": "3", "image": "000000000001.jpg", "conversations": [
        turn("gpt", "Hello."), turn("human", "Where? <image>"), turn("gpt", "Here.")]},
    # malformed: trailing question without an answer
    {"id": "4", "image": "000000000001.jpg", "conversations": [
        turn("human", "<image>\nQ1"), turn("gpt", "A1"), turn("human", "Q2")]},
    # malformed: unknown role
    {"id": "5", "image": "000000000001.jpg", "conversations": [
        turn("human", "<image>\nQ"), turn("assistant", "A")]},
    # malformed: non-string value
    {"id": "6", "image": "000000000001.jpg", "conversations": [
        turn("human", "<image>\nQ"), turn("gpt", None)]},
    # image file absent
    {"id": "7", "image": "000000000099.jpg", "conversations": [turn("human", "<image>\nQ"), turn("gpt", "A")]},
    # no image field
    {"id": "8", "conversations": [turn("human", "<image>\nQ"), turn("gpt", "A")]},
]


@pytest.fixture()
def root(tmp_path):
    images = tmp_path / "coco" / "train2017"
    images.mkdir(parents=True)
    for name in ("000000000001.jpg", "000000000002.jpg"):
        Image.new("RGB", (32, 24), (10, 200, 30)).save(images / name)
    ann = tmp_path / "llava_dataset"
    ann.mkdir()
    (ann / "llava_instruct_150k.json").write_text(json.dumps(ENTRIES))
    (ann / "small.json").write_text(json.dumps(ENTRIES[:1]))
    return tmp_path


def test_rounds_as_stored(root):
    ds = open_dataset("llava_instruct", root)
    assert isinstance(ds, LlavaInstructReader) and len(ds) == len(ENTRIES)
    r0, r1, r2 = ds[0], ds[1], ds[2]
    assert r0.rounds == [("<image>\nWhat is shown?", "A cat.")]
    assert r1.rounds == [("Describe it.\n<image>", "A dog."), ("What colour?", "Brown.")]
    assert r2.rounds == [("Where? <image>", "Here.")] and r2.meta["skipped_leading_turns"] == 1
    assert [r.meta["image_marker_round"] for r in (r0, r1, r2)] == [0, 0, 0]
    assert r0.targets == [] and r0.key == "1" and r0.source == "llava_instruct"
    assert r1.image_path == root / "coco" / "train2017" / "000000000002.jpg"
    assert r1.image().shape == (24, 32, 3)
    assert ds.files(0) == [root / "coco/train2017/000000000001.jpg", root / "llava_dataset/llava_instruct_150k.json"]


def test_lisa_image_first():
    assert lisa_image_first("Describe it.\n<image>") == "<image>\nDescribe it."
    assert lisa_image_first("<image>\nWhat is shown?") == "<image>\nWhat is shown?"
    assert lisa_image_first("Where? <image> and <image>") == "<image>\nWhere?  and"
    assert lisa_image_first("No marker  ") == "No marker  "


def test_json_name_option(root):
    ds = open_dataset("llava_instruct", root, json_name="small")
    assert len(ds) == 1 and ds[0].key == "1"


def test_malformed_entries(root):
    ds = open_dataset("llava_instruct", root)
    ann = str(root / "llava_dataset" / "llava_instruct_150k.json")
    cases = {3: "[3].conversations[2]", 4: "[4].conversations[1].from", 5: "[5].conversations[1].value",
             7: "[7].image"}
    for i, field in cases.items():
        with pytest.raises(DataError) as e:
            ds[i]
        assert e.value.path == ann and e.value.field == field, (i, str(e.value))
    with pytest.raises(DataError) as e:
        ds[6]
    assert e.value.path == str(root / "coco/train2017/000000000099.jpg") and e.value.field == "[6].image"

    rep = ds.check()  # one bad entry does not block the others
    assert rep.counts["records"] == len(ENTRIES)
    assert len(rep.problems) == 5
    assert any(p.endswith("000000000099.jpg") for p, _ in rep.problems)


def test_file_errors(root, tmp_path):
    with pytest.raises(DataError) as e:
        open_dataset("llava_instruct", root, json_name="absent")
    assert e.value.path.endswith("llava_dataset/absent.json")
    (root / "llava_dataset" / "broken.json").write_text('[{"id": 1,')
    with pytest.raises(DataError) as e:
        open_dataset("llava_instruct", root, json_name="broken")
    assert e.value.path.endswith("broken.json") and "corrupt JSON" in str(e.value)
    (root / "llava_dataset" / "obj.json").write_text('{"id": 1}')
    with pytest.raises(DataError, match="list"):
        open_dataset("llava_instruct", root, json_name="obj")
    with pytest.raises(DataError, match="no split 'val'"):
        open_dataset("llava_instruct", root, "val")


# --- parity with LISA's own output ---------------------------------------------------------

SYSTEM_END = "questions. "  # the llava_v1 system prompt ends with "... the human's questions."


def _lisa_rounds(prompt: str) -> list[tuple[str, str]]:
    """``(question, answer)`` pairs of a llava_v1 prompt
    ``<system> USER: q ASSISTANT: a</s>USER: q2 ASSISTANT: a2</s>``."""
    body = prompt.split(SYSTEM_END, 1)[1]
    pairs = []
    for chunk in body.split("</s>"):
        if chunk:
            q, a = chunk.removeprefix("USER: ").split(" ASSISTANT: ", 1)
            pairs.append((q, a))
    return pairs


def test_fixture_vqa_conversations():
    fx = eval_fixture_dir()
    if fx is None:
        pytest.skip("LISA eval fixture (eval_seed0) not available")
    ds = open_dataset("llava_instruct", fx / "dataset")
    records = {r.image_path.name: r for r in ds}
    draws = json.loads((fx / "reader_reference.json").read_text())["sources"]["vqa"]["draws"]
    assert {Path(d["image_path"]).name for d in draws} == set(records)
    for d in draws:
        rec = records[Path(d["image_path"]).name]
        assert Path(d["image_path"]) == rec.image_path.relative_to(fx / "dataset")
        (prompt,) = d["conversations"]
        want = _lisa_rounds(prompt)
        assert [(lisa_image_first(q), lisa_image_first(a)) for q, a in rec.rounds] == want
        # the stored text is kept: only the marker position differs from LISA's prompt
        assert [(q.replace("<image>", "").strip(), a) for q, a in rec.rounds] == \
               [(q.replace("<image>", "").strip(), a) for q, a in want]
