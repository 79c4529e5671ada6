"""Regenerate the README's picture: the shipped demo model on the shipped examples.

One column per example of ``lisa_kit/assets/examples/examples.json``: the question on
top, the model's prediction below it (its masks over the image, the answer as caption,
the IoU with the truth, a legend per ``[SEG]``: :func:`lisa_kit.visualize.annotate`),
and under that the ground truth the synthetic generator knows, drawn the same way.
Text sits in bands between the images, never over them. Writes ``docs/images/demo.png``.

    python scripts/make_readme_figure.py [--out docs/images/demo.png]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lisa_kit.api import Segmenter
from lisa_kit.datasets.synthetic import SyntheticReasoningSet
from lisa_kit.demo_app import EXAMPLES_DIR
from lisa_kit.images import load_image
from lisa_kit.visualize import BAND, INK, Picture, annotate, annotate_result, load_font, wrap

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "images" / "demo.png"
GAP = 12  # px between columns and between a column's parts
FONT_SIZE = 13
HEADER = "lisa-kit segment with the shipped demo model: question, prediction, ground truth"


def _ground_truth(src: dict, size: tuple[int, int]) -> tuple[np.ndarray, str]:
    """The generator's mask of the example's target, bool ``(H, W)`` at the image's
    ``size``, and its text."""
    rec = SyntheticReasoningSet(split=src["split"], seed=src["seed"])[src["index"]]
    target = rec.targets[src["target"]]
    mask = Image.fromarray((target.mask == 1).astype(np.uint8) * 255).resize(size[::-1], Image.NEAREST)
    return np.asarray(mask) > 0, target.text


def _column(seg: Segmenter, ex: dict) -> tuple[str, Picture, Picture]:
    image = load_image(EXAMPLES_DIR / ex["image"])
    r = seg.seg(image, ex["question"])
    gt, gt_text = _ground_truth(ex["source"], image.shape[:2])
    iou = float((r.masks[0] & gt).sum() / max(1, (r.masks[0] | gt).sum())) if r.num_masks else 0.0
    pred = annotate_result(image, r, title="prediction", caption=f"{r.text}\n(IoU with the ground truth: {iou:.2f})")
    truth = annotate(image, gt[None], labels=[gt_text], title="ground truth")
    return ex["question"], pred, truth


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args()

    seg = Segmenter.from_default()
    examples = json.loads((EXAMPLES_DIR / "examples.json").read_text())
    columns = [_column(seg, ex) for ex in examples]
    font = load_font(FONT_SIZE)
    line_h = FONT_SIZE + FONT_SIZE // 3
    col_w = max(max(p.pixels.shape[1], t.pixels.shape[1]) for _, p, t in columns)
    questions = [wrap(q, font, col_w) for q, _, _ in columns]
    q_h = max(len(q) for q in questions) * line_h
    pred_h = max(p.pixels.shape[0] for _, p, _ in columns)  # pad so the ground-truth rows line up
    truth_h = max(t.pixels.shape[0] for _, _, t in columns)
    header_h = 2 * line_h
    width = len(columns) * col_w + (len(columns) + 1) * GAP
    height = header_h + q_h + pred_h + truth_h + 3 * GAP
    canvas = Image.new("RGB", (width, height), BAND)
    draw = ImageDraw.Draw(canvas)
    draw.text((GAP, GAP // 2), HEADER, font=font, fill=INK)
    for c, ((_, pred, truth), lines) in enumerate(zip(columns, questions)):
        x = GAP + c * (col_w + GAP)
        y = header_h
        for line in lines:
            draw.text((x, y), line, font=font, fill=INK)
            y += line_h
        canvas.paste(Image.fromarray(pred.pixels), (x, header_h + q_h + GAP))
        canvas.paste(Image.fromarray(truth.pixels), (x, header_h + q_h + pred_h + 2 * GAP))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(a.out, optimize=True)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
