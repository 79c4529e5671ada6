"""ReasonSeg (LISA's reasoning-segmentation benchmark) in its released layout.

Layout (``root`` is LISA's ``--dataset_dir``)::

    root/reason_seg/ReasonSeg/{train,val,test}/<name>.jpg
    root/reason_seg/ReasonSeg/{train,val,test}/<name>.json   # labelme-style annotation
    root/reason_seg/ReasonSeg/explanatory/train.json          # optional, train only

Each ``<name>.json`` holds ``text`` (a list of instructions; a bare string in some
files), ``is_sentence`` (long reasoning query vs. short phrase) and labelme ``shapes``
``[{label, points [[x, y], ...], shape_type, ...}]``. The reader yields one
:class:`~lisa_kit.datasets.base.Record` per image with one
:class:`~lisa_kit.datasets.base.Target` per text, all sharing the image's mask.

The mask is exactly LISA's ``get_mask_from_json`` (``utils/data_processing.py:9-60``,
LISA @ 3cb2d43), see :func:`mask_from_shapes`. What LISA's readers then do with it is
*not* done here, because it differs between training and evaluation and belongs to the
prompt builder / trainer:

* training (``utils/reason_seg_dataset.py:123-133``) samples up to 3 texts, does not
  strip them, lower-cases short phrases in the question template (``:153``) and trains
  on ``mask == 1`` only (the 255 "ignore" pixels become background);
* validation (``utils/dataset.py``, ``ValDataset.__getitem__``) uses only ``text[0]``,
  stripped, and scores with the 0/1/255 mask (255 not scored).

Hence every text is kept (``Target.text`` stripped, ``Target.meta["raw_text"]`` and
``Record.meta["texts"]`` as stored) and the mask keeps its 255 pixels.

Polygons are rasterised by :func:`polygon_pixels`, a numpy restatement of OpenCV 4.8's
``polylines`` + ``fillPoly`` (what LISA's masks were made with), not by the installed
``cv2``: OpenCV >= 4.11 fills polygon boundaries differently.

Deliberate differences from LISA, all where LISA would crash or silently misbehave:

* images are listed in sorted file-name order (LISA: ``glob.glob`` directory order);
* ``text`` given as a single string is one text (LISA would index its characters);
* a missing/malformed field raises :class:`~lisa_kit.errors.DataError` naming the file
  and field (LISA: ``KeyError``/``AttributeError`` or a cv2 assertion).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from lisa_kit.datasets.base import IGNORE_LABEL, DatasetReader, Record, Target, register_dataset
from lisa_kit.errors import DataError, ImageError

#: Label value of a target polygon (every label that is neither "flag" nor "*ignore*").
TARGET_VALUE = 1
#: EXIF orientations that transpose the image (90/270 degree rotations, with or
#: without mirroring): the decoded image then has height and width swapped.
_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
#: LISA casts points to int32; larger coordinates would wrap around.
_INT32_LIMIT = 2**31


def read_annotation_json(path: Path) -> tuple[Any, str]:
    """Parse a JSON file the way LISA does: UTF-8 first, and on *any* failure again as
    cp1252 (``data_processing.py:10-15``). Returns ``(data, encoding_used)``."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read annotation file: {e.strerror or e}", path=path) from e
    try:
        return json.loads(raw.decode("utf-8")), "utf-8"
    except (UnicodeDecodeError, json.JSONDecodeError) as first:
        try:
            return json.loads(raw.decode("cp1252")), "cp1252"
        except (UnicodeDecodeError, json.JSONDecodeError):
            # Report the UTF-8 failure: the cp1252 retry is only a fallback.
            if isinstance(first, json.JSONDecodeError):
                why = f"{first.msg} at line {first.lineno} column {first.colno}"
            else:
                why = f"not UTF-8 ({first.reason} at byte {first.start}) and not cp1252"
            raise DataError(f"corrupt JSON: {why}", path=path, field="<json>") from first


def _polygon(points: Any, path: Path, field: str) -> np.ndarray:
    """``points`` ``[[x, y], ...]`` -> ``int32 (N, 2)``, truncated toward zero like LISA's
    ``np.array(points, dtype=np.int32)`` (not rounded)."""
    try:
        pts = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"points must be a list of [x, y] numbers: {e}", path=path, field=field) from e
    if pts.ndim != 2 or pts.shape[0] == 0 or pts.shape[1] != 2:
        raise DataError(f"points must be a non-empty list of [x, y] pairs, got shape {pts.shape}",
                        path=path, field=field)
    if not (np.isfinite(pts).all() and (np.abs(pts) < _INT32_LIMIT).all()):
        raise DataError("points must be finite and fit in int32", path=path, field=field)
    return pts.astype(np.int32)  # float -> int32 truncates toward zero, as LISA's cast does


# --- Polygon rasterisation of OpenCV 4.8 --------------------------------------------------
# LISA paints each polygon with cv2.polylines(thickness 1) + cv2.fillPoly (LINE_8, shift 0).
# OpenCV >= 4.11 rounds fillPoly's edges differently (about half of all random polygons
# gain or lose boundary pixels), so calling whatever cv2 is installed would not give LISA's
# masks (its fixture was made with OpenCV 4.8; 4.9 and 4.10 draw the same). The functions
# below restate 4.8's integer arithmetic (imgproc/src/drawing.cpp: clipLine, LineIterator,
# CollectPolyEdges, FillEdgeCollection) with numpy, verified pixel-exact against
# OpenCV 4.8 on thousands of random polygons, in and partly outside the image.

_XY_SHIFT = 16  # fillPoly's edges are 16.16 fixed point
_HALF = 1 << (_XY_SHIFT - 1)


def _cdiv(a: int, b: int) -> int:
    """C integer division: truncates toward zero (Python's // floors)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def _inside(x: int, y: int, h: int, w: int) -> bool:
    return 0 <= x < w and 0 <= y < h


def _clip_segment(h: int, w: int, x1: int, y1: int, x2: int, y2: int) -> tuple[int, int, int, int, bool]:
    """OpenCV's ``clipLine`` (Cohen-Sutherland with truncating integer steps): the
    endpoints moved onto the image border and whether any part is inside. Like OpenCV,
    the endpoints may have moved even when the answer is "outside"."""
    right, bottom = w - 1, h - 1

    def code(x, y):
        return (x < 0) + (x > right) * 2 + (y < 0) * 4 + (y > bottom) * 8

    c1, c2 = code(x1, y1), code(x2, y2)
    if (c1 & c2) == 0 and (c1 | c2) != 0:
        if c1 & 12:  # first endpoint above or below: move it to the top/bottom row
            a = 0 if c1 < 8 else bottom
            x1 += _cdiv((a - y1) * (x2 - x1), y2 - y1)
            y1 = a
            c1 = (x1 < 0) + (x1 > right) * 2
        if c2 & 12:
            a = 0 if c2 < 8 else bottom
            x2 += _cdiv((a - y2) * (x2 - x1), y2 - y1)
            y2 = a
            c2 = (x2 < 0) + (x2 > right) * 2
        if (c1 & c2) == 0 and (c1 | c2) != 0:
            if c1:  # then left/right
                a = 0 if c1 == 1 else right
                y1 += _cdiv((a - x1) * (y2 - y1), x2 - x1)
                x1 = a
                c1 = 0
            if c2:
                a = 0 if c2 == 1 else right
                y2 += _cdiv((a - x2) * (y2 - y1), x2 - x1)
                x2 = a
                c2 = 0
    return x1, y1, x2, y2, (c1 | c2) == 0


def _segment_pixels(h: int, w: int, x1: int, y1: int, x2: int, y2: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the 8-connected 1-px line ``cv2.line`` draws (clipped to the
    image, traced left to right with Bresenham's error term)."""
    if not (_inside(x1, y1, h, w) and _inside(x2, y2, h, w)):
        x1, y1, x2, y2, visible = _clip_segment(h, w, x1, y1, x2, y2)
        if not visible:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if x2 < x1:
        x1, y1, x2, y2 = x2, y2, x1, y1
    dx, dy = x2 - x1, abs(y2 - y1)
    ystep = -1 if y2 < y1 else 1
    major, minor = max(dx, dy), min(dx, dy)
    k = np.arange(major + 1, dtype=np.int64)
    # Closed form of the error-term recursion: minor steps taken after k major steps.
    m = (2 * minor * k + major - 1) // (2 * major) if major else np.zeros_like(k)
    if dy > dx:
        return y1 + ystep * k, x1 + m
    return y1 + ystep * m, x1 + k


def polygon_pixels(polygon: np.ndarray, h: int, w: int) -> np.ndarray:
    """``bool (H, W)``: the pixels ``cv2.polylines(.., closed, thickness 1)`` plus
    ``cv2.fillPoly`` paint for an ``int32 (N, 2)`` polygon under OpenCV 4.8."""
    out = np.zeros((h, w), bool)
    pts = [(int(x), int(y)) for x, y in polygon]
    edges = []  # (first row, end row (exclusive), x at first row, x step per row), 16.16
    for (x0, y0), (x1, y1) in zip(pts[-1:] + pts[:-1], pts):
        rows, cols = _segment_pixels(h, w, x0, y0, x1, y1)
        out[rows, cols] = True  # fillPoly draws the outline too
        if y0 == y1:
            continue  # horizontal edges never bound a span
        if _inside(x0, y0, h, w) and _inside(x1, y1, h, w):
            cx0, cy0, cx1, cy1 = (x0 << _XY_SHIFT) + _HALF, y0, (x1 << _XY_SHIFT) + _HALF, y1
        else:  # 4.8 interpolates along the clipped segment, without the half-pixel offset
            cx0, cy0, cx1, cy1 = x0 << _XY_SHIFT, y0, x1 << _XY_SHIFT, y1
            tx0, ty0, tx1, ty1, _ = _clip_segment(h, w, x0, y0, x1, y1)
            if ty0 != ty1:
                cx0, cy0, cx1, cy1 = tx0 << _XY_SHIFT, ty0, tx1 << _XY_SHIFT, ty1
        step = _cdiv(cx1 - cx0, cy1 - cy0)
        if y0 < y1:
            edges.append((y0, y1, cx0 + (y0 - cy0) * step, step))
        else:
            edges.append((y1, y0, cx1 + (y1 - cy1) * step, step))
    if len(edges) < 2:
        return out
    e = np.array(edges, dtype=np.int64)
    x_ends = np.concatenate([e[:, 2], e[:, 2] + (e[:, 1] - e[:, 0]) * e[:, 3]])
    if e[:, 1].max() < 0 or e[:, 0].min() >= h or x_ends.max() < 0 or x_ends.min() >= (w << _XY_SHIFT):
        return out
    # Scanline fill: on row y the edges with y0 <= y < y1 cross at x0 + (y - y0) * step;
    # sorted crossings pair up into spans [floor(left), floor(right)].
    rows, xs = [], []
    for y0, y1, x, step in e:
        r = np.arange(max(y0, 0), min(y1, h), dtype=np.int64)
        rows.append(r)
        xs.append(x + (r - y0) * step)
    rows, xs = np.concatenate(rows), np.concatenate(xs)
    order = np.lexsort((xs, rows))
    rows, xs = rows[order], xs[order]
    span_rows, left, right = rows[0::2], xs[0::2] >> _XY_SHIFT, xs[1::2] >> _XY_SHIFT
    keep = (left < w) & (right >= 0)
    span_rows, left, right = span_rows[keep], np.maximum(left[keep], 0), np.minimum(right[keep], w - 1)
    # Paint all spans at once: +1 at each span start, -1 after its end, running sum > 0.
    marks = np.zeros((h, w + 1), np.int32)
    np.add.at(marks, (span_rows, left), 1)
    np.add.at(marks, (span_rows, right + 1), -1)
    out |= np.cumsum(marks, axis=1)[:, :w] > 0
    return out


def mask_from_shapes(shapes: Any, height: int, width: int, path: Path | str = "<shapes>") -> np.ndarray:
    """LISA's ``get_mask_from_json`` mask for labelme ``shapes`` -> ``uint8 (H, W)``.

    * shapes whose label is ``"flag"`` (any case) are dropped (``data_processing.py:29-30``);
    * labels containing ``"ignore"`` (any case) paint 255, every other label paints 1
      (``:52-55``);
    * polygons are painted largest first so smaller ones win where they overlap; the
      area is the pixel count of the outlined and filled polygon on its own
      (``:32-45``). Equal areas are ordered by ``np.argsort(areas)[::-1]`` exactly as
      LISA orders them (numpy's default sort; its tie order is platform dependent in LISA
      too);
    * ``shape_type`` is ignored: every shape is a polygon through its points (a labelme
      ``rectangle``, stored as two corners, becomes a line, as in LISA).
    """
    path = Path(path)
    if not isinstance(shapes, list):
        raise DataError(f"'shapes' must be a list, got {type(shapes).__name__}", path=path, field="shapes")
    painted: list[tuple[np.ndarray, int]] = []  # (pixels, value) per non-flag shape
    areas: list[np.uint64] = []
    for k, shape in enumerate(shapes):
        field = f"shapes[{k}]"
        if not isinstance(shape, dict):
            raise DataError("a shape must be an object", path=path, field=field)
        label = shape.get("label")
        if not isinstance(label, str):
            raise DataError(f"label must be a string, got {label!r}", path=path, field=f"{field}.label")
        if label.lower() == "flag":  # "meaningless deprecated annotations" in LISA
            continue
        polygon = _polygon(shape.get("points"), path, f"{field}.points")
        value = IGNORE_LABEL if "ignore" in label.lower() else TARGET_VALUE
        pixels = polygon_pixels(polygon, height, width)
        areas.append(np.uint64(pixels.sum()))  # LISA sorts uint8-mask sums: uint64
        painted.append((pixels, value))

    mask = np.zeros((height, width), np.uint8)
    for idx in np.argsort(np.asarray(areas, dtype=np.uint64))[::-1]:
        pixels, value = painted[idx]
        mask[pixels] = value
    return mask


def image_hw(path: Path) -> tuple[int, int]:
    """``(H, W)`` of the decoded image (EXIF rotation applied, as ``cv2.imread`` and
    :func:`lisa_kit.images.load_image` do) from the header only."""
    if not path.is_file():
        raise ImageError("image file not found", path=path)
    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"cannot decode image: {e}", path=path) from e
    return (w, h) if orientation in _TRANSPOSING_ORIENTATIONS else (h, w)


def _texts(anno: dict, path: Path) -> list[str]:
    texts = anno.get("text")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts:
        raise DataError(f"'text' must be a non-empty list of strings, got {texts!r}", path=path, field="text")
    for k, t in enumerate(texts):
        if not isinstance(t, str):
            raise DataError(f"a text must be a string, got {t!r}", path=path, field=f"text[{k}]")
    return texts


@register_dataset("reason_seg")
class ReasonSegReader(DatasetReader):
    """ReasonSeg ``train``/``val``/``test``: one record per image, one target per text.

    Options: ``dataset`` (the folder under ``reason_seg/``, LISA's ``ReasonSeg`` in
    ``--reason_seg_data ReasonSeg|train``) and ``explanatory`` (attach
    ``explanatory/train.json`` answers on the train split; LISA's ``--explanatory -1``
    is ``False``).
    """

    name = "reason_seg"
    splits = ("train", "val", "test")
    default_split = "train"

    def __init__(self, root: str | Path, split: str | None = None, *, dataset: str = "ReasonSeg",
                 explanatory: bool = True):
        super().__init__(root, split)
        self.split_dir = self.root / "reason_seg" / dataset / self.split
        if not self.split_dir.is_dir():
            raise DataError(f"ReasonSeg split directory not found (expected {dataset}/{self.split}/*.jpg)",
                            path=self.split_dir)
        # LISA globs "*.jpg" (case-sensitive) and pairs each image with the same-name .json.
        self.images = sorted(self.split_dir.glob("*.jpg"))
        self.explanation_file = self.root / "reason_seg" / dataset / "explanatory" / "train.json"
        self.explanations: dict[str, dict[str, str]] = {}
        if explanatory and self.split == "train" and self.explanation_file.is_file():
            self.explanations = self._read_explanations(self.explanation_file)

    @staticmethod
    def _read_explanations(path: Path) -> dict[str, dict[str, str]]:
        """``{image file name: {query, outputs}}``; later entries win, like LISA's dict
        (``reason_seg_dataset.py:85-90``)."""
        items, _ = read_annotation_json(path)
        if not isinstance(items, list):
            raise DataError("explanatory file must be a list of {image, query, outputs}", path=path,
                            field="<root>")
        out = {}
        for k, item in enumerate(items):
            for key in ("image", "query", "outputs"):
                if not isinstance(item, dict) or not isinstance(item.get(key), str):
                    raise DataError(f"entry needs a string {key!r}", path=path, field=f"[{k}].{key}")
            out[item["image"]] = {"query": item["query"], "outputs": item["outputs"]}
        return out

    def __len__(self) -> int:
        return len(self.images)

    def files(self, i: int) -> list[Path]:
        image = self.images[i]
        return [image, image.with_suffix(".json")]

    def __getitem__(self, i: int) -> Record:
        image_path, json_path = self.files(i)
        height, width = image_hw(image_path)
        if not json_path.is_file():
            raise DataError("annotation file not found for image", path=json_path)
        anno, encoding = read_annotation_json(json_path)
        if not isinstance(anno, dict):
            raise DataError("annotation must be a JSON object", path=json_path, field="<root>")
        texts = _texts(anno, json_path)
        if "is_sentence" not in anno:
            raise DataError("missing 'is_sentence'", path=json_path, field="is_sentence")
        is_sentence = anno["is_sentence"]
        # LISA only tests truthiness; accept 0/1 too but not strings ("false" is truthy).
        if not isinstance(is_sentence, (bool, int)):
            raise DataError(f"'is_sentence' must be a boolean, got {is_sentence!r}", path=json_path,
                            field="is_sentence")
        is_sentence = bool(is_sentence)
        if "shapes" not in anno:
            raise DataError("missing 'shapes'", path=json_path, field="shapes")
        mask = mask_from_shapes(anno["shapes"], height, width, json_path)

        kind = "sentence" if is_sentence else "phrase"
        targets = [Target(text=t.strip(), mask=mask.copy(), kind=kind, meta={"raw_text": t, "index": k})
                   for k, t in enumerate(texts)]
        explanation = self.explanations.get(image_path.name)  # LISA keys by file name
        meta = {"split": self.split, "is_sentence": is_sentence, "texts": list(texts),
                "text_was_string": isinstance(anno["text"], str), "json_path": str(json_path),
                "json_encoding": encoding}
        if explanation is not None:
            meta["explanation_query"] = explanation["query"]
        return Record(source=self.name, key=image_path.stem, image_path=image_path, targets=targets,
                      explanation=explanation["outputs"] if explanation else None, meta=meta)
