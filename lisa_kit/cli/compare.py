"""``lisa-kit compare-original``: lisa_kit and the original LISA code on the same
checkpoint, image and prompt; see :mod:`lisa_kit.original`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from lisa_kit.cli import add_subcommand
from lisa_kit.errors import InputError


def _setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="released LISA HF directory (e.g. LISA-7B-v1)")
    p.add_argument("--vision-tower", metavar="DIR", help="local CLIP directory the checkpoint's config names")
    p.add_argument("--sam-config", metavar="JSON",
                   help="SAM sizes for lisa_kit when not ViT-H and no sam_config.json is beside the weights")
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--lisa-repo", metavar="DIR", help="checkout of github.com/dvlab-research/LISA to run")
    src.add_argument("--original-output", metavar="DIR",
                     help="reuse what the original-LISA runner wrote earlier (original.json, original_masks.npy)")
    p.add_argument("--lisa-python", metavar="PYTHON",
                   help="interpreter of the original's environment (transformers 4.31; default: this one)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (both sides)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--repeats", type=int, default=3, help="timed runs on each side (median reported)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="the original's generation limit")
    p.add_argument("--out", default="lisa_kit_compare", metavar="DIR",
                   help="writes compare.json, compare.md and the original's outputs")


def _run(args: argparse.Namespace) -> int:
    from lisa_kit import original
    from lisa_kit.api import Segmenter

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.original_output:
        orig = original.OriginalOutput.read(args.original_output)
    else:
        orig = original.run_original(args.lisa_repo, args.checkpoint, args.image, args.prompt, out,
                                     python=args.lisa_python, vision_tower=args.vision_tower, device=args.device,
                                     precision=args.precision, repeats=args.repeats,
                                     max_new_tokens=args.max_new_tokens)
    sam = None
    if args.sam_config:
        try:
            sam = json.loads(Path(args.sam_config).read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read --sam-config {args.sam_config}: {e}") from e
    seg = Segmenter.from_checkpoint(args.checkpoint, vision_tower=args.vision_tower, sam=sam, device=args.device,
                                    precision=args.precision)
    report = original.compare(seg, orig, args.image, args.prompt, repeats=args.repeats)
    report["checkpoint"] = str(args.checkpoint)
    (out / "compare.json").write_text(json.dumps(report, indent=1))
    table = original.markdown(report)
    (out / "compare.md").write_text(table)
    print(table, end="")
    return 0


add_subcommand(
    "compare-original", "run the original LISA code and lisa_kit side by side (numbers and speed)", _setup, _run,
    description="Run the original LISA code (a checkout of dvlab-research/LISA, in its own Python environment "
                "given by --lisa-python) and lisa_kit on the same released checkpoint, image and prompt; report "
                "whether the prompt ids and generated tokens agree, the mask-logit differences and the time per "
                "query of each. The original is never a dependency: without it, --original-output reuses an "
                "earlier run of its runner (lisa_kit/_original_runner.py).",
)
