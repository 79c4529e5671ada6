"""The pictures people read (:mod:`lisa_kit.visualize`): one test per picture rule.

Scenes are painted with the synthetic set's own colours (:data:`lisa_kit.datasets.synthetic.PALETTE`)
on its grey, so every colour a shape can take is checked, not one example.
"""
from __future__ import annotations

import numpy as np
import pytest

from lisa_kit.datasets.synthetic import PALETTE as SHAPE_COLOURS
from lisa_kit.visualize import (
    DEFAULT_ALPHA,
    LEGEND_LINES,
    MAX_SIDE,
    MIN_SIDE,
    annotate,
    colour_distance,
    inner_boundary,
    overlay,
    pick_colours,
    span_labels,
)

GREY = (125, 125, 125)  # the synthetic set's background lies in 100..150
# A fill must move the pixels under it clearly: CIE76 distance of about 2.3 is "just
# noticeable"; 25 is an unmistakable change, and LISA's pure-red fill on a red shape moves
# it by 12.0 (measured with the code as it was, which failed this test).
VISIBLE = 25.0
DISTINCT = 25.0  # two masks' colours at least this far apart


def _scene(h=48, w=64, colour=(220, 30, 30), box=(10, 8, 40, 30)):
    """A grey image with one filled rectangle ``box`` = (x0, y0, x1, y1) and its mask."""
    img = np.full((h, w, 3), GREY, np.uint8)
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = colour
    mask = np.zeros((h, w), bool)
    mask[y0:y1, x0:x1] = True
    return img, mask


@pytest.mark.parametrize("name", list(SHAPE_COLOURS))
def test_fill_is_visible_on_every_shape_colour(name):
    img, mask = _scene(colour=SHAPE_COLOURS[name])
    (colour,) = pick_colours(img, mask[None])
    assert colour_distance(colour, SHAPE_COLOURS[name]) > VISIBLE  # never the target's own colour
    out = overlay(img, mask[None], outline=0)
    moved = colour_distance(out[mask], img[mask])
    assert moved.min() > VISIBLE, f"the fill on a {name} shape moves it by only {moved.min():.1f}"


def test_masks_get_distinct_colours():
    img, a = _scene(colour=SHAPE_COLOURS["blue"], box=(2, 2, 20, 20))
    b = np.zeros_like(a)
    b[30:44, 40:60] = True
    img[b] = SHAPE_COLOURS["blue"]  # the same object colour under both masks
    colours = pick_colours(img, np.stack([a, b]))
    assert colour_distance(colours[0], colours[1]) > DISTINCT


def test_outline_on_the_boundary_fill_inside_image_outside():
    img, mask = _scene(colour=SHAPE_COLOURS["red"])
    width = 2
    out = overlay(img, mask[None], outline=width)
    (colour,) = pick_colours(img, mask[None])
    edge = inner_boundary(mask, width)
    assert edge.sum() > 0 and (edge <= mask).all()
    assert (out[edge] == colour).all()  # the contour, opaque, in the mask's colour
    inside = mask & ~edge
    blend = np.round(img[inside] * (1 - DEFAULT_ALPHA) + np.array(colour) * DEFAULT_ALPHA)
    assert np.abs(out[inside].astype(int) - blend).max() <= 1  # the interior keeps the blend
    assert (out[~mask] == img[~mask]).all()  # the outline never spills outside the mask


def test_same_object_twice_shows_both_outlines():
    img, mask = _scene(colour=SHAPE_COLOURS["green"])
    out = overlay(img, np.stack([mask, mask]), outline=2)
    colours = pick_colours(img, np.stack([mask, mask]))
    for c in colours:  # neither outline hides the other
        assert (out[mask] == c).all(axis=-1).any()


def test_legend_has_one_entry_per_mask_with_its_colour_and_span():
    img, a = _scene(colour=SHAPE_COLOURS["red"], box=(2, 2, 20, 20))
    b = np.zeros_like(a)
    b[30:44, 40:60] = True
    empty = np.zeros_like(a)
    text = "Sure, [SEG], the blue square is [SEG] and nothing [SEG]."
    spans = [(i, i + 5) for i in range(len(text)) if text.startswith("[SEG]", i)]
    pic = annotate(img, np.stack([a, b, empty, empty]), text=text, seg_spans=spans + [(len(text), len(text))],
                   rejected=[False, False, False, True])
    assert len(pic.legend) == 4
    assert [e.label for e in pic.legend] == ["mask 0", "the blue square", "nothing: empty mask",
                                             "mask 3: rejected ([REJ]), no mask"]
    lo, hi = pic.legend_box[1], pic.legend_box[3]
    for entry, colour in zip(pic.legend[:2], pic.colours):
        x0, y0, x1, y1 = entry.swatch
        assert lo <= y0 < y1 <= hi  # drawn in the legend band
        assert (pic.pixels[y0 + 1:y1 - 1, x0 + 1:x1 - 1] == colour).all()  # read back: the mask's colour
    for entry in pic.legend[2:]:  # no pixels: a hollow swatch, not a colour
        x0, y0, x1, y1 = entry.swatch
        assert entry.colour is None and (pic.pixels[y0 + 2:y1 - 2, x0 + 2:x1 - 2] == 255).all()


def test_ignored_pixels_have_a_legend_entry():
    img, mask = _scene()
    m = mask.astype(np.uint8)
    m[:4] = 255
    pic = annotate(img, m[None], labels=["the red box"])
    assert [e.state for e in pic.legend] == ["mask", "ignored"]


def test_caption_and_title_in_bands_and_image_untouched_outside_masks():
    img, mask = _scene(h=37, w=53, colour=SHAPE_COLOURS["orange"])
    answer = "The orange box is the only shape here, so it is the answer. [SEG] ."
    pic = annotate(img, mask[None], text=answer, seg_spans=[(answer.index("[SEG]"), answer.index("[SEG]") + 5)],
                   title="Which shape is orange? Please output segmentation mask.")
    x0, y0, x1, y1 = pic.image_box
    s = pic.scale
    assert (y1 - y0, x1 - x0) == (37 * s, 53 * s) and min(37, 53) * s >= 256  # small images are enlarged
    big = np.repeat(np.repeat(img, s, axis=0), s, axis=1)
    big_mask = np.repeat(np.repeat(mask, s, axis=0), s, axis=1)
    region = pic.pixels[y0:y1, x0:x1]
    assert (region[~big_mask] == big[~big_mask]).all()  # no text over the image
    for band in (pic.title_box, pic.caption_box):
        assert band is not None
        bx0, by0, bx1, by1 = band
        assert by1 <= y0 or by0 >= y1  # beside the image, not on it
        ink = pic.pixels[by0:by1, bx0:bx1].min(axis=-1) < 100
        assert ink.sum() > 50  # text was drawn there
    assert pic.caption_box[1] >= y1 and pic.title_box[3] <= y0


def test_long_caption_wraps_inside_the_picture():
    img, mask = _scene()
    long = " ".join(["word"] * 200) + " [SEG]"
    pic = annotate(img, mask[None], text=long, seg_spans=[(len(long) - 5, len(long))])
    x0, y0, x1, y1 = pic.caption_box
    assert pic.pixels.shape[1] == pic.image_box[2]  # no wider than the image
    (entry,) = pic.legend
    line_h = (entry.text_box[3] - entry.text_box[1]) / LEGEND_LINES  # the legend label is cut to its lines
    assert entry.label.startswith("word word") and y1 - y0 > 5 * line_h  # the caption: many lines, all kept


def test_span_labels():
    text = "the red circle is [SEG] and the blue square is [SEG]."
    spans = [(i, i + 5) for i in range(len(text)) if text.startswith("[SEG]", i)]
    assert span_labels(text, spans) == ["the red circle", "the blue square"]
    assert span_labels("Sure, [SEG].", [(6, 11)]) == [None]  # LISA's fixed phrasing names nothing


def test_masks_of_the_wrong_size_are_refused():
    img, mask = _scene()
    with pytest.raises(ValueError, match="expected"):  # an InputError, which is a ValueError
        overlay(img, mask[None, :10])


@pytest.mark.parametrize("shape", [(1, 1, 3), (3, 2000, 3), (2000, 3), (40, 30, 4), (600, 900, 3)])
def test_any_image_shape_gets_a_readable_picture(shape):
    """Tiny, strip-like, grey, RGBA and large images: the image kept whole, the text beside it."""
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    mask = np.zeros(shape[:2], bool)
    mask[: max(1, shape[0] // 2), : max(1, shape[1] // 2)] = True
    pic = annotate(img, mask[None], text="It is the top left corner [SEG].", seg_spans=[(26, 31)])
    x0, y0, x1, y1 = pic.image_box
    assert (y1 - y0, x1 - x0) == (shape[0] * pic.scale, shape[1] * pic.scale)
    assert max(y1 - y0, x1 - x0) <= max(MAX_SIDE, *shape[:2])  # enlarged, within bounds
    assert pic.pixels.shape[1] >= MIN_SIDE and len(pic.legend) == 1
    rgb = img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=-1)
    region = pic.pixels[y0:y1:pic.scale, x0:x1:pic.scale]
    assert np.array_equal(region[~mask], rgb[..., :3][~mask])


def test_bad_images_raise_input_error():
    from lisa_kit.errors import InputError

    with pytest.raises(InputError, match="uint8"):
        annotate(np.zeros((4, 4, 3), np.float32), np.zeros((1, 4, 4), bool))
    with pytest.raises(InputError, match="not empty"):
        overlay(np.zeros((0, 4, 3), np.uint8), np.zeros((1, 0, 4), bool))
