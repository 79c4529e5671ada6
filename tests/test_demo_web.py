"""The web demo (``lisa-kit demo``): CLI options, :func:`lisa_kit.demo_app.answer`, and
the real app driven end to end in headless Chromium.

The browser test serves the gradio app of ``lisa-tiny`` (random weights, CPU) on
127.0.0.1, with generation forced to answer ``[SEG]`` so a mask always comes back, and
drives Debian's ``/usr/bin/chromium`` through playwright (no browser download; ``.ci/run``
installs the package). It checks that nothing leaves the machine: the page's requests
outside the server are blocked and recorded, and so are the Python side's connections
to any non-loopback address. Skipped, with the reason, when gradio, playwright or the
browser is missing.
"""
from __future__ import annotations

import copy
import ipaddress
import json
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lisa_kit import api
from lisa_kit.cli import build_parser, main
from lisa_kit.demo_app import (DEFAULT_HOST, answer, answer_picture, build_demo, describe_model,
                               examples_for, load_examples)
from lisa_kit.errors import ImageError, InputError
from lisa_kit.testing import force_generation, synthetic_image

# gradio's queue calls pandas options that pandas 3 deprecates (not ours to fix).
pytestmark = pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting':Warning",
                                        "ignore:The copy keyword is deprecated:Warning")

CHROMIUM = Path("/usr/bin/chromium")
# Headless, and none of Chromium's own background traffic (updates, sync, field trials).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 30_000  # per browser wait; a CPU answer of lisa-tiny takes well under a second
QUESTION = "Segment the red square. Please output segmentation mask."


# -- the command line (no gradio needed) ------------------------------------------------
def test_demo_help_and_defaults(capsys):
    assert main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--host" in out and "127.0.0.1" in out and "lisa-kit[demo]" in out
    args = build_parser().parse_args(["demo"])
    assert DEFAULT_HOST == "127.0.0.1"
    assert (args.host, args.port, args.share, args.device) == ("127.0.0.1", 7860, False, "auto")
    assert args.recipe is None and args.checkpoint is None and not hasattr(args, "out")
    args = build_parser().parse_args(["demo", "--recipe", "lisa-tiny", "k=v", "--host", "0.0.0.0"])
    assert args.recipe == ["lisa-tiny", "k=v"] and args.host == "0.0.0.0"


def test_demo_without_gradio_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    assert main(["demo", "--recipe", "lisa-tiny", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and 'pip install "lisa-kit[demo]"' in err
    assert main(["demo", "--port", "0"]) == 2


def test_shipped_examples():
    examples = load_examples()
    assert len(examples) >= 2
    for image, question in examples:
        p = Path(image)
        assert p.suffix == ".png" and p.stat().st_size < 30_000 and question.strip()


# -- answer(): the computation behind the page ---------------------------------------
@pytest.fixture(scope="module")
def segmenter():
    return api.Segmenter.from_recipe("lisa-tiny", device="cpu")


@pytest.fixture
def forced_seg(monkeypatch):
    """Every answer: one argmax token, [SEG], end of sequence (the tiny model is random)."""
    force_generation(monkeypatch, lambda m: {1: m.seg_token_id, 2: m.tokenizer.eos_id})


def _image_region(picture, img):
    """The picture's image box, shrunk back to ``img``'s size (it was enlarged by an integer factor)."""
    x0, y0, x1, y1 = picture.image_box
    s = picture.scale
    assert (y1 - y0, x1 - x0) == (img.shape[0] * s, img.shape[1] * s)
    return picture.pixels[y0:y1:s, x0:x1:s]


def test_answer_with_a_mask(segmenter, forced_seg):
    img, _ = synthetic_image(37, 53, 0)
    ov, masks, text = answer(segmenter, img, QUESTION)
    assert ov.ndim == 3 and ov.shape[2] == 3 and ov.dtype == np.uint8
    assert "[SEG]" in text and "no mask was made" not in text and len(masks) == 1
    m, caption = masks[0]
    assert m.shape == (37, 53) and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 255}
    assert caption.startswith("[SEG] 0: score")


def test_answer_overlay_has_legend_and_caption(segmenter, forced_seg):
    img, _ = synthetic_image(37, 53, 0)
    picture, masks, text = answer_picture(segmenter, img, QUESTION)
    assert np.array_equal(picture.pixels, answer(segmenter, img, QUESTION)[0])  # what the page shows
    assert len(picture.legend) == len(masks) == 1  # one entry per [SEG]
    entry = picture.legend[0]
    if masks[0][0].any():  # a swatch in the mask's colour, read back from the picture
        x0, y0, x1, y1 = entry.swatch
        assert (picture.pixels[y0 + 1:y1 - 1, x0 + 1:x1 - 1] == picture.colours[0]).all()
    else:
        assert entry.label.endswith("empty mask")
    assert picture.caption_box is not None and picture.caption_box[1] >= picture.image_box[3]
    outside = masks[0][0] == 0
    assert np.array_equal(_image_region(picture, img)[outside], img[outside])  # no text over the image


def test_answer_without_seg_says_so(segmenter, monkeypatch):
    force_generation(monkeypatch, lambda m: {0: m.tokenizer.eos_id})
    img, _ = synthetic_image(20, 30, 1)
    picture, masks, text = answer_picture(segmenter, img, QUESTION)
    assert masks == [] and "no [SEG], so no mask was made" in text and picture.legend == []
    assert np.array_equal(_image_region(picture, img), img)


# -- what the page says about the model ----------------------------------------------
@pytest.fixture(scope="module")
def demo_model():
    return api.Segmenter.from_default()


def test_page_names_the_model_not_its_path(demo_model):
    gr = pytest.importorskip("gradio", reason="gradio is not installed (pip install 'lisa-kit[demo]')")
    about = describe_model(demo_model)
    assert "lisa-demo" in about and "synthetic shapes" in about
    assert str(api.DEMO_MODEL_DIR) not in about
    demo = build_demo(demo_model)
    try:
        config = json.dumps(demo.get_config_file())  # everything the page is built from
    finally:
        demo.close()
    assert str(api.DEMO_MODEL_DIR) not in config and str(api.DEMO_MODEL_DIR.parent) not in config
    assert "lisa-demo" in config
    assert "woman" not in config  # no example or placeholder from another world
    del gr


def test_describe_model_without_training_data_is_generic(segmenter):
    about = describe_model(segmenter)  # lisa-tiny: a recipe without data sources
    assert "lisa-tiny" in about and "synthetic shapes" not in about and "LISA-style" in about


def test_demo_model_examples_are_about_shapes(demo_model):
    from lisa_kit.datasets.synthetic import CORNERS, PALETTE

    words = {"shape", *CORNERS, *PALETTE}
    examples = examples_for(demo_model)
    assert examples
    for image, question in examples:
        assert Path(image).is_file()
        assert words & set(question.lower().replace("?", " ").replace(".", " ").split()), question


def test_examples_next_to_a_checkpoint_win(tmp_path, segmenter):
    img, _ = synthetic_image(20, 20, 3)
    Image.fromarray(img).save(tmp_path / "a.png")
    (tmp_path / "examples.json").write_text(json.dumps([{"image": "a.png", "question": "Which one is round?"}]))
    seg = copy.copy(segmenter)
    seg.source = str(tmp_path)
    assert examples_for(seg) == [[str(tmp_path / "a.png"), "Which one is round?"]]


def test_answer_bad_input(segmenter, tmp_path):
    with pytest.raises(InputError, match="no image"):
        answer(segmenter, None, QUESTION)
    with pytest.raises(InputError, match="question is empty"):
        answer(segmenter, synthetic_image(20, 20, 2)[0], "  ")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(ImageError, match="bad.png"):
        answer(segmenter, str(bad), QUESTION)


# -- the app in a browser --------------------------------------------------------------
def _is_loopback(host) -> bool:
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return host == "localhost"


@pytest.fixture(scope="module")
def offline_server(request, tmp_path_factory):
    """The demo served on a free loopback port; yields ``(url, outbound)`` where
    ``outbound`` collects every attempt of this process to reach a non-loopback address
    (refused)."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found (Debian: apt-get install chromium; .ci/run installs it)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install 'lisa-kit[test]')")
    outbound: list = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")  # no usage reports / version check
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        mp.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
        mp.setenv("NO_PROXY", "127.0.0.1,localhost")  # gradio checks its own URL with httpx
        real_connect = socket.socket.connect

        def guarded_connect(sock, address):
            if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
                outbound.append(address)
                raise OSError(f"test_demo_web: network access to {address} refused")
            return real_connect(sock, address)

        mp.setattr(socket.socket, "connect", guarded_connect)
        pytest.importorskip("gradio", reason="gradio is not installed (pip install 'lisa-kit[demo]')")
        from lisa_kit.demo_app import build_demo, launch

        with socket.socket() as s:  # a free port (the OS picks it)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        demo = build_demo(request.getfixturevalue("segmenter"))  # after the skips: no model built for nothing
        _, url, _ = launch(demo, host="127.0.0.1", port=port, block=False, quiet=True)
        try:
            yield url, outbound
        finally:
            demo.close()


@pytest.fixture(scope="module")
def browser(offline_server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(offline_server, browser):
    """A fresh page on the demo; requests that leave the server are blocked and fail the test."""
    url, outbound = offline_server
    external: list[str] = []

    def only_local(route):
        u = route.request.url
        if u.startswith(url) or u.startswith(("data:", "blob:")):
            route.continue_()
        else:
            external.append(u)
            route.abort()

    context = browser.new_context()
    try:
        pg = context.new_page()
        pg.set_default_timeout(TIMEOUT_MS)
        pg.route("**/*", only_local)
        pg.goto(url)
        pg.wait_for_selector("#lisa-submit")
        yield pg
    finally:
        context.close()
    assert external == [], f"the page tried to reach outside the server: {external}"
    assert outbound == [], f"the server tried to reach the network: {outbound}"


def _answer_text(pg) -> str:
    return pg.locator("#lisa-answer textarea").input_value()


def _submit_and_wait(pg, question: str) -> None:
    pg.fill("#lisa-question textarea", question)
    pg.click("#lisa-submit")
    pg.wait_for_function("document.querySelector('#lisa-answer textarea').value.includes('[SEG]')")


def test_web_demo_answers_with_an_overlay(page, forced_seg):
    t0 = time.perf_counter()
    image, question = load_examples()[0]
    page.set_input_files("#lisa-image input[type=file]", image)
    page.wait_for_selector("#lisa-image img")
    _submit_and_wait(page, question)
    src = page.locator("#lisa-overlay img").first.get_attribute("src")
    assert src and "file=" in src  # served by the app itself
    assert "[SEG]" in _answer_text(page)
    assert page.locator("#lisa-masks img").count() >= 1
    print(f"\nweb demo: upload + answer in {time.perf_counter() - t0:.2f} s")


def test_web_demo_shows_whole_examples_and_no_paths(page):
    table = page.locator("#lisa-examples")
    for _, question in load_examples():  # each cell is filled in once its component loads: wait for it
        table.get_by_text(question, exact=True).wait_for()  # whole, not cut off with an ellipsis
    assert "..." not in table.inner_text()
    html = page.content()
    assert str(Path(api.__file__).resolve().parent) not in html  # no server path in the page
    page.locator("#lisa-examples tbody tr").nth(1).click()  # picking an example fills the inputs
    page.wait_for_selector("#lisa-image img")
    assert page.locator("#lisa-question textarea").input_value() == load_examples()[1][1]


def test_web_demo_reports_bad_input_and_keeps_serving(page, forced_seg, tmp_path):
    # No image: an error message in the page, no answer.
    page.fill("#lisa-question textarea", QUESTION)
    page.click("#lisa-submit")
    toast = page.locator(".toast-body", has_text="no image")
    toast.wait_for()
    assert "Traceback" not in toast.inner_text() and _answer_text(page) == ""
    # A file that is not a decodable image: lisa_kit's own message, naming the file.
    image = load_examples()[1][0]
    bad = tmp_path / "broken.png"
    bad.write_bytes(Path(image).read_bytes()[:200])  # a valid header, then the data stops
    page.set_input_files("#lisa-image input[type=file]", str(bad))
    page.click("#lisa-submit")
    toast = page.locator(".toast-body", has_text="broken.png").first
    toast.wait_for()
    assert "cannot decode image" in toast.inner_text() and "gradio" not in toast.inner_text()  # no server path
    # The app still answers.
    page.set_input_files("#lisa-image input[type=file]", image)
    page.wait_for_selector("#lisa-image img")
    _submit_and_wait(page, QUESTION)
    assert page.locator("#lisa-overlay img").first.get_attribute("src")
