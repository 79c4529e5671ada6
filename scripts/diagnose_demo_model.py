"""Where a synthetic-shapes model fails: seeing, naming or painting.

For each held-out question (synthetic ``val`` split, asked as its own sentence or as
"Segment <phrase>.") it checks three things per question family:

* ``name_right``: the answer names the target shape ("the blue square");
* ``mask_right``: the mask mostly covers the target shape;
* ``mask_follows_name``: the mask mostly covers the shape the answer names;
* ``rejected``: the answer says the (present) target is not there ("There is no blue
  square in the image. [REJ]"); such an answer names no shape for the two columns above.

Then it asks the model to list the shapes (:mod:`lisa_kit.datasets.synthetic_describe`) and
counts answers that name exactly the image's shapes: a model that cannot list them cannot
reason about them.

Last it separates the mask from the naming: each question is answered for the model,
teacher-forced, "<The name> [SEG]." with the target's own name and with another shape's
(one whose colour and kind differ; questions whose answer shares its name with another shape
are left out, as the name cannot pick it). ``given_right`` / ``given_other``: how often the mask
then paints the named shape; ``other_paints_answer``: how often it paints the question's
answer although another shape was named (the mask following the question, not the name).
Masks that miss a given name are counted by what they paint instead: another shape of the
same kind, of the same colour, another, or nothing.

    python scripts/diagnose_demo_model.py --checkpoint DIR [--images 30] [--show 6]
"""
from __future__ import annotations

import argparse
import collections

import numpy as np
import torch

from lisa_kit.api import Segmenter
from lisa_kit.conversation import IMAGE, Conversation, recipe_template
from lisa_kit.data import Sample, collate
from lisa_kit.datasets.synthetic import CORNERS, PALETTE, SyntheticReasoningSet
from lisa_kit.datasets.synthetic_describe import SyntheticDescribeSet
from lisa_kit.evaluate import is_rejection, named_shape, painted_shape, question_family


def _names(answer: str) -> list[str]:
    body = answer.split(": ", 1)[-1].strip().rstrip(".")
    return sorted(p.strip() for p in body.replace(" and ", ", ").split(", ") if p.strip())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a lisa_kit-format model directory")
    ap.add_argument("--images", type=int, default=30, help="held-out images (default 30)")
    ap.add_argument("--show", type=int, default=6, help="wrong answers to print (default 6)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    seg = Segmenter.from_checkpoint(args.checkpoint)
    stats: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    shown = 0
    for rec in SyntheticReasoningSet(split="val", size=args.images):
        shapes = rec.meta["shapes"]
        for t in rec.targets:
            if t.meta.get("absent"):
                continue
            q = t.text if t.kind == "sentence" else f"Segment {t.text}."
            res = seg.seg(rec.image(), q)
            rejected = is_rejection(res.text)
            named = None if rejected else named_shape(res.text, PALETTE, CORNERS)
            s = shapes[t.meta["answer"]]
            want = (s["color"], s["kind"])
            k = painted_shape(np.asarray(res.masks[0]), rec.labels, len(shapes)) if res.num_masks else None
            painted = (shapes[k]["color"], shapes[k]["kind"]) if k is not None else None
            c = stats[question_family(t.meta)]
            c.update(n=1, name_right=named == want, mask_right=painted == want,
                     mask_follows_name=named is not None and painted == named, rejected=rejected)
            if named != want and shown < args.show:
                shown += 1
                print(f"Q: {q}\n  A: {res.text}\n  target {want}, painted {painted}")
    total: collections.Counter = collections.Counter()
    print(f"\n{'family':<12} {'n':>4} {'name_right':>11} {'mask_right':>11} {'mask_follows_name':>18} {'rejected':>9}")
    for fam, c in sorted(stats.items()) + [("all", None)]:
        c = c if c is not None else total
        if fam != "all":
            total.update(c)
        n = max(c["n"], 1)
        print(f"{fam:<12} {c['n']:>4} {c['name_right'] / n:>11.2f} {c['mask_right'] / n:>11.2f} "
              f"{c['mask_follows_name'] / n:>18.2f} {c['rejected'] / n:>9.2f}")
    describe = SyntheticDescribeSet(split="val", size=args.images)
    lists = [(_names(seg.seg(rec.image(), rec.rounds[0][0]).text), _names(rec.rounds[0][1])) for rec in describe]
    print(listing_report(lists))
    print(forced_report(seg.model, SyntheticReasoningSet(split="val", size=args.images)))
    return 0


def _name(shape: dict) -> str:
    return f"The {shape['color']} {shape['kind']}"


@torch.inference_mode()
def forced_report(model, records) -> str:
    """Masks under teacher-forced names (module docstring): does the mask follow the name
    the answer gives, or the question?"""
    model.eval()
    template = recipe_template(model.recipe, model.tokenizer)
    seg, device = model.seg_token, next(model.parameters()).device
    rng = np.random.default_rng(0)
    c: collections.Counter = collections.Counter()
    for rec in records:
        shapes = rec.meta["shapes"]
        for t in rec.targets:
            a = t.meta.get("answer")
            if a is None:
                continue
            same = [j for j, s in enumerate(shapes) if (s["color"], s["kind"]) == (shapes[a]["color"], shapes[a]["kind"])]
            others = [j for j in range(len(shapes)) if j not in same]
            if len(same) > 1 or not others:  # a name shared by two shapes cannot pick one of them
                continue
            j = others[int(rng.integers(len(others)))]
            q = t.text if t.kind == "sentence" else f"Segment {t.text}."
            convs = [Conversation(template).add([IMAGE, "\n" + q], f"{_name(shapes[k])} {seg}.", markers=(seg,))
                     for k in (a, j)]
            batch = collate([Sample(rec.image(), convs, None)], model).to(device)
            masks = model(batch).pred_masks[0]
            for given, logits, tag in ((a, masks[0], "given_right"), (j, masks[1], "given_other")):
                k = painted_shape((logits > 0).cpu().numpy(), rec.labels, len(shapes))
                c[tag] += k == given
                if tag == "given_other":
                    c["other_paints_answer"] += k == a
                if k != given:
                    g = shapes[given]
                    miss = ("nothing" if k is None else "same kind" if shapes[k]["kind"] == g["kind"]
                            else "same colour" if shapes[k]["color"] == g["color"] else "another")
                    c[f"miss: {miss}"] += 1
            c["n"] += 1
    n = max(c["n"], 1)
    misses = ", ".join(f"{k[6:]} {v}" for k, v in sorted(c.items()) if k.startswith("miss: ")) or "none"
    return (f"\nmask under a given name ({c['n']} questions): given_right {c['given_right'] / n:.2f}, "
            f"given_other {c['given_other'] / n:.2f}, other_paints_answer {c['other_paints_answer'] / n:.2f}; "
            f"masks missing the given name paint: {misses}")


def listing_report(lists: list[tuple[list[str], list[str]]]) -> str:
    """How well the model lists an image's shapes, from ``(listed, true)`` name lists
    ("the blue square", …): lists exactly right, and right in their colours only or in
    their kinds only (as multisets), plus the precision and recall of the names. A model
    whose kinds are wrong while its colours are right cannot see the forms it is asked about."""
    def part(names, i):  # i: 0 colour, 1 kind; a listed name naming no "<colour> <kind>" matches nothing
        return sorted(s[i] if (s := named_shape(n, PALETTE, CORNERS)) else f"?{n}" for n in names)

    n = max(len(lists), 1)
    exact = sum(got == want for got, want in lists)
    colours = sum(part(got, 0) == part(want, 0) for got, want in lists)
    kinds = sum(part(got, 1) == part(want, 1) for got, want in lists)
    hits = sum(sum((collections.Counter(got) & collections.Counter(want)).values()) for got, want in lists)
    said, true = sum(len(g) for g, _ in lists), sum(len(w) for _, w in lists)
    return (f"\nlists exactly the image's shapes: {exact}/{len(lists)}; colours right {colours / n:.2f}, "
            f"kinds right {kinds / n:.2f}; names listed: precision {hits / max(said, 1):.2f}, "
            f"recall {hits / max(true, 1):.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
