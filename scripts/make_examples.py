"""Regenerate the web demo's example images: ``lisa_kit/assets/examples/``.

Each example is one scene of the synthetic reasoning set (``test`` split, seed
:data:`SEED`), upscaled with nearest neighbour to :data:`SIDE` px so the shapes stay
crisp in a browser, plus one of that scene's own target questions in LISA's validation
phrasing (:func:`lisa_kit.prompts.eval_question`), so the question is answerable and
asked the way the demo model was evaluated. Deterministic: running it again rewrites
byte-identical files.

    python scripts/make_examples.py [--out lisa_kit/assets/examples]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from lisa_kit.datasets.synthetic import SyntheticReasoningSet
from lisa_kit.prompts import eval_question

SEED = 0
SPLIT = "test"
SIDE = 256
#: (record index, target index) of the scenes shown: three question types
#: (size, corners, extreme) that read well as demo questions.
PICKS = ((4, 0), (3, 1), (2, 1))
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "lisa_kit" / "assets" / "examples"


def make_examples(out: Path) -> list[dict]:
    """Write the PNGs and ``examples.json`` into ``out``; returns the JSON entries."""
    out.mkdir(parents=True, exist_ok=True)
    ds = SyntheticReasoningSet(split=SPLIT, seed=SEED)
    entries = []
    for index, target in PICKS:
        rec = ds[index]
        tgt = rec.targets[target]
        name = f"synthetic_{SPLIT}_{index:04d}.png"
        # PIL's PNG writer stores no timestamp, so the bytes depend on the pixels only.
        Image.fromarray(rec.image()).resize((SIDE, SIDE), Image.NEAREST).save(out / name, optimize=True)
        entries.append({"image": name, "question": eval_question(tgt.text, tgt.kind).strip(),
                        "source": {"dataset": "synthetic", "split": SPLIT, "seed": SEED, "index": index,
                                   "target": target, "type": tgt.meta["type"], "text": tgt.text}})
    (out / "examples.json").write_text(json.dumps(entries, indent=2) + "\n")
    return entries


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    args = p.parse_args()
    for e in make_examples(args.out):
        print(f"{args.out / e['image']}: {e['question']}")


if __name__ == "__main__":
    main()
