"""A procedural reasoning-segmentation set: coloured shapes and questions about them.

Each record is one scene: a grey, lightly noisy background with 2-5 non-overlapping
shapes (circle, triangle, square, pentagon, hexagon) painted in colours of
:data:`PALETTE`, and ``questions_per_image`` questions, each answered by exactly one
shape (or, with ``absent_ratio > 0``, by none). It exists for tests, benchmarks and a
tiny demo model trained on CPU, so it is small, exact and fully determined:

* **exact**: each shape's mask is rasterised once (PIL, no anti-aliasing) and the image
  is painted *through* that mask, so the image and the masks agree pixel for pixel; the
  background never takes a palette colour, and shapes never touch.
* **deterministic**: record ``i`` is a pure function of ``(seed, split, i)`` (its own
  ``np.random.default_rng((seed, split_index, i))``), so any index can be generated on its
  own, in any order, in any worker, and the splits are disjoint streams.
* **unambiguous**: a question is only asked when its answer is unique *with a margin*
  (the largest shape is at least :data:`AREA_RATIO` times the next one, the leftmost
  shape's centre is :data:`POSITION_MARGIN` of the image width left of the next one...),
  so a small model is not asked to resolve one-pixel differences.

Question types (``Target.meta["type"]``; ``Target.meta["query"]`` holds the parameters
from which ``Target.meta["answer"]``, an index into ``Record.meta["shapes"]``, follows):

``attribute``  "the red circle", "the blue object", "the triangle" (``kind="phrase"``)
``size``       largest/smallest, optionally of a colour or kind ("Which blue shape is the smallest?")
``corners``    most/fewest corners, optionally of a colour (circle 0, triangle 3 ... hexagon 6)
``extreme``    leftmost/rightmost/topmost/bottommost, optionally of a colour or kind
``relation``   the nearest shape directly left of/right of/above/below an anchor shape
``nearest``    the shape closest to an anchor shape
``same``       the other shape with the same colour (or kind) as an anchor shape
``absent``     only with ``absent_ratio``: "the purple triangle" when there is none;
               empty mask, ``meta["absent"] = True``, ``meta["answer"] = None``

Every type but ``attribute`` and ``absent`` is a full question (``kind="sentence"``).
Each target's meta also holds ``explanation`` (why the answer is the answer),
``phrase`` (a noun phrase for what is asked: "the largest blue shape", "the shape
closest to the red circle"), ``name`` (the answer shape, "the blue square"; ``None``
when absent) and ``predicate`` (the explanation after the name: "is the largest shape.";
``None`` when absent), so prompts can ask any type in other phrasings and answers can
name what the mask paints.
Geometry uses image coordinates: ``x`` to the right, ``y`` down, a shape's ``center`` is
the centroid ``[x, y]`` of its mask pixels and ``bbox`` is ``[x0, y0, x1, y1)``.

``SyntheticReasoningSet(root=None)`` generates; :meth:`SyntheticReasoningSet.write`
materialises a split as ``root/synthetic/<split>/{images,labels}/<i>.png`` plus
``annotations.json``, and ``SyntheticReasoningSet(root)`` reads that layout back when it
exists (the stored generation options then win over the ones passed).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from lisa_kit.datasets.base import DatasetReader, Record, Target, register_dataset
from lisa_kit.errors import DataError, InputError

#: Named colours, far apart in RGB so a low-resolution model separates them, and all
#: with a channel <= 60 or >= 200 so none can be hit by the grey background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 200),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
#: Shape kinds and their corner counts (a circle has none).
CORNERS: dict[str, int] = {"circle": 0, "triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}
QUESTION_TYPES = ("attribute", "size", "corners", "extreme", "relation", "nearest", "same")
SPLITS = ("train", "val", "test")
#: Where absent targets come from (the ``absent_from`` option): any question, or lookups only.
ABSENT_FROM = ("questions", "lookups")
DEFAULT_SIZES = {"train": 10_000, "val": 500, "test": 500}
DEFAULT_IMAGE_SIZE = (64, 64)
LAYOUT_VERSION = 1

#: A superlative on area needs the winner this many times larger (smaller) than the runner-up.
AREA_RATIO = 1.25
#: A nearest-shape answer needs the runner-up this many times further away.
DISTANCE_RATIO = 1.25
#: Positional answers need this fraction of the image side between winner and runner-up.
POSITION_MARGIN = 0.06
#: Background grey levels, per-image tint and per-pixel noise (the default ``texture``):
#: at most 150 + 10 + 8 < 200 and at least 100 - 10 - 8 > 60, off every palette colour.
_GREY = (100, 150)
_TINT = 10
DEFAULT_TEXTURE = 8

_NUMBERS = {0: "no", 3: "three", 4: "four", 5: "five", 6: "six"}
_SIDES = {"left": ("x", -1), "right": ("x", 1), "top": ("y", -1), "bottom": ("y", 1)}

# Phrasings. ``{g}`` is a group noun ("shape", "blue shape", "circle", "red circle"),
# ``{a}`` an anchor description ("the red circle", "the circle", "the red shape").
_ATTRIBUTE = {
    ("color", "kind"): ["the {c} {k}", "{c} {k}", "the {k} that is {c}"],
    ("color",): ["the {c} shape", "the {c} object", "{c} object"],
    ("kind",): ["the {k}", "{k}", "the {k} shape"],
}
_SIZE = {
    "largest": ["Which {g} is the largest?", "What is the biggest {g} in the image?",
                "Segment the largest {g}.", "Which {g} covers the most area?"],
    "smallest": ["Which {g} is the smallest?", "What is the tiniest {g} in the image?",
                 "Segment the smallest {g}.", "Which {g} covers the least area?"],
}
_CORNER_Q = {
    "most": ["Which {g} has the most corners?", "Find the {g} with the largest number of corners.",
             "Which {g} has the most vertices?"],
    "fewest": ["Which {g} has the fewest corners?", "Find the {g} with the smallest number of corners.",
               "Which {g} has the fewest vertices?"],
}
_EXTREME = {
    "left": ["Which {g} is the leftmost?", "What is the {g} furthest to the left?", "Segment the leftmost {g}."],
    "right": ["Which {g} is the rightmost?", "What is the {g} furthest to the right?", "Segment the rightmost {g}."],
    "top": ["Which {g} is the topmost?", "What is the {g} highest up in the image?", "Segment the topmost {g}."],
    "bottom": ["Which {g} is the bottommost?", "What is the {g} lowest down in the image?",
               "Segment the bottommost {g}."],
}
_RELATION = {
    "left": ["What is directly to the left of {a}?", "Which shape is just left of {a}?",
             "Segment the nearest shape on the left of {a}."],
    "right": ["What is directly to the right of {a}?", "Which shape is just right of {a}?",
              "Segment the nearest shape on the right of {a}."],
    "above": ["What is directly above {a}?", "Which shape sits right above {a}?",
              "Segment the nearest shape above {a}."],
    "below": ["What is directly below {a}?", "Which shape sits right below {a}?",
              "Segment the nearest shape below {a}."],
}
_NEAREST = ["Which shape is closest to {a}?", "What is the nearest object to {a}?",
            "Segment the shape nearest to {a}."]
_SAME = {
    "color": ["Which other shape has the same color as {a}?", "Find the shape that shares its color with {a}.",
              "What else in the image is the same color as {a}?"],
    "kind": ["Which other shape has the same form as {a}?", "Find the other shape of the same type as {a}.",
             "What else in the image has the same shape as {a}?"],
}
#: Relation directions as (forward axis, sign): B is "left of" A when it lies in the
#: 90-degree cone opening to A's left, i.e. its forward offset exceeds its lateral one.
_DIRECTIONS = {"left": (0, -1), "right": (0, 1), "above": (1, -1), "below": (1, 1)}
_DIRECTION_WORDS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}


@dataclass
class SyntheticRecord(Record):
    """A :class:`Record` that also carries the scene's label map.

    ``labels``: ``uint8 (H, W)``, ``0`` background and ``j + 1`` on shape ``j`` of
    ``meta["shapes"]``. ``pixels``: the rendered image for generated records (their
    ``image_path`` is a pseudo path), ``None`` for records read from disk.
    """

    labels: np.ndarray | None = field(default=None, repr=False, compare=False)
    pixels: np.ndarray | None = field(default=None, repr=False, compare=False)

    def image(self) -> np.ndarray:
        if self.pixels is not None:
            return self.pixels.copy()  # a copy: callers may draw on it
        return super().image()


# --------------------------------------------------------------------------- scenes


def _polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a regular polygon inscribed in the circle ``(cx, cy, r)``, in a fixed
    upright orientation (triangle and pentagon point up, square axis-aligned) so that a
    kind always looks the same."""
    n = CORNERS[kind]
    start = {3: -90.0, 4: -45.0, 5: -90.0, 6: 0.0}[n]
    ang = np.deg2rad(start + 360.0 * np.arange(n) / n)
    return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in ang]


def _shape_mask(kind: str, cx: float, cy: float, r: float, hw: tuple[int, int]) -> np.ndarray:
    """``bool (H, W)``: the pixels PIL fills for the shape (no anti-aliasing)."""
    canvas = Image.new("L", (hw[1], hw[0]), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    else:
        draw.polygon(_polygon(kind, cx, cy, r), fill=1)
    return np.asarray(canvas, dtype=bool)


def _place(rng: np.random.Generator, n: int, hw: tuple[int, int]) -> list[tuple[float, float, float]]:
    """Up to ``n`` circles ``(cx, cy, r)`` inside the image, pairwise at least ``gap``
    pixels apart, by rejection sampling (a circle that does not fit anywhere is shrunk,
    then dropped). The shapes are drawn inside these circles, so they cannot touch."""
    h, w = hw
    side = min(h, w)
    r_min, r_max = 0.09 * side, 0.2 * side
    # PIL may fill a pixel up to one pixel outside the ideal outline, so 4 px of gap
    # leaves at least two background pixels between any two shapes.
    gap = max(4.0, 0.04 * side)
    placed: list[tuple[float, float, float]] = []
    for _ in range(n):
        r = float(rng.uniform(r_min, r_max))
        while True:
            for _try in range(40):
                cx = float(rng.uniform(r + 1, w - r - 2))
                cy = float(rng.uniform(r + 1, h - r - 2))
                if all((cx - x) ** 2 + (cy - y) ** 2 >= (r + q + gap) ** 2 for x, y, q in placed):
                    placed.append((cx, cy, r))
                    break
            else:
                if r > r_min:
                    r = max(r_min, r * 0.8)
                    continue
            break
    return placed


def _scene(rng: np.random.Generator, hw: tuple[int, int], n_shapes: tuple[int, int], colors: list[str],
           kinds: list[str], texture: int) -> tuple[np.ndarray, np.ndarray, list[dict], list[int]]:
    """Render one scene -> ``(image uint8 (H, W, 3), labels uint8 (H, W), shapes, background)``."""
    h, w = hw
    grey = int(rng.integers(_GREY[0], _GREY[1] + 1))
    background = [grey + int(t) for t in rng.integers(-_TINT, _TINT + 1, 3)]
    image = np.empty((h, w, 3), np.uint8)
    image[:] = background
    if texture:
        image[:] = image + rng.integers(-texture, texture + 1, (h, w, 3))
    labels = np.zeros((h, w), np.uint8)
    shapes: list[dict] = []
    for cx, cy, r in _place(rng, int(rng.integers(n_shapes[0], n_shapes[1] + 1)), hw):
        kind = kinds[int(rng.integers(len(kinds)))]
        color = colors[int(rng.integers(len(colors)))]
        m = _shape_mask(kind, cx, cy, r, hw)
        if not m.any():  # cannot happen at the supported sizes; never emit an empty shape
            continue
        labels[m] = len(shapes) + 1
        image[m] = PALETTE[color]
        ys, xs = np.nonzero(m)
        shapes.append({
            "id": len(shapes), "kind": kind, "color": color, "rgb": list(PALETTE[color]),
            "corners": CORNERS[kind], "radius": round(r, 3),
            # Centroid of the painted pixels (what a model sees), rounded so the stored
            # value is the one every decision below was made with.
            "center": [round(float(xs.mean()), 3), round(float(ys.mean()), 3)],
            "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
            "area": int(m.sum()),
        })
    return image, labels, shapes, background


# ------------------------------------------------------------------------ questions


def _matches(s: dict, color: str | None, kind: str | None) -> bool:
    return (color is None or s["color"] == color) and (kind is None or s["kind"] == kind)


def _noun(color: str | None, kind: str | None, default: str = "shape") -> str:
    """Group noun: "red circle", "red <default>", "circle" or "<default>"."""
    return " ".join(p for p in (color, kind or default) if p)


def _name(s: dict) -> str:
    return f"the {s['color']} {s['kind']}"


def _groups(shapes: list[dict], by_kind: bool = True) -> list[tuple[str | None, str | None, list[dict]]]:
    """``(color, kind, members)`` for all shapes and every colour (kind) held by two or
    more shapes: the sets a superlative ranges over."""
    out = [(None, None, shapes)]
    for c in sorted({s["color"] for s in shapes}):
        members = [s for s in shapes if s["color"] == c]
        if len(members) >= 2:
            out.append((c, None, members))
    if by_kind:
        for k in sorted({s["kind"] for s in shapes}):
            members = [s for s in shapes if s["kind"] == k]
            if len(members) >= 2:
                out.append((None, k, members))
    return out


def _descriptions(s: dict, shapes: list[dict]) -> list[dict]:
    """The attribute descriptions (``{"color", "kind"}``, either may be ``None``) that
    pick out ``s`` alone."""
    out = []
    for color, kind in ((s["color"], s["kind"]), (s["color"], None), (None, s["kind"])):
        if sum(_matches(t, color, kind) for t in shapes) == 1:
            out.append({"color": color, "kind": kind})
    return out


def _anchor_text(d: dict) -> str:
    return "the " + _noun(d["color"], d["kind"])


def _candidates(shapes: list[dict], hw: tuple[int, int]) -> dict[str, list[tuple[dict, int]]]:
    """Every unambiguous question on the scene: ``{type: [(query, answer index)]}``.

    A query's ``anchor`` is here the list of the anchor's unique descriptions; the
    generator picks one when it asks the question."""
    margin = POSITION_MARGIN * min(hw)
    centers = np.asarray([s["center"] for s in shapes], np.float64).reshape(-1, 2)
    out: dict[str, list[tuple[dict, int]]] = {t: [] for t in QUESTION_TYPES}

    for s in shapes:
        for d in _descriptions(s, shapes):
            out["attribute"].append((d, s["id"]))

    for color, kind, members in _groups(shapes):
        by_area = sorted(members, key=lambda s: s["area"])
        if by_area[-1]["area"] >= AREA_RATIO * by_area[-2]["area"]:
            out["size"].append(({"order": "largest", "color": color, "kind": kind}, by_area[-1]["id"]))
        if by_area[1]["area"] >= AREA_RATIO * by_area[0]["area"]:
            out["size"].append(({"order": "smallest", "color": color, "kind": kind}, by_area[0]["id"]))
        for side, (axis, sign) in _SIDES.items():
            a = 0 if axis == "x" else 1
            ranked = sorted(members, key=lambda s: sign * s["center"][a], reverse=True)
            if sign * (ranked[0]["center"][a] - ranked[1]["center"][a]) >= margin:
                out["extreme"].append(({"side": side, "color": color, "kind": kind}, ranked[0]["id"]))

    for color, _, members in _groups(shapes, by_kind=False):  # a kind has one corner count
        by_corners = sorted(members, key=lambda s: s["corners"])
        if by_corners[-1]["corners"] > by_corners[-2]["corners"]:
            out["corners"].append(({"order": "most", "color": color}, by_corners[-1]["id"]))
        if by_corners[0]["corners"] < by_corners[1]["corners"]:
            out["corners"].append(({"order": "fewest", "color": color}, by_corners[0]["id"]))

    for s in shapes:
        anchors = _descriptions(s, shapes)
        if not anchors:
            continue
        others = [t for t in shapes if t["id"] != s["id"]]
        offsets = centers[[t["id"] for t in others]] - centers[s["id"]]
        dist = np.hypot(offsets[:, 0], offsets[:, 1])
        order = np.argsort(dist)
        if len(others) == 1 or dist[order[1]] >= DISTANCE_RATIO * dist[order[0]]:
            out["nearest"].append(({"anchor": anchors}, others[order[0]]["id"]))
        for direction, (axis, sign) in _DIRECTIONS.items():
            # How far inside the cone each shape is; shapes within ``margin`` of its
            # edge are ambiguous and may not compete with the answer.
            inside = sign * offsets[:, axis] - np.abs(offsets[:, 1 - axis])
            clear = np.flatnonzero(inside >= margin)
            if not len(clear):
                continue
            best = clear[np.argmin(dist[clear])]
            rivals = [j for j in range(len(others)) if j != best and inside[j] > -margin]
            if all(dist[j] >= DISTANCE_RATIO * dist[best] for j in rivals):
                out["relation"].append(({"direction": direction, "anchor": anchors}, others[best]["id"]))
        # "Same colour as the circle" must not name the colour, so the anchor is named by
        # its kind alone (and vice versa for "same shape as the red one").
        for attr, by in (("color", "kind"), ("kind", "color")):
            d = {"color": None, "kind": None, by: s[by]}
            twins = [t for t in others if t[attr] == s[attr]]
            if len(twins) == 1 and d in anchors:
                out["same"].append(({"attribute": attr, "anchor": [d]}, twins[0]["id"]))
    return out


def _absent_query(rng: np.random.Generator, shapes: list[dict], colors: list[str], kinds: list[str],
                  form: tuple[bool, bool] | None = None) -> dict | None:
    """A colour-and-kind (or colour-only) description that matches no shape, preferring
    near misses whose colour and kind both occur, just not together.

    ``form``: ``(names a colour, names a kind)`` of the lookup it stands in for (the
    ``lookups`` mode of :class:`SyntheticReasoningSet`'s ``absent_from``): only
    descriptions of that form, so "the blue square" is as often absent as present and a
    phrase's form says nothing about the answer. ``None``: colour-and-kind or colour-only."""
    present = {(s["color"], s["kind"]) for s in shapes}
    seen_c, seen_k = {s["color"] for s in shapes}, {s["kind"] for s in shapes}
    if form == (True, False):
        pool = [(c, None) for c in colors if c not in seen_c]
    elif form == (False, True):
        pool = [(None, k) for k in kinds if k not in seen_k]
    else:
        pairs = [(c, k) for c in colors for k in kinds if (c, k) not in present]
        near = [(c, k) for c, k in pairs if c in seen_c and k in seen_k]
        lone = [(c, None) for c in colors if c not in seen_c] if form is None else []
        pool = near if near and rng.random() < 0.5 else pairs + lone
    if not pool:
        return None
    c, k = pool[int(rng.integers(len(pool)))]
    return {"color": c, "kind": k}


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _realise(rng: np.random.Generator, qtype: str, q: dict) -> str:
    """The text of question ``q``, in one of its phrasings."""
    if qtype in ("attribute", "absent"):
        key = ("color", "kind") if q["color"] and q["kind"] else ("color",) if q["color"] else ("kind",)
        return _pick(rng, _ATTRIBUTE[key]).format(c=q["color"], k=q["kind"])
    g = _noun(q.get("color"), q.get("kind"), default=_pick(rng, ["shape", "object"]))
    if qtype == "size":
        return _pick(rng, _SIZE[q["order"]]).format(g=g)
    if qtype == "corners":
        return _pick(rng, _CORNER_Q[q["order"]]).format(g=g)
    if qtype == "extreme":
        return _pick(rng, _EXTREME[q["side"]]).format(g=g)
    a = _anchor_text(q["anchor"])
    if qtype == "relation":
        return _pick(rng, _RELATION[q["direction"]]).format(a=a)
    if qtype == "nearest":
        return _pick(rng, _NEAREST).format(a=a)
    return _pick(rng, _SAME[q["attribute"]]).format(a=a)


_EXTREME_WORDS = {"left": "leftmost", "right": "rightmost", "top": "topmost", "bottom": "bottommost"}


def _phrase(qtype: str, q: dict) -> str:
    """A noun phrase for what question ``q`` asks about ("the largest blue shape", "the
    shape directly above the red circle"): lets :mod:`lisa_kit.prompts` ask any question
    type as a bare noun phrase, an imperative or a "where is" question."""
    if qtype in ("attribute", "absent"):
        return "the " + _noun(q["color"], q["kind"])
    g = _noun(q.get("color"), q.get("kind"))
    if qtype == "size":
        return f"the {q['order']} {g}"
    if qtype == "corners":
        return f"the {g} with the {q['order']} corners"
    if qtype == "extreme":
        return f"the {_EXTREME_WORDS[q['side']]} {g}"
    a = _anchor_text(q["anchor"])
    if qtype == "relation":
        return f"the shape directly {_DIRECTION_WORDS[q['direction']]} {a}"
    if qtype == "nearest":
        return f"the shape closest to {a}"
    return f"the other shape with the same {'color' if q['attribute'] == 'color' else 'form'} as {a}"


def _explain(qtype: str, q: dict, s: dict | None, pixel_counts: bool = True, absent_name_first: bool = False) -> str:
    """One sentence saying why the answer is the answer (ReasonSeg's explanatory style):
    the answer's name, then :func:`_predicate` ("The blue square is the largest shape.").
    ``pixel_counts``: a size answer also states the winner's area in pixels (a number a
    model cannot read off the image, so at inference it is invented; off in lisa-demo-v2).
    ``absent_name_first``: an absent target is "The purple triangle is not in the image."
    (its name first, as a present one's) instead of "There is no purple triangle in the image."."""
    if qtype == "absent":
        noun = _noun(q["color"], q["kind"])
        return f"The {noun} is not in the image." if absent_name_first else f"There is no {noun} in the image."
    return f"{_name(s).capitalize()} {_predicate(qtype, q, s, pixel_counts)}"


def _predicate(qtype: str, q: dict, s: dict, pixel_counts: bool = True) -> str:
    """What the explanation says of the answer shape ``s``, after its name: "is the
    largest shape.", "has six corners, more than any other shape." (a whole clause, ending
    in a full stop, so "<name> [SEG] <predicate>" reads as one sentence)."""
    g = _noun(q.get("color"), q.get("kind"))
    if qtype == "attribute":
        return f"is the only {g} in the image."
    if qtype == "size":
        area = f", covering {s['area']} pixels" if pixel_counts else ""
        return f"is the {q['order']} {g}{area}."
    if qtype == "corners":
        n = _NUMBERS.get(s["corners"], str(s["corners"]))
        more = "more" if q["order"] == "most" else "fewer"
        return f"has {n} corner{'' if s['corners'] == 1 else 's'}, {more} than any other {g}."
    if qtype == "extreme":
        where = {"left": "further left", "right": "further right", "top": "higher up", "bottom": "lower down"}
        return f"is {where[q['side']]} than any other {g}."
    a = _anchor_text(q["anchor"])
    if qtype == "relation":
        return f"is the nearest shape {_DIRECTION_WORDS[q['direction']]} {a}."
    if qtype == "nearest":
        return f"is closer to {a} than any other shape."
    if q["attribute"] == "color":
        return f"is {s['color']}, the same color as {a}."
    return f"is a {s['kind']}, the same shape as {a}."


# --------------------------------------------------------------------------- reader


@register_dataset("synthetic")
class SyntheticReasoningSet(DatasetReader):
    """Coloured-shape reasoning segmentation; see the module docstring.

    With ``root=None``, or a ``root`` without ``synthetic/<split>/annotations.json``,
    records are generated on demand; otherwise that layout is read and the stored
    options replace the ones passed (``size`` may only shorten the stored split).
    Records are :class:`SyntheticRecord`; ``image_path`` of a generated one is the
    pseudo path ``synthetic/<split>/<i>.png`` and ``files(i)`` is ``[]``.

    Options: ``size`` (records; default :data:`DEFAULT_SIZES`), ``image_size`` ``(H, W)``
    (default 64x64: the tiny recipes' vision and mask encoders see 56-64 px, and shapes
    of 6-13 px radius keep their corners visible there), ``seed``,
    ``questions_per_image`` (up to that many distinct questions per scene; fewer only in
    rare crowded or tiny scenes), ``absent_ratio`` (chance that a question names
    something absent), ``absent_from`` (``questions``, the default: any question is
    replaced by an absent lookup with chance ``absent_ratio``; ``lookups``: only attribute
    lookups are, each by an absent one of its own form -- colour and kind, colour, or
    kind -- so a phrase's form does not give its answer away: with ``questions``, a
    "<colour> <kind>" phrase names something absent in most cases, and a model that
    cannot yet bind colours to kinds learns to reject them all), ``min_shapes`` /
    ``max_shapes`` (shapes per scene, 2-5 by default; scenes where fewer fit are
    resampled), ``colors`` / ``kinds`` / ``question_types`` (subsets of
    :data:`PALETTE`, :data:`CORNERS`, :data:`QUESTION_TYPES`), ``texture`` (background
    noise amplitude, ``0`` for a plain background) and ``pixel_counts`` (size
    explanations state the area in pixels; default true, as the shipped demo model was
    trained; ``false`` gives "The blue square is the largest shape."), ``absent_name_first``
    (an absent target's answer names it first, "The purple triangle is not in the image.",
    so a model reads the name before it decides between ``[SEG]`` and ``[REJ]``; default
    false: "There is no purple triangle in the image.").
    """

    name = "synthetic"
    splits = SPLITS
    default_split = "train"

    def __init__(self, root: str | Path | None = None, split: str | None = None, *, size: int | None = None,
                 image_size: tuple[int, int] | int = DEFAULT_IMAGE_SIZE, seed: int = 0,
                 questions_per_image: int = 3, absent_ratio: float = 0.0, min_shapes: int = 2,
                 max_shapes: int = 5, colors: list[str] | None = None, kinds: list[str] | None = None,
                 question_types: list[str] | None = None, texture: int = DEFAULT_TEXTURE,
                 pixel_counts: bool = True, absent_name_first: bool = False, absent_from: str = "questions"):
        super().__init__(root if root is not None else ".", split)
        self.root = Path(root) if root is not None else None
        self.split_dir = self.layout_dir(self.root, self.split) if self.root is not None else None
        if self.split_dir is not None and (self.split_dir / "annotations.json").is_file():
            self._load(size)
            return
        self._entries: list[dict] | None = None
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(int(v) for v in image_size)
        colors = list(colors) if colors is not None else list(PALETTE)
        kinds = list(kinds) if kinds is not None else list(CORNERS)
        qtypes = list(question_types) if question_types is not None else list(QUESTION_TYPES)
        problems = [f"unknown {what} {v!r} (known: {', '.join(known)})"
                    for what, vals, known in (("color", colors, PALETTE), ("kind", kinds, CORNERS),
                                              ("question type", qtypes, QUESTION_TYPES))
                    for v in vals if v not in known]
        if len(hw) != 2 or min(hw) < 24:
            problems.append(f"image_size must be (H, W) with both sides >= 24, got {image_size!r}")
        if not 2 <= min_shapes <= max_shapes <= 8:
            problems.append(f"need 2 <= min_shapes <= max_shapes <= 8, got {min_shapes}, {max_shapes}")
        if not 0.0 <= absent_ratio <= 1.0:
            problems.append(f"absent_ratio must be in [0, 1], got {absent_ratio}")
        if absent_from not in ABSENT_FROM:
            problems.append(f"absent_from must be one of {', '.join(ABSENT_FROM)}, got {absent_from!r}")
        if questions_per_image < 1 or not colors or not kinds or (not qtypes and absent_ratio < 1.0):
            problems.append("need questions_per_image >= 1 and at least one color, kind and question type")
        if not 0 <= texture <= 20:  # beyond 20 the background could reach palette colours
            problems.append(f"texture must be in [0, 20], got {texture}")
        for key, flag in (("pixel_counts", pixel_counts), ("absent_name_first", absent_name_first)):
            if not isinstance(flag, bool):
                problems.append(f"{key} must be true or false, got {flag!r}")
        if int(seed) < 0 or (size is not None and int(size) < 0):
            problems.append("seed and size must be non-negative")
        if problems:
            raise InputError("synthetic dataset: " + "; ".join(problems))
        self.options = {
            "seed": int(seed), "image_size": list(hw), "questions_per_image": int(questions_per_image),
            "absent_ratio": float(absent_ratio), "min_shapes": int(min_shapes), "max_shapes": int(max_shapes),
            "colors": colors, "kinds": kinds, "question_types": qtypes, "texture": int(texture),
            "pixel_counts": pixel_counts, "absent_name_first": absent_name_first, "absent_from": absent_from,
        }
        self.size = int(size) if size is not None else DEFAULT_SIZES[self.split]

    @staticmethod
    def layout_dir(root: str | Path, split: str) -> Path:
        """Where :meth:`write` puts ``split``: ``root/synthetic/<split>``."""
        return Path(root) / "synthetic" / split

    def __len__(self) -> int:
        return self.size

    def _index(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(f"record {i} out of range for {self.size} records")
        return i

    def files(self, i: int) -> list[Path]:
        """``[]`` for generated records; the image and label PNGs for materialised ones."""
        i = self._index(i)
        if self._entries is None:
            return []
        e = self._entries[i]
        return [self.split_dir / e["image"], self.split_dir / e["labels"]]

    def __getitem__(self, i: int) -> SyntheticRecord:
        i = self._index(i)
        if self._entries is not None:
            return self._read(i)
        return self.generate(i)

    # -- generation

    def generate(self, i: int) -> SyntheticRecord:
        """Record ``i`` from scratch: a pure function of ``(seed, split, i)`` and the options."""
        o = self.options
        hw = tuple(o["image_size"])
        rng = np.random.default_rng((o["seed"], SPLITS.index(self.split), i))
        k = o["questions_per_image"]
        # Resample the scene when too few shapes fit or it supports too few distinct
        # questions (e.g. two equal shapes far apart); after a few tries keep the last.
        for _attempt in range(8):
            image, labels, shapes, background = _scene(rng, hw, (o["min_shapes"], o["max_shapes"]),
                                                       o["colors"], o["kinds"], o["texture"])
            cands = _candidates(shapes, hw) if len(shapes) >= 2 else {}
            pools = {t: list(cands[t]) for t in o["question_types"] if cands.get(t)}
            if len(shapes) >= o["min_shapes"] and (sum(map(len, pools.values())) >= k or o["absent_ratio"] >= 1.0):
                break
        targets: list[Target] = []
        asked: list[dict] = []  # absent questions already asked, not to repeat them
        lookups = o.get("absent_from", "questions") == "lookups"
        for _ in range(k):
            if not lookups and rng.random() < o["absent_ratio"]:
                q, qtype, answer = _absent_query(rng, shapes, o["colors"], o["kinds"]), "absent", None
                if q is None or q in asked:
                    continue
                asked.append(q)
            elif pools:
                # Type first, then a question of that type: keeps the types balanced
                # although some (attribute lookups) have many more candidates.
                qtype = sorted(pools)[int(rng.integers(len(pools)))]
                q, answer = pools[qtype].pop(int(rng.integers(len(pools[qtype]))))
                if not pools[qtype]:
                    del pools[qtype]
                if "anchor" in q:  # one of the anchor's unique descriptions, for variety
                    q = {**q, "anchor": q["anchor"][int(rng.integers(len(q["anchor"])))]}
                if lookups and qtype == "attribute" and rng.random() < o["absent_ratio"]:
                    # the same form of lookup, naming something absent (kept present when
                    # the scene leaves no such description, or it was asked already)
                    neg = _absent_query(rng, shapes, o["colors"], o["kinds"], (bool(q["color"]), bool(q["kind"])))
                    if neg is not None and neg not in asked:
                        asked.append(neg)
                        q, qtype, answer = neg, "absent", None
            else:
                break
            mask = (labels == answer + 1).astype(np.uint8) if answer is not None else np.zeros(hw, np.uint8)
            targets.append(Target(
                text=_realise(rng, qtype, q), mask=mask,
                kind="phrase" if qtype in ("attribute", "absent") else "sentence",
                meta={"type": qtype, "query": q, "answer": answer, "absent": answer is None,
                      "explanation": _explain(qtype, q, shapes[answer] if answer is not None else None,
                                              o["pixel_counts"], o.get("absent_name_first", False)),
                      "phrase": _phrase(qtype, q),
                      "name": _name(shapes[answer]) if answer is not None else None,
                      "predicate": (_predicate(qtype, q, shapes[answer], o["pixel_counts"])
                                    if answer is not None else None)}))
        return SyntheticRecord(
            source=self.name, key=f"{self.split}/{i:06d}", image_path=Path(f"synthetic/{self.split}/{i:06d}.png"),
            targets=targets, explanation=targets[0].meta["explanation"] if targets else None,
            meta={"seed": o["seed"], "split": self.split, "index": i, "image_size": list(hw),
                  "background": background, "shapes": shapes},
            labels=labels, pixels=image)

    # -- materialised layout

    def write(self, root: str | Path) -> Path:
        """Materialise this split under ``root/synthetic/<split>/``: ``images/<i>.png``
        (lossless RGB), ``labels/<i>.png`` (the label map) and ``annotations.json``
        (options, shapes, questions). Returns the split directory."""
        out = self.layout_dir(root, self.split)
        (out / "images").mkdir(parents=True, exist_ok=True)
        (out / "labels").mkdir(parents=True, exist_ok=True)
        entries = []
        for i in range(len(self)):
            rec = self[i]
            name = f"{i:06d}.png"
            Image.fromarray(rec.image()).save(out / "images" / name)
            Image.fromarray(rec.labels).save(out / "labels" / name)
            entries.append({"key": rec.key, "image": f"images/{name}", "labels": f"labels/{name}",
                            "explanation": rec.explanation, "meta": rec.meta,
                            "targets": [{"text": t.text, "kind": t.kind, "meta": t.meta} for t in rec.targets]})
        doc = {"version": LAYOUT_VERSION, "dataset": self.name, "split": self.split, "options": self.options,
               "records": entries}
        (out / "annotations.json").write_text(json.dumps(doc))
        return out

    def _load(self, size: int | None) -> None:
        path = self.split_dir / "annotations.json"
        try:
            doc = json.loads(path.read_text())
            self.options = doc["options"]
            self._entries = doc["records"]
            if doc.get("version") != LAYOUT_VERSION or not isinstance(self._entries, list):
                raise DataError(f"unsupported layout version {doc.get('version')!r}", path=path, field="version")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"unreadable synthetic annotations: {e}", path=path) from e
        self.size = len(self._entries)
        if size is not None:
            if size > self.size:
                raise DataError(f"asked for {size} records but only {self.size} are stored", path=path,
                                field="records")
            self.size = int(size)

    def _read(self, i: int) -> SyntheticRecord:
        e = self._entries[i]
        image_path, labels_path = self.files(i)
        try:
            with Image.open(labels_path) as im:
                labels = np.array(im)
        except (OSError, UnidentifiedImageError) as err:
            raise DataError(f"cannot read label map: {err}", path=labels_path) from err
        hw = tuple(e["meta"]["image_size"])
        if labels.shape != hw:
            raise DataError(f"label map is {labels.shape}, expected {hw}", path=labels_path)
        targets = []
        for t in e["targets"]:
            a = t["meta"]["answer"]
            mask = (labels == a + 1).astype(np.uint8) if a is not None else np.zeros(hw, np.uint8)
            targets.append(Target(text=t["text"], mask=mask, kind=t["kind"], meta=t["meta"]))
        return SyntheticRecord(source=self.name, key=e["key"], image_path=image_path, targets=targets,
                               explanation=e["explanation"], meta=e["meta"], labels=labels)
