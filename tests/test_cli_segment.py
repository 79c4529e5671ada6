"""``lisa-kit segment`` and ``lisa-kit chat`` on the tiny recipe (random weights, CPU)."""
from __future__ import annotations

import io
import json
import os
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
    # The annotated picture adds bands (question, answer, legend) around the image, never over it.
    aw, ah = Image.open(out / r["annotated"]).size
    assert r["annotated"] == "street_annotated.png" and aw >= 53 and ah > 37
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


# -- directory runs, replaced runs, undecodable text (issue 15) ------------------------
def _run_dir(d, out, *extra):
    return main(["segment", *TINY, "--image", str(d), "--prompt", "Segment the red square.", "--out", str(out),
                 *extra])


def test_directory_run_survives_bad_images_and_lists_every_entry(tmp_path, capsys, forced_seg):
    d = tmp_path / "imgs"
    d.mkdir()
    rgb = synthetic_image(24, 30, 6)[0]
    frames = [Image.fromarray(rgb), Image.fromarray(rgb[::-1])]
    frames[0].save(d / "a_anim.gif", save_all=True, append_images=frames[1:])
    for name in ("b.webp", "c.tiff", "d.bmp"):
        Image.fromarray(rgb).save(d / name)
    Image.new("L", (3000, 3000)).save(d / "e_bomb.png")  # 9 Mpx of zeros in a few KB: over --max-pixels
    Image.new("RGB", (400, 1)).save(d / "f_strip.png")  # SAM's resize would leave 0 rows
    (d / "g.txt").write_text("not an image")
    (d / "sub").mkdir()
    out = tmp_path / "out"
    assert _run_dir(d, out, "--max-pixels", "4000000") == 1
    err = capsys.readouterr().err
    assert "2 of 6 image(s) failed" in err
    res = json.loads((out / "result.json").read_text())
    assert res["complete"] is True and res["in_progress"] is None and res["failed"] == 2
    by_name = {r["image"].rsplit("/", 1)[-1]: r for r in res["results"]}
    assert sorted(by_name) == ["a_anim.gif", "b.webp", "c.tiff", "d.bmp", "e_bomb.png", "f_strip.png"]
    for name in ("a_anim.gif", "b.webp", "c.tiff", "d.bmp"):
        r = by_name[name]
        assert r["image_size"] == [24, 30] and _check_mask_file(out / r["masks"][0]["file"], 24, 30) >= 0
    assert "3000x3000" in by_name["e_bomb.png"]["error"] and "4000000" in by_name["e_bomb.png"]["error"]
    assert "aspect ratio" in by_name["f_strip.png"]["error"] and "masks" not in by_name["f_strip.png"]
    skipped = {s["file"].rsplit("/", 1)[-1]: s["reason"] for s in res["skipped"]}
    assert set(skipped) == {"g.txt", "sub"} and ".txt" in skipped["g.txt"] and "director" in skipped["sub"]


def test_result_json_is_true_after_every_image(tmp_path, monkeypatch, forced_seg):
    d = tmp_path / "imgs"
    d.mkdir()
    for k in range(3):
        _png(d / f"p{k}.png", 20, 21, k)
    calls = []
    real = api.Segmenter.seg

    def interrupted(self, image, prompt, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the run is stopped while the third image is being answered
        return real(self, image, prompt, **kw)

    monkeypatch.setattr(api.Segmenter, "seg", interrupted)
    out = tmp_path / "out"
    assert main(["segment", *TINY, "--image", str(d), "--prompt", "Segment it.", "--out", str(out)]) != 0
    res = json.loads((out / "result.json").read_text())
    assert res["complete"] is False and [r["image"].rsplit("/", 1)[-1] for r in res["results"]] == ["p0.png", "p1.png"]
    listed = {m["file"] for r in res["results"] for m in r["masks"]} | {r["overlay"] for r in res["results"]} \
        | {r["annotated"] for r in res["results"]}
    assert listed == {p.name for p in out.glob("*.png")}  # every file described, every description true


def test_a_run_into_an_earlier_runs_out_replaces_it(tmp_path, forced_seg):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    for name in ("a", "b"):
        _png(first / f"{name}.png", 20, 22, 1)
    _png(second / "c.png", 20, 22, 2)
    out = tmp_path / "out"
    assert _run_dir(first, out) == 0
    assert {"a_mask_0.png", "b_overlay.png"} <= {p.name for p in out.iterdir()}
    # A run cut short while writing "x" names it in_progress; a hand-edited entry cannot reach outside.
    res = json.loads((out / "result.json").read_text())
    res["in_progress"] = {"image": "x.png", "stem": "x"}
    res["results"].append({"image": "v.png", "overlay": "../victim_overlay.png", "masks": []})
    (out / "result.json").write_text(json.dumps(res))
    (out / "x_mask_0.png").write_bytes(b"half written")
    (tmp_path / "victim_overlay.png").write_bytes(b"not ours")
    (out / "notes_mine.txt").write_text("the user's own file")
    assert _run_dir(second, out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["c_annotated.png", "c_mask_0.png", "c_overlay.png", "notes_mine.txt",
                                                  "result.json"]
    assert [r["image"].rsplit("/", 1)[-1] for r in json.loads((out / "result.json").read_text())["results"]] == ["c.png"]
    assert (tmp_path / "victim_overlay.png").exists()
    # --out inside the image directory: the earlier run's masks are not taken as images.
    assert _run_dir(second, second) == 0 and _run_dir(second, second) == 0
    res = json.loads((second / "result.json").read_text())
    assert [r["image"].rsplit("/", 1)[-1] for r in res["results"]] == ["c.png"]


def test_file_names_that_are_not_utf8(tmp_path, forced_seg):
    d = tmp_path / "imgs"
    d.mkdir()
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not UTF-8
    _png(d / name, 20, 20, 3)
    out = tmp_path / "out"
    assert _run_dir(d, out) == 0
    (r,) = json.loads((out / "result.json").read_text(encoding="utf-8"))["results"]
    assert os.path.exists(r["image"]) and r["image"].endswith(name)  # the escapes read back as the same name


def test_undecodable_prompt_in_argv_is_a_one_line_error(tmp_path, capsys):
    ok = _png(tmp_path / "ok.png", 20, 20, 3)
    prompt = os.fsdecode(b"Segment the caf\xe9 sign.")  # how Python hands over invalid UTF-8 in argv
    rc = main(["segment", *TINY, "--image", str(ok), "--prompt", prompt, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: the --prompt is not valid text") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_chat_survives_invalid_utf8_on_stdin(tmp_path, capsys, monkeypatch, forced_seg):
    a = _png(tmp_path / "cat.png", 21, 23, 4)
    raw = b"Segment the caf\xe9 sign.\nSegment the red square.\n" + str(a).encode() + b"\n\xff\xfe\n/quit\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8"))  # strict, as a terminal's
    assert main(["chat", *TINY, "--out", str(tmp_path / "chat")]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("not valid text") == 2 and captured.out.count("answer: ") == 1
    turns = json.loads((tmp_path / "chat" / "result.json").read_text())["turns"]
    assert [t["prompt"] for t in turns] == ["Segment the red square."]


def test_an_answer_without_seg_says_why_no_mask_was_made(tmp_path, capsys, monkeypatch):
    """issue 13: 'Segment the blue square.' gave 0 masks with no hint why."""
    force_generation(monkeypatch, lambda m: {1: m.tokenizer.encode_text("square")[0], 2: m.tokenizer.eos_id})
    img = tmp_path / "shapes.png"
    Image.fromarray(synthetic_image(37, 53, 1)[0]).save(img)
    out = tmp_path / "out"
    assert main(["segment", *TINY, "--image", str(img), "--prompt", "Segment the blue square.",
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "0 mask(s)" in captured.out
    assert "no [SEG]" in captured.err and "Please output segmentation mask." in captured.err


def test_an_answer_with_seg_gives_no_hint(tmp_path, capsys, forced_seg):
    img = tmp_path / "shapes.png"
    Image.fromarray(synthetic_image(37, 53, 1)[0]).save(img)
    assert main(["segment", *TINY, "--image", str(img), "--prompt", "Segment it.", "--out", str(tmp_path / "o")]) == 0
    assert "note:" not in capsys.readouterr().err


def test_a_full_disk_while_writing_results_is_one_error_line(tmp_path, capsys, monkeypatch, forced_seg):
    """Writing masks or result.json can fail for reasons of the disk, not of lisa_kit: one
    `error:` line naming the file and the reason, no traceback."""
    import errno

    from PIL import Image as PILImage

    def full(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    img = tmp_path / "shapes.png"
    Image.fromarray(synthetic_image(37, 53, 1)[0]).save(img)  # the input, written before the disk "fills"
    monkeypatch.setattr(PILImage.Image, "save", full)
    rc = main(["segment", *TINY, "--image", str(img), "--prompt", "Segment it.", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and "error: cannot write" in err and "No space left on device" in err
    assert "Traceback" not in err
