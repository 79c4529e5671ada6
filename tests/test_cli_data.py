"""``lisa-kit data check``/``data list``: counts, named problems, export of what the model sees."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from lisa_kit.cli import main


def test_data_list(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("reason_seg", "refcocog", "ade20k", "llava_instruct", "synthetic"):
        assert name in out


def test_export_synthetic(tmp_path, capsys):
    rc = main(["data", "check", "--dataset", "synthetic", "--split", "val", "--option", "size=3",
               "--export", str(tmp_path)])
    assert rc == 0
    out = tmp_path / "synthetic" / "val"
    entries = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(entries) == 3
    first = entries[0]
    mask = np.asarray(Image.open(out / first["targets"][0]["mask"]))
    assert set(np.unique(mask)) <= {0, 1, 255} and mask.shape == tuple(first["size"])
    assert first["targets"][0]["question"].strip()
    assert (out / first["image"]).exists() and (out / f"{first['image'][:-4]}_overlay.png").exists()
    assert "records 3" in capsys.readouterr().out


def test_missing_file_is_named(tmp_path, capsys):
    val = tmp_path / "reason_seg" / "ReasonSeg" / "val"
    val.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(val / "a.jpg")
    shape = {"label": "target", "points": [[1, 1], [6, 1], [6, 6]], "shape_type": "polygon"}
    for stem in ("a", "b"):
        (val / f"{stem}.json").write_text(json.dumps({"text": ["x"], "is_sentence": False, "shapes": [shape]}))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(val / "b.jpg")
    (val / "b.jpg").write_bytes(b"not a jpeg")
    rc = main(["data", "check", "--dataset", "reason_seg", "--root", str(tmp_path), "--split", "val"])
    out = capsys.readouterr().out
    assert rc == 1 and "b.jpg" in out and "1 problem" in out


def test_unknown_dataset(capsys):
    assert main(["data", "check", "--dataset", "coco_nope", "--root", "."]) == 2
    assert "reason_seg" in capsys.readouterr().err


def test_export_overlay_is_annotated_ground_truth(tmp_path):
    """The exported overlay: the ground truth outlined over the image (enlarged when
    small), a legend naming each target, the image untouched outside the masks."""
    from lisa_kit.visualize import annotate

    assert main(["data", "check", "--dataset", "synthetic", "--split", "val", "--option", "size=2",
                 "--export", str(tmp_path)]) == 0
    out = tmp_path / "synthetic" / "val"
    entry = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    image = np.asarray(Image.open(out / entry["image"]))
    masks = np.stack([np.asarray(Image.open(out / t["mask"])) for t in entry["targets"]])
    pic = annotate(image, masks, labels=[t["text"] for t in entry["targets"]],
                   caption=f"ground truth of {entry['key']}")
    saved = np.asarray(Image.open(out / f"{entry['image'][:-4]}_overlay.png"))
    x0, y0, x1, y1 = pic.image_box
    assert saved.shape[0] > y1 and saved.shape[1] == x1  # bands below the image, as wide as it
    s = pic.scale
    region = saved[y0:y1, x0:x1]
    outside = (masks == 0).all(axis=0)
    assert np.array_equal(region[::s, ::s][outside], image[outside])
    assert [e.label for e in pic.legend] == [t["text"] for t in entry["targets"]]
    for e in pic.legend:  # each target's swatch is in the saved picture, in its colour
        sx0, sy0, sx1, sy1 = e.swatch
        assert (saved[sy0 + 1:sy1 - 1, sx0 + 1:sx1 - 1] == e.colour).all()
