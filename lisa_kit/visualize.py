"""Pictures a person can read: masks over their image, outlined, with a legend and the answer.

Two levels:

* :func:`overlay` draws at the image's own size (what ``<stem>_overlay.png`` files hold):
  each mask filled with a blend of the image and the mask's colour, and outlined in
  that colour, opaque, on its inner boundary (so the outline never covers a pixel
  outside the mask). Ignored pixels (value 255) are blended with grey.
* :func:`annotate` (:func:`annotate_result` for a ``SegResult``) makes the picture for
  people (web demo, ``data check --export``, README figure): small images are enlarged
  (nearest neighbour, so pixels stay pixels), the overlay is drawn at that size, and
  text goes in white bands *around* the image, never over it: an optional title (the
  question) above, the caption (the answer) and a legend below. Each legend entry is a
  colour swatch and the part of the answer its ``[SEG]`` closes ("mask k" when that
  part says nothing, e.g. "Sure,"), or says the mask is empty or was rejected
  (``[REJ]``). :class:`Picture` reports the layout it drew, so callers and tests can
  find the image, the caption and each swatch.

Colours (:func:`pick_colours`): LISA's overlay paints every mask pure red, which
vanishes on a red object. Here each mask takes, from :data:`PALETTE`, the colour
that stays farthest (CIELAB distance) from the pixels under it once blended, from the
pixels around it, from the rest of the image and from the colours already given to
earlier masks.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

RGB = tuple[int, int, int]
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), in picture pixels

#: Candidate mask colours: saturated hues around the wheel plus a dark and a light one,
#: so any image region leaves some of them far away.
PALETTE: tuple[RGB, ...] = (
    (0, 230, 255), (255, 0, 200), (60, 255, 60), (255, 140, 0), (0, 70, 255), (255, 255, 0),
    (150, 0, 255), (255, 0, 40), (0, 160, 110), (255, 255, 255), (40, 0, 80), (130, 80, 0),
)
IGNORE_GREY: RGB = (128, 128, 128)
DEFAULT_ALPHA = 0.5  # LISA's vis_output blend: image * 0.5 + colour * 0.5
PIXEL_SAMPLE = 4096  # pixels of a region compared against each candidate colour (enough for a percentile)
NEAR_PERCENTILE = 10  # a colour's distance to a region: this percentile of per-pixel distances (robust to edges)
SCENE_PERCENTILE = 1  # ... and to the rest of the image: what covers 1 % of it counts as present
MIN_SIDE = 256  # annotate(): smaller images are enlarged by an integer factor to at least this side...
MAX_SIDE = 2048  # ...unless that makes the longer side longer than this
FONT_PER_WIDTH = 24  # annotate(): about this many font sizes fit across the picture...
FONT_RANGE = (12, 28)  # ...within these sizes (pixels)
BAND = (255, 255, 255)  # text bands
INK = (0, 0, 0)
MUTED = (90, 90, 90)  # text of empty / rejected legend entries
SWATCH_EDGE = 1  # px of ink around a legend swatch
LEGEND_LINES = 2  # a legend label longer than this is cut (the caption has the whole answer)
ELLIPSIS = "\u2026"

# sRGB (D65) -> CIE XYZ -> CIELAB (the standard definitions).
_SRGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                         [0.2126729, 0.7151522, 0.0721750],
                         [0.0193339, 0.1191920, 0.9503041]])
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])
_LAB_EPS, _LAB_KAPPA = 216 / 24389, 24389 / 27


def rgb_to_lab(rgb) -> np.ndarray:
    """RGB ``uint8``/float 0..255 ``(..., 3)`` -> CIELAB ``float (..., 3)`` (L 0..100)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = lin @ _SRGB_TO_XYZ.T / _WHITE_D65
    f = np.where(xyz > _LAB_EPS, np.cbrt(xyz), (_LAB_KAPPA * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def colour_distance(a, b) -> np.ndarray:
    """CIE76 distance (Euclidean in CIELAB) between RGB colours (broadcasting ``(..., 3)``)."""
    return np.linalg.norm(rgb_to_lab(a) - rgb_to_lab(b), axis=-1)


def _as_rgb(image) -> np.ndarray:
    """RGB ``uint8 (H, W, 3)`` from an RGB, grey ``(H, W)`` or RGBA ``uint8`` array;
    :class:`~lisa_kit.errors.InputError` for anything else."""
    from lisa_kit.errors import InputError

    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise InputError(f"the image must be uint8 (0..255), got {a.dtype}")
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[2] not in (3, 4) or 0 in a.shape[:2]:
        raise InputError(f"the image must be (H, W), (H, W, 3) or (H, W, 4) and not empty, got {a.shape}")
    return a[..., :3]


def _as_masks(masks, shape: tuple[int, int]) -> np.ndarray:
    """``(M, H, W)`` uint8 with values 0 / 1 / 255 (bool and 0/1/255 masks accepted)."""
    m = np.asarray(masks)
    if m.ndim == 2:
        m = m[None]
    if m.size == 0:
        return np.zeros((0, *shape), np.uint8)
    if m.ndim != 3 or m.shape[1:] != tuple(shape):
        from lisa_kit.errors import InputError

        raise InputError(f"masks have shape {m.shape}, expected (M, {shape[0]}, {shape[1]}) for the image")
    out = (m > 0).astype(np.uint8)
    out[m == 255] = 255
    return out


def _shift_and(m: np.ndarray) -> np.ndarray:
    """One step of binary erosion with the 4-neighbourhood (outside the image counts as inside)."""
    p = np.pad(m, 1, mode="edge")
    return m & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def inner_boundary(mask: np.ndarray, width: int) -> np.ndarray:
    """The mask's pixels within ``width`` steps of a pixel outside it: bool ``(H, W)``.
    The image border is not a boundary (a mask touching it stays open there)."""
    core = mask.astype(bool)
    for _ in range(max(0, width)):
        core = _shift_and(core)
    return mask.astype(bool) & ~core


def _ring(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels outside ``mask`` within ``width`` steps of it (its surroundings)."""
    return inner_boundary(~mask.astype(bool), width)


def _sample(pixels: np.ndarray) -> np.ndarray:
    if len(pixels) > PIXEL_SAMPLE:  # evenly spaced: deterministic
        pixels = pixels[np.linspace(0, len(pixels) - 1, PIXEL_SAMPLE).astype(int)]
    return pixels


def pick_colours(image: np.ndarray, masks, *, palette: Sequence[RGB] = PALETTE, ring: int = 2,
                 alpha: float = DEFAULT_ALPHA) -> list[RGB]:
    """One colour per mask, ``[(r, g, b), ...]``: for each mask in turn, the palette
    colour whose smallest CIELAB distance is largest among: each pixel under the mask to
    that pixel blended with the colour (``alpha``: how visible the fill is), the pixels
    within ``ring`` px around the mask to the colour (the outline against its
    surroundings), the rest of the image to the colour (so it does not look like another
    object there), and the colours already chosen. Over a set of pixels a low
    percentile counts (:data:`NEAR_PERCENTILE`, :data:`SCENE_PERCENTILE` for the rest of
    the image), so a few stray pixels do not decide. ``image`` RGB ``uint8 (H, W, 3)``
    (grey and RGBA are converted), ``masks`` ``(M, H, W)``."""
    image = _as_rgb(image)
    masks = _as_masks(masks, image.shape[:2])
    cand = np.asarray(palette, dtype=np.float64)
    cand_lab = rgb_to_lab(cand)
    chosen: list[RGB] = []
    for m in masks:
        fg = m == 1
        nearest = np.full(len(cand), np.inf)
        under = _sample(image[fg]).astype(np.float64)
        if len(under):  # how far the fill moves each pixel: the blend against the pixel itself
            blend = under[None] * (1 - alpha) + cand[:, None] * alpha
            d = np.linalg.norm(rgb_to_lab(blend) - rgb_to_lab(under)[None], axis=-1)
            nearest = np.minimum(nearest, np.percentile(d, NEAR_PERCENTILE, axis=1))
        around = _sample(image[_ring(fg, ring)]) if fg.any() else under
        if len(around):  # the opaque outline against the pixels next to it
            d = np.linalg.norm(cand_lab[:, None] - rgb_to_lab(around)[None], axis=-1)
            nearest = np.minimum(nearest, np.percentile(d, NEAR_PERCENTILE, axis=1))
        rest = _sample(image[m == 0])
        if len(rest):  # a colour already in the picture (>= SCENE_PERCENTILE % of it) would read as an object
            d = np.linalg.norm(cand_lab[:, None] - rgb_to_lab(rest)[None], axis=-1)
            nearest = np.minimum(nearest, np.percentile(d, SCENE_PERCENTILE, axis=1))
        if chosen:
            d = np.linalg.norm(cand_lab[:, None] - rgb_to_lab(np.asarray(chosen, float))[None], axis=-1)
            nearest = np.minimum(nearest, d.min(axis=1))
        if not np.isfinite(nearest).any():  # first mask and empty: the palette's order decides
            nearest = np.zeros(len(cand))
        chosen.append(tuple(int(v) for v in cand[int(np.argmax(nearest))]))
    return chosen


def overlay(image: np.ndarray, masks, alpha: float = DEFAULT_ALPHA, *, colours: Sequence[RGB] | None = None,
            outline: int | None = None) -> np.ndarray:
    """``image`` RGB ``uint8 (H, W, 3)``, ``masks`` ``(M, H, W)`` (bool, 0/1 or 0/1/255) ->
    RGB ``uint8 (H, W, 3)``: mask pixels blended ``image * (1 - alpha) + colour * alpha``,
    the mask's inner boundary (``outline`` px wide; default about 1 % of the shorter
    side, at least 1; 0 for none) in the colour itself, ignored pixels blended with
    grey. ``colours`` default to :func:`pick_colours`. Later masks are drawn over
    earlier ones (an earlier outline that a later one covers is drawn wider, so both
    show); pixels outside every mask are untouched."""
    image = _as_rgb(image)
    masks = _as_masks(masks, image.shape[:2])
    if colours is None:
        colours = pick_colours(image, masks, alpha=alpha)
    if len(colours) < len(masks):
        from lisa_kit.errors import InputError

        raise InputError(f"{len(masks)} masks but {len(colours)} colours")
    if outline is None:
        outline = max(1, round(min(image.shape[:2]) / 100))
    out = image.astype(np.float32).copy()
    for m, colour in zip(masks, colours):
        ignore, fg = m == 255, m == 1
        out[ignore] = out[ignore] * (1 - alpha) + np.float32(IGNORE_GREY) * alpha
        out[fg] = out[fg] * (1 - alpha) + np.asarray(colour, np.float32) * alpha
    if outline > 0:
        edges = [inner_boundary(m == 1, outline) for m in masks]
        for k, colour in enumerate(colours[:len(masks)]):
            # Where a later mask's outline runs over this one (the same object answered
            # twice), this one is drawn wider, so its colour shows inside the later one.
            covered = sum(1 for later in edges[k + 1:] if (later & edges[k]).any())
            out[inner_boundary(masks[k] == 1, outline * (1 + covered)) if covered else edges[k]] = colour
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


# -- legend labels from the answer -----------------------------------------------------
def _norm(s: str) -> str:
    return re.sub(r"[\s,.:;!?]+", " ", s).strip().lower()


def _filler_phrases() -> set[str]:
    """What LISA's fixed answers put before a marker ("Sure,", "It is", "and", ...): such
    a part names nothing, so its legend entry says "mask k"."""
    from lisa_kit.prompts import ANSWERS, MULTI_ANSWERS, REJ, REJECT_ANSWERS, SEG, _join

    marks = _join([SEG] * 3)
    texts = [*ANSWERS, *(a.replace(REJ, SEG) for a in REJECT_ANSWERS), *(a.format(marks=marks) for a in MULTI_ANSWERS)]
    return {_norm(part) for t in texts for part in t.split(SEG)}


def span_labels(text: str, seg_spans: Sequence[tuple[int, int]]) -> list[str | None]:
    """For each marker span ``(start, end)`` in ``text``: the answer text between the
    previous marker (or the start) and this one, stripped; ``None`` when it names
    nothing (empty, or one of LISA's fixed phrasings). A trailing "is"/"are" ("the red
    circle is [SEG]") is dropped."""
    fillers = _filler_phrases()
    labels: list[str | None] = []
    prev = 0
    for start, end in seg_spans:
        words = text[prev:start].strip(" \t\n,.;:").split()
        while words and _norm(words[0]) in fillers:  # "and" / "," between markers
            words.pop(0)
        part = re.sub(r"\s+(is|are)$", "", " ".join(words), flags=re.IGNORECASE).strip()
        labels.append(part if part and _norm(part) not in fillers else None)
        prev = end
    return labels


# -- the annotated picture -------------------------------------------------------------
@dataclass
class LegendEntry:
    """One legend line: ``colour`` ``None`` for an entry without swatch colour (empty
    or rejected masks get a hollow swatch); ``swatch`` and ``text_box`` are picture boxes."""
    label: str
    colour: RGB | None
    swatch: Box
    text_box: Box
    state: str = "mask"  # "mask" | "empty" | "rejected" | "ignored"


@dataclass
class Picture:
    """What :func:`annotate` drew. ``pixels`` RGB ``uint8 (H', W', 3)``; ``image_box``
    where the (``scale`` times enlarged) image lies; ``title_box`` / ``caption_box`` the
    text bands (``None`` when absent); ``colours`` the mask colours, in mask order."""
    pixels: np.ndarray
    image_box: Box
    scale: int
    colours: list[RGB]
    legend: list[LegendEntry] = field(default_factory=list)
    title_box: Box | None = None
    caption_box: Box | None = None
    legend_box: Box | None = None


def load_font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap of ``text`` to lines at most ``width`` px wide in ``font``
    (a word wider than the line is cut); newlines in ``text`` are kept."""
    lines: list[str] = []
    for para in text.splitlines() or [""]:
        line = ""
        for word in para.split():
            trial = f"{line} {word}" if line else word
            if font.getlength(trial) <= width:
                line = trial
                continue
            if line:
                lines.append(line)
            while font.getlength(word) > width and len(word) > 1:  # an over-long token: hard cut
                cut = max(1, int(len(word) * width / font.getlength(word)))
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def _clip(lines: list[str], font, width: int) -> list[str]:
    """At most :data:`LEGEND_LINES` lines, the last ending in an ellipsis when cut (the
    caption above holds the whole answer)."""
    if len(lines) <= LEGEND_LINES:
        return lines
    last = lines[LEGEND_LINES - 1]
    while last and font.getlength(last + ELLIPSIS) > width:
        last = last[:-1]
    return [*lines[:LEGEND_LINES - 1], last.rstrip() + ELLIPSIS]


def annotate(image: np.ndarray, masks, *, text: str | None = None, seg_spans: Sequence[tuple[int, int]] = (),
             labels: Sequence[str | None] | None = None, rejected: Sequence[bool] | None = None,
             title: str | None = None, caption: str | None = None, alpha: float = DEFAULT_ALPHA,
             min_side: int = MIN_SIDE) -> Picture:
    """The overlay with its words around it.

    ``image`` RGB ``uint8 (H, W, 3)``; ``masks`` ``(M, H, W)`` as for :func:`overlay`.
    ``text``: the answer, shown as the caption (``caption`` overrides); ``seg_spans`` its
    marker spans, one per mask, from which legend labels come (:func:`span_labels`);
    ``labels`` name the masks directly instead (e.g. ground-truth phrases). ``rejected``:
    per mask, whether the model answered ``[REJ]``. ``title``: a line above the image
    (the question). The image is enlarged by the integer factor that makes its shorter
    side at least ``min_side`` (the longer one at most :data:`MAX_SIDE`); the picture is
    as wide as the enlarged image, and at least ``min_side`` (the image centred)."""
    from PIL import Image, ImageDraw

    image = _as_rgb(image)
    h, w = image.shape[:2]
    masks = _as_masks(masks, (h, w))
    n = len(masks)
    # Enlarge small images, but never past MAX_SIDE on the longer side (a 1 x 2000 strip).
    scale = max(1, min(math.ceil(min_side / min(h, w)), MAX_SIDE // max(h, w)))
    big = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    big_masks = np.repeat(np.repeat(masks, scale, axis=1), scale, axis=2)
    colours = pick_colours(image, masks, alpha=alpha)
    W = max(w * scale, min_side)  # room for text beside a narrow image
    x_img = (W - w * scale) // 2
    size = int(np.clip(W // FONT_PER_WIDTH, *FONT_RANGE))
    font = load_font(size)
    line_h = size + size // 3
    pad = size // 2
    drawn = overlay(big, big_masks, alpha, colours=colours, outline=max(2, size // 6))

    if labels is None:
        labels = span_labels(text, seg_spans[:n]) if text is not None and len(seg_spans) >= n else [None] * n
    rejected = list(rejected or []) + [False] * n
    entries = []  # (label, colour, state)
    for k in range(n):
        name = labels[k] if k < len(labels) and labels[k] else f"mask {k}"
        if rejected[k]:
            entries.append((f"{name}: rejected ([REJ]), no mask", None, "rejected"))
        elif not (masks[k] == 1).any():
            entries.append((f"{name}: empty mask", None, "empty"))
        else:
            entries.append((name, colours[k], "mask"))
    if (masks == 255).any():
        entries.append(("ignored pixels (not scored)", IGNORE_GREY, "ignored"))

    text_w = W - 2 * pad
    swatch = size
    title_lines = wrap(title, font, text_w) if title else []
    cap = caption if caption is not None else text
    cap_lines = wrap(cap, font, text_w) if cap else []
    legend_lines = [_clip(wrap(label, font, text_w - swatch - pad), font, text_w - swatch - pad)
                    for label, _, _ in entries]

    def band(lines_count: int) -> int:
        return lines_count * line_h + 2 * pad if lines_count else 0

    title_h = band(len(title_lines))
    cap_h = band(len(cap_lines))
    legend_h = band(sum(len(ls) for ls in legend_lines))
    H = title_h + h * scale + cap_h + legend_h
    canvas = Image.new("RGB", (W, H), BAND)
    canvas.paste(Image.fromarray(drawn), (x_img, title_h))
    draw = ImageDraw.Draw(canvas)

    def put(lines, y, x=pad, fill=INK):
        for line in lines:
            draw.text((x, y), line, font=font, fill=fill)
            y += line_h
        return y

    pic = Picture(pixels=np.zeros(0), image_box=(x_img, title_h, x_img + w * scale, title_h + h * scale), scale=scale,
                  colours=colours)
    if title_lines:
        put(title_lines, pad)
        pic.title_box = (0, 0, W, title_h)
    y = title_h + h * scale
    if cap_lines:
        put(cap_lines, y + pad)
        pic.caption_box = (0, y, W, y + cap_h)
        y += cap_h
    if entries:
        pic.legend_box = (0, y, W, y + legend_h)
        y += pad
        for (label, colour, state), lines in zip(entries, legend_lines):
            sw = (pad, y + (line_h - swatch) // 2, pad + swatch, y + (line_h - swatch) // 2 + swatch)
            # Filled with the mask's colour and edged in ink (a white swatch on the white band
            # stays visible); hollow for a mask that has no pixels.
            draw.rectangle((sw[0], sw[1], sw[2] - 1, sw[3] - 1), fill=colour, outline=INK, width=SWATCH_EDGE)
            x = pad + swatch + pad
            y_end = put(lines, y, x=x, fill=INK if state in ("mask", "ignored") else MUTED)
            pic.legend.append(LegendEntry(label=label, colour=colour, swatch=sw, text_box=(x, y, W, y_end),
                                          state=state))
            y = y_end
    pic.pixels = np.asarray(canvas)
    return pic


def annotate_result(image: np.ndarray, result, *, title: str | None = None, caption: str | None = None,
                    **kwargs) -> Picture:
    """:func:`annotate` for a :class:`lisa_kit.api.SegResult` of ``image``: its masks,
    its answer as caption (``caption`` overrides), legend labels from its ``[SEG]``
    spans, rejected masks marked. ``title``: e.g. the question. A text box/point answer
    (``result.malformed`` set) has JSON objects as spans, not names: its legend says ``mask k``."""
    if getattr(result, "malformed", None):
        kwargs.setdefault("labels", [None] * len(result.malformed))
    return annotate(image, result.masks, text=result.text, seg_spans=result.seg_spans, rejected=result.rejected,
                    title=title, caption=caption, **kwargs)
