"""``synthetic_describe``: the synthetic scenes as description rounds (no masks) that list
every shape in an order the image decides, mixed into training as a data source."""
from __future__ import annotations

import numpy as np
import pytest

from lisa_kit.conversation import get_template
from lisa_kit.datasets import dataset_names, open_dataset
from lisa_kit.datasets.hybrid import hybrid_from_config
from lisa_kit.datasets.synthetic_describe import ORDERS, describe

TPL = get_template("llava_v1")


@pytest.fixture(scope="module")
def pairs():
    opts = {"size": 120, "seed": 3}
    return list(zip(open_dataset("synthetic", None, "train", **opts),
                    open_dataset("synthetic_describe", None, "train", **opts)))


def _listed(answer: str) -> list[str]:
    body = answer.split(": ", 1)[1].rstrip(".")
    head, _, last = body.rpartition(" and ")
    return (head.split(", ") if head else []) + [last]


def test_same_scenes_as_synthetic_and_every_shape_listed_once_in_order(pairs):
    seen_orders = set()
    for scene, rec in pairs:
        np.testing.assert_array_equal(scene.image(), rec.image())
        assert rec.targets == [] and len(rec.rounds) == 1
        question, answer = rec.rounds[0]
        order = rec.meta["order"]
        seen_orders.add(order)
        key, questions, lead = ORDERS[order]
        assert question in questions and answer.startswith(lead + ": ")
        shapes = scene.meta["shapes"]
        listed = _listed(answer)
        assert sorted(listed) == sorted(f"the {s['color']} {s['kind']}" for s in shapes)
        # the order follows the geometry the image shows
        by_name = {}
        for s in shapes:
            by_name.setdefault(f"the {s['color']} {s['kind']}", []).append(key(s))
        keys = [min(by_name[n]) if listed.count(n) == 1 else None for n in listed]
        known = [k for k in keys if k is not None]
        assert known == sorted(known)
    assert seen_orders == set(ORDERS)


def test_describe_reads_naturally():
    shapes = [{"color": "red", "kind": "circle", "center": [40, 10], "area": 30},
              {"color": "blue", "kind": "square", "center": [10, 50], "area": 90}]
    assert describe(shapes, "left_to_right") == "From left to right: the blue square and the red circle."
    assert describe(shapes, "top_to_bottom") == "From top to bottom: the red circle and the blue square."
    assert describe(shapes[:1], "largest_first") == "From largest to smallest: the red circle."


def test_registered_and_mixed_as_a_source_without_masks():
    assert "synthetic_describe" in dataset_names()
    cfg = {"samples_per_epoch": 40, "explanatory": -1, "sources": {
        "seg": {"datasets": ["synthetic"], "rate": 1, "options": {"size": 50}},
        "describe": {"datasets": ["synthetic_describe"], "rate": 1, "options": {"size": 50}}}}
    ds = hybrid_from_config(cfg, TPL)
    described = [s for s in (ds[i] for i in range(len(ds))) if s.masks.shape[0] == 0]
    assert described, "no description sample drawn"
    for s in described:
        (answer,) = [r[1] for r in s.conversations[0].rounds]
        assert "".join(a for a in answer if isinstance(a, str)).strip().startswith("From ")
