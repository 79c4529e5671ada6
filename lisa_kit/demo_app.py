"""The web demo (LISA's gradio ``app.py``): an image and a question in, the answer and
its masks out, in a browser.

```python
from lisa_kit.api import Segmenter
from lisa_kit.demo_app import build_demo, launch

demo = build_demo(Segmenter.from_recipe("lisa-tiny"))
launch(demo)                      # http://127.0.0.1:7860, until Ctrl-C
```

* :func:`answer` is the whole computation without gradio: ``Segmenter.seg`` then the
  annotated overlay (:func:`lisa_kit.visualize.annotate`: outlined masks in colours
  chosen against the image, the answer as caption, a legend keyed to each ``[SEG]``)
  and one 0/255 picture per mask.
* :func:`describe_model` says, from the model's recipe, what it knows (its name, never
  a server path; the data it was trained on); :func:`examples_for` picks example
  questions that fit it.
* :func:`build_demo` lays it out: the description on top; image + question + Submit on
  the left; the overlay, the masks and the answer on the right; the examples below
  (shown whole: gradio's example table would cut long questions off). A request that
  cannot be served (no image, an undecodable file, an empty or over-long question)
  becomes a gradio error message in the page; the app keeps serving.
* :func:`launch` serves it: loopback only unless a host is named, no analytics and no
  share link unless asked.

gradio is an optional dependency (``pip install "lisa-kit[demo]"``); it is imported only
when a demo is built.
"""
from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lisa_kit.errors import InputError, LisaKitError

if TYPE_CHECKING:  # numpy is imported when answering, to keep `lisa-kit --help` fast
    import numpy as np

__all__ = ["build_demo", "launch", "answer", "answer_picture", "load_examples", "examples_for", "describe_model",
           "require_gradio", "EXAMPLES_DIR", "DEFAULT_HOST", "DEFAULT_PORT"]

#: The shipped example images and ``examples.json`` (made by ``scripts/make_examples.py``).
EXAMPLES_DIR = Path(__file__).resolve().parent / "assets" / "examples"
DEFAULT_HOST = "127.0.0.1"  # loopback: the demo runs arbitrary uploads through a model
DEFAULT_PORT = 7860  # gradio's usual port
INSTALL_HINT = 'pip install "lisa-kit[demo]"'
TITLE = "lisa-kit: reasoning segmentation"
EXAMPLES_FILE = "examples.json"  # next to a model: example questions that fit it
GENERIC_PLACEHOLDER = "Which object ...? Please output segmentation mask."


def require_gradio():
    """Import gradio with its usage analytics off (unless the user set
    ``GRADIO_ANALYTICS_ENABLED`` himself); :class:`InputError` naming the extra when it
    is not installed."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError as e:
        raise InputError(f"the web demo needs gradio, which is not installed: {INSTALL_HINT}") from e
    return gradio


def load_examples(directory: str | os.PathLike = EXAMPLES_DIR) -> list[list[str]]:
    """``[[image path, question], ...]`` from ``directory/examples.json`` (a list of
    ``{"image": file name, "question": text}``); ``[]`` when there is none."""
    d = Path(directory)
    path = d / EXAMPLES_FILE
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text())
        return [[str(d / e["image"]), str(e["question"])] for e in entries]
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise InputError(f"unreadable demo examples {path.name} of {d.name}: {e}") from e


def _recipe(segmenter) -> dict:
    return getattr(segmenter.model, "recipe", None) or {}


def _geometry(segmenter):
    """The model's :class:`~lisa_kit.geometry_answers.TextGeometry` (``prompt_strategy:
    text_geometry``: box/point answers as text), ``None`` for a ``[SEG]`` model."""
    return getattr(segmenter.model, "text_geometry", None)


def _mask_label(segmenter) -> str:
    """What one mask of an answer is called on the page: a ``[SEG]`` token, or an object
    of a text box/point answer."""
    return "object" if _geometry(segmenter) is not None else "[SEG]"


def _page_label(segmenter) -> str:
    label = _mask_label(segmenter)
    return f"`{label}`" if label.startswith("[") else label


def _trained_on(recipe: dict) -> list[str]:
    """Dataset names of the recipe's training sources (``data.sources.*.datasets``)."""
    sources = (recipe.get("data") or {}).get("sources") or {}
    names: list[str] = []
    for src in sources.values():
        for name in (src or {}).get("datasets") or []:
            if name not in names:
                names.append(str(name))
    return names


def examples_for(segmenter) -> list[list[str]]:
    """Example ``[[image path, question], ...]`` that fit the model: the
    ``examples.json`` next to a checkpoint directory when it has one, else the shipped
    synthetic-shape examples (:data:`EXAMPLES_DIR`), which are what the shipped demo
    model knows and plain questions any LISA model can answer."""
    source = Path(segmenter.source) if getattr(segmenter, "source", None) else None
    if source is not None and (source / EXAMPLES_FILE).is_file():
        return load_examples(source)
    return load_examples()


def describe_model(segmenter) -> str:
    """Markdown: which model answers and what it knows, from its recipe: the recipe's
    name and description, and for a model trained on the synthetic shapes set, that
    world (colours, kinds, question types). Never a filesystem path: a checkpoint is
    named by its recipe name."""
    recipe = _recipe(segmenter)
    name = str(recipe.get("name") or "unnamed model")
    lines = [f"**Model:** `{name}`" + (f" — {recipe['description']}" if recipe.get("description") else "")
             + f" (on `{segmenter.device}`, {segmenter.precision})."]
    geometry = _geometry(segmenter)
    if geometry is not None:
        lines.append(f"It answers with where the objects are, as text: a box and points per object in the "
                     f"{geometry.format.name} format ({geometry.format.description}); each box becomes a "
                     "prompt of the mask decoder, so each object in the answer is a mask.")
    data = _trained_on(recipe)
    if data == ["synthetic"]:
        from lisa_kit.datasets.synthetic import CORNERS, PALETTE, QUESTION_TYPES

        lines.append(f"It was trained only on the synthetic shapes set: {', '.join(CORNERS)} in "
                     f"{', '.join(PALETTE)} on a grey background, with questions by {', '.join(QUESTION_TYPES)} "
                     "(e.g. the largest shape, the one with the most corners, the leftmost red one). "
                     "It knows nothing else: ask about pictures like the examples below.")
    elif data:
        lines.append(f"Trained on: {', '.join(data)}.")
    else:
        lines.append("A LISA-style reasoning-segmentation model: describe in plain words what you want "
                     "segmented (an object, or a question whose answer is one).")
    return "\n\n".join(lines)


def answer_picture(segmenter, image, question: str):
    """:func:`answer`, with the :class:`lisa_kit.visualize.Picture` (pixels and the
    layout drawn: image box, caption, legend entries) in place of its pixels."""
    import numpy as np

    from lisa_kit.images import load_image
    from lisa_kit.visualize import annotate_result

    if image is None:
        raise InputError("no image: upload one (or pick an example) first")
    if not isinstance(question, str) or not question.strip():
        raise InputError("the question is empty: type one first")
    # Read once, within the segmenter's limits: the overlay is drawn on what the model saw.
    rgb = load_image(image, getattr(segmenter, "image_limits", None))
    res = segmenter.seg(rgb, question)
    label = _mask_label(segmenter)
    masks = [(m.astype(np.uint8) * 255, f"{label} {k}: score {s:.2f}, {int(m.sum())} px")
             for k, (m, s) in enumerate(zip(res.masks, res.scores))]
    why = res.no_mask_reason()
    text = res.text if why is None else f"{res.text}\n({why})".strip()
    picture = annotate_result(rgb, res, caption=text)
    return picture, masks, text


def answer(segmenter, image, question: str) -> tuple[np.ndarray, list[tuple[np.ndarray, str]], str]:
    """Answer ``question`` about ``image`` (path, PIL image or RGB array).

    Returns the annotated overlay (:func:`lisa_kit.visualize.annotate`: RGB ``uint8``,
    the image enlarged when small, with the answer as caption and one legend entry per
    ``[SEG]`` in bands below it); the masks as ``(uint8 (H, W) 0/255, caption)`` pairs,
    one per ``[SEG]`` (per object of a ``text_geometry`` model's box answer), at the
    image's size; and the answer text, with the reason
    (:meth:`~lisa_kit.api.SegResult.no_mask_reason`) appended when the answer gives no
    mask. Raises :class:`~lisa_kit.errors.ImageError` / ``InputError`` for bad input."""
    picture, masks, text = answer_picture(segmenter, image, question)
    return picture.pixels, masks, text


def build_demo(segmenter, examples: Sequence[Sequence[str]] | None = None, *, title: str = TITLE):
    """The gradio app around ``segmenter`` (a :class:`lisa_kit.api.Segmenter`).

    ``examples``: ``[[image path, question], ...]`` shown under the inputs (default:
    :func:`examples_for` the model; ``[]`` for none); the first one's question is the
    question box's placeholder. Components carry ``elem_id`` ``lisa-image``,
    ``lisa-question``, ``lisa-submit``, ``lisa-overlay``, ``lisa-masks`` and
    ``lisa-answer`` for scripts and tests."""
    gr = require_gradio()
    if examples is None:
        examples = examples_for(segmenter)
    examples = [list(e) for e in examples]

    def on_submit(image, question):
        try:
            return answer(segmenter, image, question)
        except LisaKitError as e:  # the user's input: a message in the page, not a traceback in the log
            msg = str(e)
            where = getattr(e, "path", None)
            if where:  # an upload lives in gradio's cache: name the user's file, not the server's path
                msg = msg.replace(where, Path(where).name)
            raise gr.Error(msg, print_exception=False) from e

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {title}\nAsk about an image; each {_page_label(segmenter)} in the answer is a mask.\n\n"
                    + describe_model(segmenter), elem_id="lisa-about")
        with gr.Row():
            with gr.Column():
                # filepath + image_mode None: gradio hands over the uploaded file untouched,
                # so lisa_kit's own reader decodes it (EXIF, modes) and names what is wrong.
                image = gr.Image(label="Image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                 elem_id="lisa-image")
                question = gr.Textbox(label="Question", lines=2, elem_id="lisa-question",
                                      placeholder=examples[0][1] if examples else GENERIC_PLACEHOLDER)
                submit = gr.Button("Submit", variant="primary", elem_id="lisa-submit")
            with gr.Column():
                out_image = gr.Image(label="Masks over the image", format="png", interactive=False,
                                     elem_id="lisa-overlay")
                out_masks = gr.Gallery(label="Masks", format="png", columns=4, height="auto", elem_id="lisa-masks")
                out_text = gr.Textbox(label="Answer", interactive=False, lines=2, elem_id="lisa-answer")
        if examples:
            # A Dataset of (image, HTML) rather than gr.Examples: gradio's Textbox example
            # cell cuts text at 60 characters, which loses most of a question.
            shown = gr.Dataset(components=[gr.Image(visible=False), gr.HTML(visible=False)], label="Examples",
                               samples=[[img, html.escape(q)] for img, q in examples], type="index",
                               layout="table", headers=["Image", "Question"], samples_per_page=len(examples),
                               elem_id="lisa-examples")
            shown.click(lambda i: examples[i], inputs=shown, outputs=[image, question], api_name=False)
        gr.on([submit.click, question.submit], on_submit, inputs=[image, question],
              outputs=[out_image, out_masks, out_text], api_name="segment")
    return demo


def launch(demo, *, host: str = DEFAULT_HOST, port: int | None = DEFAULT_PORT, share: bool = False,
           block: bool = True, quiet: bool = False):
    """Serve ``demo`` on ``host:port`` (``port`` ``None``: gradio picks a free one from
    7860 on). ``block=False`` returns at once with the server running in a background
    thread (``demo.close()`` stops it). Returns gradio's ``(app, local_url, share_url)``."""
    # One request at a time: a Segmenter is one model on one device, not re-entrant.
    demo.queue(default_concurrency_limit=1)
    # run_history off: gradio would otherwise keep every request (uploaded images included)
    # in the browser's storage and offer to sync it to a Hugging Face bucket.
    return demo.launch(server_name=host, server_port=port, share=share, inbrowser=False, show_error=True,
                       prevent_thread_lock=not block, quiet=quiet, run_history=False)
