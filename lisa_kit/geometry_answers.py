"""Text box/point answers (Seg-Zero, VisionReasoner): the ``text_geometry`` prompt strategy.

Instead of a ``[SEG]`` token whose hidden state prompts the mask decoder, the LLM writes
where the objects are, as text, and that text becomes box/point prompts of the mask decoder
(:meth:`~lisa_kit.interfaces.MaskDecoder.decode_geometry`). No seg head is used.

Recipe::

    model:
      prompt_strategy: text_geometry          # default: seg_token (LISA's [SEG] embeddings)
      text_geometry:
        format: vision_reasoner               # an answer format registered here (FORMATS)
        frame: original                       # or `format` (the format's own resized frame), or [H, W]
        points: true                          # pass the answer's points to the decoder with its box
        think: false                          # training answers start with <think>name</think>
        max_objects: 16                       # objects read from one answer at most
        instruction: null                     # or "... {question} ...": every question asked inside it
      seg_head: {name: none}

**Formats.** Both built-in formats put a reasoning block and a JSON answer in tags,
``<think> ... </think> <answer> ... </answer>``; coordinates are pixels, ``x`` right and
``y`` down, boxes ``[x0, y0, x1, y1]``.

* ``seg_zero`` (Seg-Zero's released model): one object, ``{"bbox": [...], "points_1": [x, y],
  "points_2": [x, y]}`` (any key holding ``bbox`` is the box, keys holding ``points`` are the
  points in key order); a list of such objects is read as several objects.
* ``vision_reasoner`` (VisionReasoner, Seg-Zero's multi-object script): a list
  ``[{"bbox_2d": [...], "point_2d": [x, y]}, ...]``, one entry per object; a lone object
  (not in a list) is read as one.

Both systems show their Qwen2.5-VL the image resized (aspect ratio not kept) to 840 x 840
and read the coordinates in that frame, mapping ``x`` by ``W / 840`` and ``y`` by
``H / 840`` back to the image: that is their ``frame: format``. ``frame: original`` means
the model writes original-image pixels (what the synthetic recipes train); ``[H, W]``
names any other resized frame. The vision encoder must show the LLM the image the way the
frame says (a concern of the vision component, not of this module).

**Malformed answers never raise.** Each problem is a :class:`Problem` with a code from
:data:`PROBLEMS`: no ``<answer>`` block, JSON that does not parse, an answer that lists no
object, an object without a box, a value that is not a finite number (or a box without four
of them), a box with ``x1 < x0`` or ``y1 < y0``, coordinates outside the frame, and
coordinates outside the image that would fit the format's own resized frame (the recipe's
``frame`` is probably wrong). A whole-answer problem gives one empty mask; an object's
problem gives that object an empty mask; both are flagged per mask
(``Generated.malformed``, ``SegResult.malformed`` and ``SegResult.no_mask_reason()``).

**A plugin adds a format** with :func:`register_format` (an :class:`AnswerFormat` subclass
or instance) when its module is imported, e.g. from the plugin's ``lisa_kit_components``
hook module; recipes then name it in ``text_geometry.format`` and ``lisa-kit validate``
accepts it.

**Instruction.** Released reasoning models were trained with every question put inside an
instruction that asks for the thinking and the JSON answer. ``text_geometry.instruction``
(a string holding ``{question}`` once; only that field is replaced, so JSON braces in it
stay) wraps every user question the same way in training, evaluation, ``segment``,
``chat`` and the API (:meth:`TextGeometry.ask`); ``null`` asks questions as they are.
"""
from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lisa_kit.errors import RecipeError

#: Values of ``model.prompt_strategy``.
SEG_TOKEN, TEXT_GEOMETRY = "seg_token", "text_geometry"
PROMPT_STRATEGIES = (SEG_TOKEN, TEXT_GEOMETRY)
#: ``text_geometry.frame`` values that are not a size.
FRAME_ORIGINAL, FRAME_FORMAT = "original", "format"
#: Keys of ``model.text_geometry`` and their defaults.
DEFAULTS = {"format": "vision_reasoner", "frame": FRAME_ORIGINAL, "points": True, "think": False, "max_objects": 16,
            "instruction": None}
#: Where the user's question goes in ``text_geometry.instruction``.
QUESTION_FIELD = "{question}"
#: Longest answer text parsed, in characters: bounds the work of a runaway generation
#: (a longer ``<answer>`` block is reported as bad JSON, never parsed).
MAX_ANSWER_CHARS = 20_000

#: Problem codes (:class:`Problem`), whole answer first, then per object.
PROBLEMS = {
    "no_answer": "no <answer> ... </answer> block",
    "bad_json": "the answer block is not JSON",
    "no_objects": "the answer lists no object",
    "missing_box": "an object has no box",
    "not_numeric": "a box or point is not made of finite numbers",
    "inverted_box": "a box has x1 < x0 or y1 < y0",
    "outside_image": "coordinates lie outside the frame the model writes in",
    "resized_frame": "coordinates lie outside the image but fit the format's resized frame",
}
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


@dataclass(frozen=True)
class Problem:
    """Why an answer or one of its objects gives no mask: ``code`` from :data:`PROBLEMS`,
    ``message`` for a person."""

    code: str
    message: str


@dataclass
class GeometryObject:
    """One object of an answer. ``box`` ``(x0, y0, x1, y1)`` and ``points`` ``[(x, y), ...]``
    in original-image pixels (mapped from the model's frame); ``span``: ``(start, end)`` of
    the object's text in the answer; ``problem``: set when it cannot prompt the decoder
    (then ``box`` is ``None`` and ``points`` empty)."""

    box: tuple[float, float, float, float] | None
    points: list[tuple[float, float]] = field(default_factory=list)
    span: tuple[int, int] = (0, 0)
    problem: Problem | None = None


@dataclass
class ParsedAnswer:
    """A parsed answer: ``objects`` in answer order, or ``problem`` for the whole answer
    (then ``objects`` is empty); ``think``: the reasoning text, if any."""

    objects: list[GeometryObject]
    problem: Problem | None = None
    think: str | None = None

    def problems(self) -> list[Problem | None]:
        """One entry per mask this answer gives: the whole-answer problem alone, or each
        object's (``None`` for an object that decodes)."""
        return [self.problem] if self.problem is not None else [o.problem for o in self.objects]


# -- formats ------------------------------------------------------------------------
class AnswerFormat:
    """How one system writes boxes and points. Subclasses set ``name``, ``native_frame``
    (``(H, W)`` of the resized image the system's model sees, ``None`` if it writes
    original pixels) and implement :meth:`object` (one object's mapping -> raw object; or
    :meth:`objects` for another list structure) and :meth:`render` (objects -> JSON-able
    value). Tags and number checks are shared."""

    name: str = ""
    native_frame: tuple[int, int] | None = None
    description: str = ""

    def objects(self, data: Any) -> list[dict] | None:
        """The answer's JSON value -> a list of raw objects ``{"box": value | None,
        "points": [value, ...]}`` (values unchecked), or ``None`` when the value has no
        recognisable object structure. Default: a list is several objects, anything else
        one; each mapping is read by :meth:`object`, any other entry is an object without
        a box."""
        items = data if isinstance(data, list) else [data]
        return [self.object(item) if isinstance(item, dict) else {"box": None, "points": []} for item in items]

    def object(self, item: dict) -> dict:
        """One object's mapping -> ``{"box": value | None, "points": [value, ...]}`` (what
        :meth:`objects` reads each mapping with; a format overriding :meth:`objects` need
        not implement it)."""
        raise NotImplementedError

    def render(self, objects: list[tuple[list[int], list[list[int]]]]) -> Any:
        """``[(box [x0, y0, x1, y1], points [[x, y], ...]), ...]`` (the frame's integers) ->
        the JSON value this format writes inside ``<answer>``."""
        raise NotImplementedError


class SegZeroFormat(AnswerFormat):
    """Seg-Zero's one-object answer: ``{"bbox": [...], "points_1": [x, y], "points_2": [x, y]}``."""

    name = "seg_zero"
    native_frame = (840, 840)
    description = "Seg-Zero: {bbox, points_1, points_2}, one object (a list: several)"

    def object(self, item):
        box_key = next((k for k in item if isinstance(k, str) and "bbox" in k.lower()), None)
        point_keys = sorted(k for k in item if isinstance(k, str) and "points" in k.lower())
        return {"box": item.get(box_key) if box_key is not None else None, "points": [item[k] for k in point_keys]}

    def render(self, objects):
        items = []
        for box, points in objects:
            item = {"bbox": box}
            item.update({f"points_{k + 1}": p for k, p in enumerate(points)})
            items.append(item)
        return items[0] if len(items) == 1 else items


class VisionReasonerFormat(AnswerFormat):
    """VisionReasoner's answer: ``[{"bbox_2d": [...], "point_2d": [x, y]}, ...]``."""

    name = "vision_reasoner"
    native_frame = (840, 840)
    description = "VisionReasoner: [{bbox_2d, point_2d}, ...], several objects"

    def object(self, item):
        point = item.get("point_2d")
        return {"box": item.get("bbox_2d"), "points": [] if point is None else [point]}

    def render(self, objects):
        return [{"bbox_2d": box, **({"point_2d": points[0]} if points else {})} for box, points in objects]


#: Registered answer formats by name (:func:`register_format`).
FORMATS: dict[str, AnswerFormat] = {}


def register_format(fmt: AnswerFormat | type[AnswerFormat]) -> AnswerFormat:
    """Add an answer format (a class is instantiated); a built-in name cannot be taken over,
    and the same name twice must be the same class. Returns the registered instance."""
    inst = fmt() if isinstance(fmt, type) else fmt
    if not isinstance(inst, AnswerFormat) or not isinstance(inst.name, str) or not inst.name:
        raise RecipeError(f"an answer format is an AnswerFormat with a name, got {fmt!r}", key="model.text_geometry")
    old = FORMATS.get(inst.name)
    if old is not None and type(old) is not type(inst):
        raise RecipeError(f"answer format {inst.name!r} is already registered by {type(old).__name__}",
                          key="model.text_geometry.format")
    FORMATS[inst.name] = inst
    return inst


for _fmt in (SegZeroFormat, VisionReasonerFormat):
    register_format(_fmt)


# -- the recipe's choice -------------------------------------------------------------
@dataclass(frozen=True)
class TextGeometry:
    """``model.text_geometry``: the answer ``format``, the ``frame`` ``(H, W)`` the model
    writes coordinates in (``None``: original-image pixels), whether ``points`` prompt the
    decoder with the box, whether training answers ``think`` first, ``max_objects``."""

    format: AnswerFormat
    frame: tuple[int, int] | None = None
    points: bool = True
    think: bool = False
    max_objects: int = 16
    instruction: str | None = None

    @classmethod
    def from_config(cls, node, key: str = "model.text_geometry") -> TextGeometry:
        """A checked instance from the recipe node (``None``: all defaults). Every bad key
        or value is a :class:`~lisa_kit.errors.RecipeError` naming it."""
        node = {} if node is None else node
        if not isinstance(node, dict):
            raise RecipeError(f"must be a mapping ({', '.join(DEFAULTS)}), got {node!r}", key=key)
        unknown = sorted(set(node) - set(DEFAULTS))
        if unknown:
            raise RecipeError(f"unknown key; text_geometry takes {', '.join(DEFAULTS)}", key=f"{key}.{unknown[0]}")
        c = {**DEFAULTS, **{k: v for k, v in node.items() if v is not None}}
        fmt = FORMATS.get(c["format"]) if isinstance(c["format"], str) else None
        if fmt is None:
            raise RecipeError(f"unknown answer format {c['format']!r}; registered: {', '.join(sorted(FORMATS))}",
                              key=f"{key}.format")
        frame = c["frame"]
        if frame == FRAME_ORIGINAL:
            size = None
        elif frame == FRAME_FORMAT:
            if fmt.native_frame is None:
                raise RecipeError(f"format {fmt.name!r} has no resized frame of its own; use original or [H, W]",
                                  key=f"{key}.frame")
            size = tuple(fmt.native_frame)
        else:
            sides = [frame, frame] if isinstance(frame, int) else frame
            if not (isinstance(sides, (list, tuple)) and len(sides) == 2
                    and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sides)):
                raise RecipeError(f"must be {FRAME_ORIGINAL}, {FRAME_FORMAT}, a side length or [H, W] in pixels, "
                                  f"got {frame!r}", key=f"{key}.frame")
            size = (int(sides[0]), int(sides[1]))
        for flag in ("points", "think"):
            if not isinstance(c[flag], bool):
                raise RecipeError(f"must be true or false, got {c[flag]!r}", key=f"{key}.{flag}")
        most = c["max_objects"]
        if isinstance(most, bool) or not isinstance(most, int) or most < 1:
            raise RecipeError(f"must be an integer >= 1, got {most!r}", key=f"{key}.max_objects")
        ins = c["instruction"]
        if ins is not None and not (isinstance(ins, str) and ins.count(QUESTION_FIELD) == 1):
            raise RecipeError(f"must be text holding {QUESTION_FIELD} exactly once (where the question goes), or "
                              f"null, got {ins!r}", key=f"{key}.instruction")
        return cls(fmt, size, c["points"], c["think"], most, ins)

    def ask(self, question: str) -> str:
        """``question`` inside :attr:`instruction` (unchanged without one)."""
        return question if self.instruction is None else self.instruction.replace(QUESTION_FIELD, question)

    # -- frames ----------------------------------------------------------------
    def _frame(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return self.frame if self.frame is not None else (int(image_size[0]), int(image_size[1]))

    # -- reading ---------------------------------------------------------------
    def parse(self, text: str, image_size: tuple[int, int]) -> ParsedAnswer:
        """``text`` (the model's answer) about an image of ``image_size`` ``(H, W)`` ->
        objects in original pixels, each checked; never raises on any text."""
        think = _THINK.search(text)
        think_text = think.group(1).strip() if think else None
        m = _ANSWER.search(text)
        if m is None:
            return ParsedAnswer([], Problem("no_answer", "the answer has no <answer> ... </answer> block with the "
                                            "object's box"), think_text)
        body, start = m.group(1), m.start(1)
        data = _load_json(body)
        if data is _BAD:
            return ParsedAnswer([], Problem("bad_json", f"the <answer> block is not JSON: {_clip(body)}"), think_text)
        try:
            raw = self.format.objects(data)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):  # a plugin format reading naively
            raw = None
        if not isinstance(raw, list) or not raw:
            return ParsedAnswer([], Problem("no_objects", "the answer lists no object" if raw == [] or data == []
                                            else f"the answer's JSON is not {self.format.name}'s layout: "
                                                 f"{_clip(body)}"), think_text)
        raw = raw[:self.max_objects]
        spans = _object_spans(body, len(raw))
        objects = [self._check(r, (start + a, start + b), image_size, k) for k, (r, (a, b)) in enumerate(zip(raw, spans))]
        return ParsedAnswer(objects, None, think_text)

    def _check(self, raw: dict, span, image_size, k: int) -> GeometryObject:
        fh, fw = self._frame(image_size)
        h, w = int(image_size[0]), int(image_size[1])
        what = f"object {k}"
        if not isinstance(raw, dict) or raw.get("box") is None:
            return GeometryObject(None, [], span, Problem("missing_box", f"{what} has no box"))
        box = _numbers(raw["box"], 4)
        given = raw.get("points") or []
        given = list(given) if isinstance(given, (list, tuple)) else [given]
        points = [_numbers(p, 2) for p in given]
        if box is None or any(p is None for p in points):
            bad = raw["box"] if box is None else next(q for q, p in zip(given, points) if p is None)
            return GeometryObject(None, [], span, Problem(
                "not_numeric", f"{what}: {_clip(repr(bad))} is not " + ("a box of four finite numbers" if box is None
                                                                          else "a point of two finite numbers")))
        x0, y0, x1, y1 = box
        if x1 < x0 or y1 < y0:
            return GeometryObject(None, [], span, Problem(
                "inverted_box", f"{what}: box {_fmt(box)} has x1 < x0 or y1 < y0"))
        xs = [x0, x1, *(p[0] for p in points)]
        ys = [y0, y1, *(p[1] for p in points)]
        if min(xs) < 0 or min(ys) < 0 or max(xs) > fw or max(ys) > fh:
            native = self.format.native_frame
            if self.frame is None and native is not None and min(xs) >= 0 and min(ys) >= 0 and (
                    max(xs) <= native[1] and max(ys) <= native[0]):
                return GeometryObject(None, [], span, Problem(
                    "resized_frame", f"{what}: box {_fmt(box)} lies outside the {w}x{h} image but fits {self.format.name}'s "
                    f"{native[1]}x{native[0]} resized frame; the model may write in that frame "
                    "(recipe: model.text_geometry.frame: format)"))
            where = "image" if self.frame is None else f"{fw}x{fh} frame the model writes in"
            return GeometryObject(None, [], span, Problem(
                "outside_image", f"{what}: coordinates {_fmt(box)}{' and points' if points else ''} lie outside the "
                f"{f'{w}x{h} ' if self.frame is None else ''}{where}"))
        sx, sy = w / fw, h / fh
        return GeometryObject((x0 * sx, y0 * sy, x1 * sx, y1 * sy), [(x * sx, y * sy) for x, y in points], span)

    # -- writing (training targets) ----------------------------------------------
    def write(self, objects: list[tuple[Any, list]], image_size: tuple[int, int], think: str | None = None) -> str:
        """The answer text for ``objects``: ``[(box (x0, y0, x1, y1), points [(x, y), ...]), ...]``
        in original pixels (``[)`` boxes as :mod:`lisa_kit.datasets.synthetic` stores
        them, so ``x1 <= W``), written in this frame as integers; points are dropped when
        ``points`` is off. ``think``: the reasoning text (used when :attr:`think` is on)."""
        fh, fw = self._frame(image_size)
        sx, sy = fw / image_size[1], fh / image_size[0]
        rendered = []
        for box, points in objects:
            b = [_clamp(round(box[0] * sx), fw), _clamp(round(box[1] * sy), fh),
                 _clamp(round(box[2] * sx), fw), _clamp(round(box[3] * sy), fh)]
            pts = [[_clamp(round(x * sx), fw), _clamp(round(y * sy), fh)] for x, y in points] if self.points else []
            rendered.append((b, pts))
        body = json.dumps(self.format.render(rendered) if rendered else [], separators=(",", ":"))
        lead = f"<think>{think}</think>" if self.think and think else ""
        return f"{lead}<answer>{body}</answer>"

    def write_masks(self, masks: list[np.ndarray], image_size: tuple[int, int], think: str | None = None,
                    centers: list | None = None) -> str:
        """:meth:`write` for target masks ``(H, W)`` (nonzero = object, 255 = ignored): box =
        the mask's extent ``[x0, y0, x1 + 1, y1 + 1)``, point = ``centers[k]`` when given (the
        synthetic shape's centroid) else the object pixel nearest the mask's centroid (inside
        the object even for a concave one). An empty mask is left out (an absent target:
        the answer lists nothing)."""
        objects = []
        for k, mask in enumerate(masks):
            on = (np.asarray(mask) != 0) & (np.asarray(mask) != 255)
            ys, xs = np.nonzero(on)
            if len(xs) == 0:
                continue
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            if centers is not None and centers[k] is not None:
                point = (float(centers[k][0]), float(centers[k][1]))
            else:
                cx, cy = xs.mean(), ys.mean()
                i = int(np.argmin((xs - cx) ** 2 + (ys - cy) ** 2))
                point = (float(xs[i]), float(ys[i]))
            objects.append((box, [point]))
        return self.write(objects, image_size, think)


def text_geometry_of(model_cfg: dict) -> TextGeometry | None:
    """The :class:`TextGeometry` a recipe's ``model`` section asks for (``None`` for the
    default ``prompt_strategy: seg_token``); bad values raise :class:`RecipeError`."""
    strategy = model_cfg.get("prompt_strategy") or SEG_TOKEN
    if strategy not in PROMPT_STRATEGIES:
        raise RecipeError(f"must be one of {', '.join(PROMPT_STRATEGIES)}, got {strategy!r}",
                          key="model.prompt_strategy")
    node = model_cfg.get("text_geometry")
    if strategy == SEG_TOKEN:
        if node is not None:
            raise RecipeError("is read only with model.prompt_strategy: text_geometry", key="model.text_geometry")
        return None
    return TextGeometry.from_config(node)


# -- decoding ------------------------------------------------------------------------
def decode_answers(model, texts: list[str], images: list[int | None], mask_features: dict[str, torch.Tensor],
                   metas: list) -> list[dict]:
    """Masks for answers written in ``model.text_geometry``'s format.

    ``texts[b]``: row ``b``'s answer about image ``images[b]`` (``None``: a row without an
    image, which gets no masks); ``mask_features``: ``mask_decoder.encode_image`` of the
    batch's images (``I`` of them); ``metas[i]``: image ``i``'s sizes. The valid objects of
    all rows about one image with the same number of points ``K`` go to one
    ``decode_geometry`` call (prompts are independent, the decoder contract): boxes
    ``(M, 4)`` and points ``(M, K, 2)``, labels 1, in the decoder's input frame.

    Returns per row ``{"masks": (N, H, W) logits, "scores": (N,), "low_res": (n, 1, h', w')
    of the decoded objects, "malformed": [str | None] * N, "spans": [(start, end)] * n,
    "parsed": ParsedAnswer}``: one mask per object in answer order (``N`` objects), or one
    empty mask for an answer with a whole-answer problem; empty masks are
    ``REJECTED_LOGIT`` everywhere with score 0."""
    from lisa_kit.generation import REJECTED_LOGIT

    geo: TextGeometry = model.text_geometry
    dec = model.mask_decoder
    # A decoder that takes boxes only (SAM 3) gets the boxes; validate warns of the points.
    use_points = geo.points and getattr(dec, "accepts_points", True)
    device = next(iter(mask_features.values())).device if mask_features else torch.device("cpu")
    parsed = [geo.parse(t, metas[i].original_size) if i is not None else ParsedAnswer([], None)
              for t, i in zip(texts, images)]
    decoded: dict[tuple[int, int], tuple] = {}  # (row, object) -> (mask (H, W), score, low_res (1, h', w'))
    for img in sorted({i for i in images if i is not None}):
        todo = [(b, k, o) for b, (p, i) in enumerate(zip(parsed, images)) if i == img
                for k, o in enumerate(p.objects) if o.problem is None]
        # One call per number of points: padding an object's points to another's count would
        # add "not a point" tokens, and its mask would depend on what else the batch holds.
        groups: dict[int, list] = {}
        for item in todo:
            groups.setdefault(len(item[2].points) if use_points else 0, []).append(item)
        meta = metas[img]
        feats = {k: v[img:img + 1] for k, v in mask_features.items()}
        for n_points, group in sorted(groups.items()):
            boxes = meta.to_input(torch.tensor([o.box for _, _, o in group], dtype=torch.float32).view(-1, 2, 2))
            points = labels = None
            if n_points:
                points = meta.to_input(torch.tensor([o.points for _, _, o in group], dtype=torch.float32)).to(device)
                labels = torch.ones(len(group), n_points, dtype=torch.long, device=device)  # all foreground
            low, scores = dec.decode_geometry(feats, boxes.view(-1, 4).to(device), points, labels)
            masks = dec.postprocess(low, meta)
            for r, (b, k, _) in enumerate(group):
                decoded[(b, k)] = (masks[r], scores[r, 0], low[r])
    out = []
    for b, (p, img) in enumerate(zip(parsed, images)):
        h, w = metas[img].original_size if img is not None else (0, 0)
        problems = p.problems() if img is not None else []
        masks = torch.full((len(problems), h, w), REJECTED_LOGIT, device=device)
        scores = torch.zeros(len(problems), device=device)
        lows = []
        for k, prob in enumerate(problems):
            if prob is None:
                masks[k], scores[k] = decoded[(b, k)][0], decoded[(b, k)][1].float()
                lows.append(decoded[(b, k)][2])
        out.append({"masks": masks, "scores": scores,
                    "low_res": torch.stack(lows) if lows else torch.zeros(0, 1, 1, 1, device=device),
                    "malformed": [None if q is None else q.message for q in problems],
                    "spans": [o.span for o in p.objects], "parsed": p})
    return out


# -- helpers ---------------------------------------------------------------------------
_BAD = object()


def _load_json(body: str):
    """JSON, or a Python literal (Seg-Zero's prompt shows its example answer with single
    quotes, which a model may copy); ``_BAD`` when neither parses (or the text is too long)."""
    if len(body) > MAX_ANSWER_CHARS:
        return _BAD
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        pass
    try:
        return ast.literal_eval(body.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _BAD


def _numbers(value, n: int) -> list[float] | None:
    """``value`` as ``n`` finite numbers (ints or floats, not bools or strings), else ``None``."""
    if not isinstance(value, (list, tuple)) or len(value) != n:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    try:
        out = [float(v) for v in value]
    except OverflowError:  # an int too large for a float
        return None
    return out if all(math.isfinite(v) for v in out) else None


def _object_spans(body: str, n: int) -> list[tuple[int, int]]:
    """Character spans of the ``n`` objects in ``body``: its outermost ``{...}`` groups
    (quotes respected) when there are exactly ``n``, else the whole body for each."""
    spans, depth, quote, start, escaped = [], 0, None, 0, False
    for i, ch in enumerate(body):
        if quote is not None:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                spans.append((start, i + 1))
    return spans if len(spans) == n else [(0, len(body))] * n


def _clamp(v: int, hi: int) -> int:
    return min(max(int(v), 0), int(hi))


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _clip(text: str, n: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 3] + "..."


def generated_from_answers(model, new_tokens: list[list[int]], row_images: list[list[int]],
                           mask_features: dict[str, torch.Tensor], metas: list, steps: list[torch.Tensor]) -> list:
    """:func:`lisa_kit.generation.generate`'s results for a ``text_geometry`` model: each
    row's tokens decoded to text, parsed and decoded (:func:`decode_answers`) against the
    row's last image. ``steps``: the kept per-step logits ``(B, V)`` (may be empty)."""
    from lisa_kit.generation import Generated

    tok = model.tokenizer
    texts = [tok.decode([t for t in toks if t != tok.eos_id]) for toks in new_tokens]
    images = [imgs[-1] if imgs else None for imgs in row_images]
    answers = decode_answers(model, texts, images, mask_features, metas)
    out = []
    for b, (toks, text, a) in enumerate(zip(new_tokens, texts, answers)):
        out.append(Generated(
            token_ids=toks, text=text, seg_indices=[], masks=a["masks"], scores=a["scores"],
            seg_embeddings=a["masks"].new_zeros(0, model.mask_decoder.prompt_dim), low_res_masks=a["low_res"],
            step_logits=torch.stack([s[b] for s in steps]) if steps else None,
            finished=bool(toks and toks[-1] == tok.eos_id), rejected=[False] * len(a["malformed"]),
            malformed=a["malformed"], extra={"geometry": a["parsed"]}))
    return out


def teacher_answers(model, batch) -> list[dict]:
    """Teacher mode for a ``text_geometry`` model: one teacher-forced forward over ``batch``
    (rows whose answers are the ground-truth box/point answers), the greedy token at every
    supervised position (what the model predicts there given the true prefix), decoded to
    text, parsed and decoded as :func:`decode_answers` does. A measure of how well it writes
    the answer token by token; ``generate`` mode measures the answers it writes alone."""
    from lisa_kit.conversation import IGNORE

    out = model(batch)
    labels = out.fused.labels
    tok = model.tokenizer
    texts = []
    for b in range(labels.shape[0]):
        pos = (labels[b] != IGNORE).nonzero(as_tuple=True)[0]
        pos = pos[pos > 0]
        guess = out.logits[b, pos - 1].argmax(-1).tolist()  # logits at p-1 predict the token at p
        texts.append(tok.decode([t for t in guess if t != tok.eos_id]))
    images = [imgs[-1] if imgs else None for imgs in batch.row_images]
    return decode_answers(model, texts, images, model.encode_masks(batch.mask_pixels), batch.metas)


def geometry_turns(record, turns: list, geometry: TextGeometry) -> list:
    """Training turns with their mask answers rewritten as ``geometry``'s text: each turn
    that asks for masks (:meth:`~lisa_kit.prompts.Turn.mask_targets`) answers the boxes and
    points of those targets (absent ones, with empty masks, left out), thinking the target's
    name when :attr:`TextGeometry.think` is on; text-only turns stay. Questions are put in
    the :attr:`TextGeometry.instruction`. The new turns have no ``[SEG]``, so the sample
    has no mask targets."""
    from lisa_kit.prompts import Turn

    shapes = (record.meta or {}).get("shapes") or []
    out = []
    for t in turns:
        targets = t.mask_targets()
        if not targets:
            out.append(Turn(geometry.ask(t.question), t.answer, t.target, t.seg_targets))
            continue
        masks, centers, names = [], [], []
        for k in targets:
            tgt = record.targets[k]
            masks.append(tgt.mask)
            shape = tgt.meta.get("answer")  # the synthetic set: its shape's centroid
            centers.append(shapes[shape]["center"] if isinstance(shape, int) and 0 <= shape < len(shapes) else None)
            names.append(tgt.meta.get("name") or tgt.text)
        size = np.asarray(masks[0]).shape[:2]
        answer = geometry.write_masks(masks, size, think=", ".join(str(n) for n in names), centers=centers)
        out.append(Turn(geometry.ask(t.question), answer, t.target, seg_targets=[]))
    return out
