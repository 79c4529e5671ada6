"""``lisa-kit segment`` and ``lisa-kit chat`` on the tiny recipe (random weights, CPU)."""
from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
from PIL import Image

from lisa_kit import api
from lisa_kit.cli import main
from lisa_kit.testing import force_generation, synthetic_image

TINY = ["--recipe", "lisa-tiny", "--device", "cpu"]


@pytest.fixture
def forced_seg(monkeypatch):
    """Every answer: one argmax token, [SEG], end of sequence (the tiny model is random)."""
    force_generation(monkeypatch, lambda m: {1: m.seg_token_id, 2: m.tokenizer.eos_id})


def _png(path, h, w, seed):
    Image.fromarray(synthetic_image(h, w, seed)[0]).save(path)
    return path


def _check_mask_file(path, h, w):
    m = np.asarray(Image.open(path))
    assert m.shape == (h, w) and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 255}
    return int((m == 255).sum())


def test_segment_single_image(tmp_path, capsys, forced_seg):
    img = _png(tmp_path / "street.png", 37, 53, 0)
    out = tmp_path / "out"
    rc = main(["segment", *TINY, "--image", str(img), "--prompt", "Segment the red square.", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "result.json").read_text())
    assert res["prompt"] == "Segment the red square." and len(res["results"]) == 1
    r = res["results"][0]
    assert r["image"] == str(img) and r["image_size"] == [37, 53] and r["answer"].count("[SEG]") == 1
    assert [m["file"] for m in r["masks"]] == ["street_mask_0.png"]
    assert _check_mask_file(out / "street_mask_0.png", 37, 53) == r["masks"][0]["area"]
    assert isinstance(r["masks"][0]["score"], float)
    assert Image.open(out / r["overlay"]).size == (53, 37)
    assert "[SEG]" in capsys.readouterr().out


def test_segment_directory_with_a_corrupt_file(tmp_path, capsys, forced_seg):
    d = tmp_path / "imgs"
    d.mkdir()
    _png(d / "b.png", 30, 20, 1)
    Image.fromarray(synthetic_image(24, 40, 2)[0]).save(d / "a.JPG")
    (d / "c.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (d / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    rc = main(["segment", *TINY, "--image", str(d), "--prompt", "Segment the red square.", "--out", str(out)])
    assert rc == 1
    res = json.loads((out / "result.json").read_text())["results"]
    assert [r["image"].rsplit("/", 1)[-1] for r in res] == ["a.JPG", "b.png", "c.jpg"]
    assert "error" in res[2] and "c.jpg" in res[2]["error"] and "masks" not in res[2]
    for r, (h, w) in zip(res[:2], [(24, 40), (30, 20)]):
        assert r["image_size"] == [h, w] and len(r["masks"]) == 1
        assert _check_mask_file(out / r["masks"][0]["file"], h, w) == r["masks"][0]["area"]
        assert Image.open(out / r["overlay"]).size == (w, h)
    assert "segment" in capsys.readouterr().err  # the progress bar


def test_segment_errors_exit_2_with_one_line(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    for image in (bad, tmp_path / "missing.png"):
        rc = main(["segment", *TINY, "--image", str(image), "--prompt", "Segment it.", "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and image.name in err
    ok = _png(tmp_path / "ok.png", 20, 20, 3)
    assert main(["segment", *TINY, "--image", str(ok), "--prompt", "  ", "--out", str(tmp_path / "o")]) == 2
    monkeypatch.setattr(api, "DEMO_MODEL_DIR", tmp_path / "no_demo")
    assert main(["segment", "--image", str(ok), "--prompt", "Segment it.", "--out", str(tmp_path / "o")]) == 2
    assert "--recipe" in capsys.readouterr().err
    assert main(["segment", "--help"]) == 0
    assert "examples:" in capsys.readouterr().out


def test_chat_from_stdin(tmp_path, capsys, monkeypatch, forced_seg):
    a = _png(tmp_path / "cat.png", 33, 45, 4)
    b = _png(tmp_path / "dog.png", 26, 19, 5)
    histories = []
    real_seg = api.Segmenter.seg

    def spy(self, image, prompt, **kw):
        histories.append(len(kw.get("history") or []))
        return real_seg(self, image, prompt, **kw)

    monkeypatch.setattr(api.Segmenter, "seg", spy)
    script = "\n".join(["Segment the red square.", str(a), "And the other one?", "/reset", "Once more.",
                        f"/image {tmp_path / 'missing.png'}", "/bogus", "", "What about this?",
                        str(tmp_path / "nope.png"), f'"{b}"', "/quit", "never read"]) + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    out = tmp_path / "chat"
    assert main(["chat", *TINY, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert histories == [0, 1, 0, 0]  # follow-up continues, /reset and /image start over
    assert captured.out.count("answer: ") == 4 and "missing.png" in captured.err and "/bogus" in captured.err
    turns = json.loads((out / "result.json").read_text())["turns"]
    assert [t["turn"] for t in turns] == [1, 2, 3, 4]
    assert [t["image"].rsplit("/", 1)[-1] for t in turns] == ["cat.png"] * 3 + ["dog.png"]
    assert _check_mask_file(out / "cat_t2_mask_0.png", 33, 45) == turns[1]["masks"][0]["area"]
    assert _check_mask_file(out / "dog_t4_mask_0.png", 26, 19) == turns[3]["masks"][0]["area"]
    assert (out / "dog_t4_overlay.png").exists()

    # End of input ends the session too.
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"Segment it.\n{a}\n"))
    assert main(["chat", *TINY, "--out", str(tmp_path / "chat2")]) == 0
    assert len(json.loads((tmp_path / "chat2" / "result.json").read_text())["turns"]) == 1
