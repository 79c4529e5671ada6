"""Regenerate the README's picture: the shipped demo model on the shipped examples.

For each example of ``lisa_kit/assets/examples/examples.json``: the image, the question,
the model's answer and its masks over the image (``lisa_kit.visualize.overlay``), next to
the ground truth the synthetic generator knows. Writes ``docs/images/demo.png``.

    python scripts/make_readme_figure.py [--out docs/images/demo.png]
"""
from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import numpy as np

from lisa_kit.api import Segmenter
from lisa_kit.datasets.synthetic import SyntheticReasoningSet
from lisa_kit.demo_app import EXAMPLES_DIR
from lisa_kit.images import load_image
from lisa_kit.visualize import overlay

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "images" / "demo.png"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    seg = Segmenter.from_default()
    examples = json.loads((EXAMPLES_DIR / "examples.json").read_text())
    fig, axes = plt.subplots(2, len(examples), figsize=(3.2 * len(examples), 7.2))
    for col, ex in enumerate(examples):
        image = load_image(EXAMPLES_DIR / ex["image"])
        r = seg.seg(image, ex["question"])
        src = ex["source"]
        rec = SyntheticReasoningSet(split=src["split"], seed=src["seed"])[src["index"]]
        gt = np.asarray(Image.fromarray((rec.targets[src["target"]].mask == 1).astype(np.uint8) * 255)
                        .resize(image.shape[1::-1], Image.NEAREST)) > 0
        iou = ((r.masks[0] & gt).sum() / (r.masks[0] | gt).sum()) if r.num_masks else 0.0
        axes[0, col].imshow(image)
        axes[0, col].set_title("\n".join(textwrap.wrap(ex["question"], 34)), fontsize=8)
        axes[1, col].imshow(overlay(image, r.masks))
        axes[1, col].set_title("\n".join(textwrap.wrap(r.text, 34)) + f"\n(IoU with the truth {iou:.2f})",
                               fontsize=8)
        for ax in axes[:, col]:
            ax.axis("off")
    fig.suptitle("lisa-kit segment, shipped demo model (question above, answer and mask below)", fontsize=9)
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=80)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
