"""Scene descriptions of the synthetic shapes set: text-only rounds that teach a tower to see.

``synthetic_describe`` reads the same scenes as :mod:`lisa_kit.datasets.synthetic` (same
options, same ``(seed, split, i)`` determinism) but each record is one VQA-style round
with no mask: a request to list the shapes in an order, and the list::

    Q: "List the shapes from left to right."
    A: "From left to right: the red circle, the blue square and the green triangle."

The orders are left to right, top to bottom and largest to smallest (one per record,
drawn from the record's own generator). LLaVA trains its projector on captions before it
asks questions; here, mixed into the segmentation data as another source
(``data.sources``), these rounds give every shape's colour, kind and place a token of
supervision, where a segmentation answer supervises only the one name it writes. A model
trained from scratch (the shipped demo model) otherwise learns to name shapes it does not
see (measured: lisa-demo-v2 without them named the right shape for 26 % of held-out
questions after 3500 steps).
"""
from __future__ import annotations

import numpy as np

from lisa_kit.datasets.base import register_dataset
from lisa_kit.datasets.synthetic import SPLITS, SyntheticReasoningSet, SyntheticRecord, _name

#: order name -> (sort key of a shape, questions, the answer's lead)
ORDERS: dict[str, tuple] = {
    "left_to_right": (lambda s: s["center"][0],
                      ("List the shapes from left to right.", "Name every shape, from left to right.",
                       "Which shapes are in the image, from left to right?"),
                      "From left to right"),
    "top_to_bottom": (lambda s: s["center"][1],
                      ("List the shapes from top to bottom.", "Name every shape, from top to bottom.",
                       "Which shapes are in the image, from top to bottom?"),
                      "From top to bottom"),
    "largest_first": (lambda s: -s["area"],
                      ("List the shapes from largest to smallest.", "Name every shape, largest first.",
                       "Which shapes are in the image, from the largest to the smallest?"),
                      "From largest to smallest"),
}


def describe(shapes: list[dict], order: str) -> str:
    """The answer listing ``shapes`` in ``order`` (a key of :data:`ORDERS`)."""
    key, _, lead = ORDERS[order]
    names = [_name(s) for s in sorted(shapes, key=key)]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{lead}: {listed}."


@register_dataset("synthetic_describe")
class SyntheticDescribeSet(SyntheticReasoningSet):
    """The synthetic scenes as description rounds (see the module docstring). Options are
    :class:`~lisa_kit.datasets.synthetic.SyntheticReasoningSet`'s; records have ``rounds``
    (one ``(question, answer)``), no targets, and keep the scene's ``meta``/``labels``."""

    name = "synthetic_describe"

    def __getitem__(self, i: int) -> SyntheticRecord:
        rec = super().__getitem__(i)
        o = self.options
        # The record's own stream, apart from the scene's, so scenes equal synthetic's.
        rng = np.random.default_rng((o["seed"], SPLITS.index(self.split), self._index(i), len(ORDERS)))
        order = sorted(ORDERS)[int(rng.integers(len(ORDERS)))]
        questions = ORDERS[order][1]
        question = questions[int(rng.integers(len(questions)))]
        return SyntheticRecord(source=self.name, key=rec.key, image_path=rec.image_path, targets=[],
                               rounds=[(question, describe(rec.meta["shapes"], order))],
                               meta={**rec.meta, "order": order}, labels=rec.labels, pixels=rec.pixels)
