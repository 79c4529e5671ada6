"""``lisa-kit demo``: the web demo (:mod:`lisa_kit.demo_app`) in a browser.

The model is chosen as for ``lisa-kit segment`` (``--recipe NAME [key=value ...]``,
``--checkpoint DIR``, or the shipped demo model when neither is given; same
``--device`` / ``--precision`` options). The server listens on 127.0.0.1 unless
``--host`` says otherwise.
"""
from __future__ import annotations

import argparse
import os

from lisa_kit.cli import add_subcommand
from lisa_kit.cli.segment import _add_model_args, _load_segmenter

MAX_PORT = 65535


def _setup(p: argparse.ArgumentParser) -> None:
    from lisa_kit.demo_app import DEFAULT_HOST, DEFAULT_PORT

    g = p.add_argument_group("server")
    g.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}: this machine only; "
                        "0.0.0.0 exposes the demo to the network, without authentication)")
    g.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    g.add_argument("--share", action="store_true",
                   help="also open a public *.gradio.live link through Gradio's tunnel servers "
                        "(needs internet; off by default)")
    _add_model_args(p, out=False)


def _run(args: argparse.Namespace) -> int:
    from lisa_kit.demo_app import build_demo, launch, require_gradio
    from lisa_kit.errors import InputError

    if not 1 <= args.port <= MAX_PORT:
        raise InputError(f"--port must be in 1..{MAX_PORT}, got {args.port}")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage reports to gradio.app
    require_gradio()  # before the (slow) model load: a missing extra fails at once
    seg = _load_segmenter(args)
    launch(build_demo(seg), host=args.host, port=args.port, share=args.share)
    return 0


add_subcommand(
    "demo", "serve the web demo (image + question in the browser)", _setup, _run,
    description="Serve a web page (gradio) where you upload an image, ask a question and see the answer, "
                "each [SEG]'s mask and the masks over the image; with example images to try. Like LISA's app.py.\n"
                "Listens on 127.0.0.1:7860 (this machine only) unless --host/--port say otherwise. "
                "Without --recipe or --checkpoint the shipped demo model is used when installed.\n"
                'Needs the demo extra: pip install "lisa-kit[demo]". Ctrl-C stops the server.',
    epilog="examples:\n"
           "  lisa-kit demo                                         # the shipped demo model\n"
           "  lisa-kit demo --recipe lisa-tiny --port 7861          # random weights: a smoke test\n"
           "  lisa-kit demo --checkpoint /ckpt/LISA-7B-v1 --vision-tower /ckpt/clip-vit-large-patch14 \\\n"
           "      --device cuda --precision bf16 --host 0.0.0.0     # reachable from other machines",
)
