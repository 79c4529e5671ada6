"""``lisa-kit segment`` and ``lisa-kit chat``: masks for images from the command line.

Both load a model the same way (``--recipe NAME [key=value ...]``, ``--checkpoint DIR``,
or the shipped demo model when neither is given) and write the same files: for each
answer ``<stem>_mask_<i>.png`` (0/255 at the image's size), ``<stem>_overlay.png`` and
one ``result.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lisa_kit.cli import add_subcommand

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
DEFAULT_OUT = "lisa_kit_out"


# -- shared options ---------------------------------------------------------------------
def _add_model_args(p: argparse.ArgumentParser, *, out: bool = True) -> None:
    g = p.add_argument_group("model (default: the shipped demo model, when installed)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--recipe", nargs="+", metavar=("RECIPE", "KEY=VALUE"),
                     help="recipe name or .yaml path, then optional overrides key=value / ~key "
                          "(e.g. --recipe lisa-7b weights.path=/ckpt/LISA-7B-v1)")
    src.add_argument("--checkpoint", metavar="DIR",
                     help="a lisa_kit checkpoint directory (recipe.yaml) or a released LISA HF directory "
                          "(config.json, model_type llava)")
    g.add_argument("--vision-tower", metavar="PATH",
                   help="local CLIP directory (openai/clip-vit-large-patch14) for released LISA checkpoints "
                        "and recipes that need one")
    g.add_argument("--device", default="auto", metavar="cpu|cuda",
                   help="cpu, cuda, cuda:N or auto (default: auto = cuda when available)")
    g.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="weights and activations (default fp32; fp16 needs a GPU)")
    g.add_argument("--quantization", default=None, choices=("8bit", "4bit"),
                   help="load the LLM 8-/4-bit with bitsandbytes (CUDA only)")
    g.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="longest answer in tokens (default: the recipe's generation.max_new_tokens, else 512)")
    if out:  # the web demo writes no files
        p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output directory (default: ./{DEFAULT_OUT})")


def _load_segmenter(args):
    from lisa_kit import api

    recipe, overrides = (args.recipe[0], args.recipe[1:]) if args.recipe else (None, [])
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        from lisa_kit.errors import InputError

        raise InputError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    return api.load(recipe, overrides, checkpoint=args.checkpoint, device=args.device, precision=args.precision,
                    quantization=args.quantization, vision_tower=args.vision_tower,
                    max_new_tokens=args.max_new_tokens)


def _out_dir(path: str) -> Path:
    from lisa_kit.errors import InputError

    out = Path(path).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the output directory {out}: {e.strerror or e}") from e
    return out


def _safe_stem(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "image"


def _save_outputs(out: Path, stem: str, image, res) -> dict:
    """Write masks and the overlay; the result.json entry for them."""
    import numpy as np
    from PIL import Image

    from lisa_kit.visualize import overlay

    masks = []
    for i, (m, score) in enumerate(zip(res.masks, res.scores)):
        name = f"{stem}_mask_{i}.png"
        Image.fromarray(m.astype(np.uint8) * 255, "L").save(out / name)
        rejected = bool(res.rejected[i]) if i < len(res.rejected) else False  # a [REJ]: empty on purpose
        masks.append({"file": name, "area": int(m.sum()), "score": float(score), "rejected": rejected})
    ov = f"{stem}_overlay.png"
    Image.fromarray(overlay(image, res.masks)).save(out / ov)
    return {"prompt": res.prompt, "answer": res.text, "image_size": list(res.image_size), "overlay": ov,
            "masks": masks}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _model_info(seg) -> dict:
    return {"model": seg.source, "device": str(seg.device), "precision": seg.precision,
            "quantization": seg.quantization}


# -- segment ----------------------------------------------------------------------------
def _setup_segment(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, metavar="PATH_OR_DIR",
                   help=f"an image file, or a directory of images ({', '.join(IMAGE_SUFFIXES)}; not recursive)")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the question, as plain text")
    _add_model_args(p)


def _list_images(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _run_segment(args: argparse.Namespace) -> int:
    from lisa_kit.errors import DataError, InputError
    from lisa_kit.images import load_image

    if not args.prompt.strip():
        raise InputError("--prompt is empty")
    src = Path(args.image).expanduser()
    is_dir = src.is_dir()
    if is_dir:
        paths = _list_images(src)
        if not paths:
            raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {src}")
    else:
        paths = [src]
        image = load_image(src)  # a single bad image: exit 2 before loading the model
    out = _out_dir(args.out)
    seg = _load_segmenter(args)

    record = {**_model_info(seg), "prompt": args.prompt, "results": []}
    stems: set[str] = set()
    failed = 0
    it = paths
    if is_dir:
        from tqdm import tqdm

        it = tqdm(paths, desc="segment", unit="img", file=sys.stderr)
    for path in it:
        if is_dir:
            try:
                image = load_image(path)
            except DataError as e:
                failed += 1
                record["results"].append({"image": str(path), "error": str(e)})
                continue
        stem = _safe_stem(path.stem)
        if stem in stems:
            stem = _safe_stem(f"{path.stem}_{path.suffix.lstrip('.')}")
        n = 2
        base = stem
        while stem in stems:
            stem, n = f"{base}_{n}", n + 1
        stems.add(stem)
        res = seg.seg(image, args.prompt)
        record["results"].append({"image": str(path), **_save_outputs(out, stem, image, res)})
        if not is_dir:
            print(f"{path}: {res.text}")
            print(f"{len(res.masks)} mask(s) written to {out}")
    _write_json(out / "result.json", record)
    if is_dir:
        print(f"{len(paths) - failed}/{len(paths)} images segmented; results in {out / 'result.json'}")
        if failed:
            print(f"{failed} image(s) could not be read (see result.json)", file=sys.stderr)
    return 1 if failed else 0


# -- chat -------------------------------------------------------------------------------
_CHAT_HELP = """commands:
  /image PATH   use another image (the conversation starts over)
  /image        ask for a new image path with the next question
  /reset        forget the conversation (keep the image)
  /help         this text
  /quit         leave (end of input too)"""


def _setup_chat(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", metavar="PATH", help="start with this image instead of asking for one")
    _add_model_args(p)


def _ask(label: str) -> str | None:
    print(label, end="", flush=True)
    line = sys.stdin.readline()
    if not line:
        print()
        return None
    return line.rstrip("\r\n")


def _clean_path(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    return os.path.expanduser(text)


def _run_chat(args: argparse.Namespace) -> int:
    from lisa_kit.errors import DataError, LisaKitError
    from lisa_kit.images import load_image

    out = _out_dir(args.out)
    image_path = image = None
    if args.image:
        image_path, image = _clean_path(args.image), load_image(_clean_path(args.image))
    seg = _load_segmenter(args)
    record = {**_model_info(seg), "turns": []}
    history: list[tuple[str, str]] = []
    print("lisa-kit chat: ask about an image; /help for commands, /quit to leave.", flush=True)
    turn = 0
    while True:
        line = _ask("prompt> ")
        if line is None:
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, rest = text.partition(" ")
            if cmd in ("/quit", "/exit", "/q"):
                break
            if cmd == "/reset":
                history.clear()
                print("conversation cleared", flush=True)
            elif cmd == "/image":
                history.clear()
                image_path = image = None
                if rest.strip():
                    try:
                        image_path = _clean_path(rest)
                        image = load_image(image_path)
                        print(f"image: {image_path} ({image.shape[0]}x{image.shape[1]})", flush=True)
                    except DataError as e:
                        image_path = None
                        print(f"error: {e}", file=sys.stderr, flush=True)
            elif cmd == "/help":
                print(_CHAT_HELP, flush=True)
            else:
                print(f"unknown command {cmd}; /help lists them", file=sys.stderr, flush=True)
            continue
        while image is None:
            path = _ask("image path> ")
            if path is None:
                return 0
            if not path.strip():
                continue
            try:
                image_path = _clean_path(path)
                image = load_image(image_path)
            except DataError as e:
                print(f"error: {e}", file=sys.stderr, flush=True)
        try:
            res = seg.seg(image, text, history=history)
        except LisaKitError as e:  # e.g. the conversation outgrew the LLM: say so, keep going
            print(f"error: {e}" + (" (/reset starts over)" if history else ""), file=sys.stderr, flush=True)
            continue
        turn += 1
        stem = f"{_safe_stem(Path(image_path).stem)}_t{turn}"
        entry = {"turn": turn, "image": str(image_path), **_save_outputs(out, stem, image, res)}
        record["turns"].append(entry)
        _write_json(out / "result.json", record)
        history.append((text, res.text))
        print(f"answer: {res.text}", flush=True)
        if entry["masks"]:
            print("masks: " + ", ".join(str(out / m["file"]) for m in entry["masks"]) + f"; overlay: {out / entry['overlay']}",
                  flush=True)
    return 0


add_subcommand(
    "segment", "segment images from a text prompt", _setup_segment, _run_segment,
    description="Answer a question about an image (or every image in a directory) and write one mask per "
                "[SEG] of the answer: <stem>_mask_<i>.png (0/255, the image's size), <stem>_overlay.png "
                "(the masks over the image) and result.json (per image: path, prompt, answer, size, and each "
                "mask's file, area and score).\n"
                "Without --recipe or --checkpoint the shipped demo model is used when installed.\n"
                "Exit codes: 0 done; 1 some images of a directory could not be read (listed in result.json); "
                "2 bad arguments, an unreadable single image or a model that cannot be loaded.",
    epilog="examples:\n"
           "  lisa-kit segment --checkpoint /ckpt/LISA-7B-v1 --vision-tower /ckpt/clip-vit-large-patch14 \\\n"
           "      --image street.jpg --prompt \"What can make the woman stand higher? Please output "
           "segmentation mask.\" --device cuda --precision bf16\n"
           "  lisa-kit segment --recipe lisa-7b weights.path=/ckpt/LISA-7B-v1 "
           "model.vision_encoder.pretrained=/ckpt/clip \\\n"
           "      --image photos/ --prompt \"Segment the dog.\" --out dogs/\n"
           "  lisa-kit segment --recipe lisa-tiny --image cat.png --prompt \"Segment the cat.\"   "
           "# random weights: a smoke test",
)
add_subcommand(
    "chat", "ask about images interactively (multi-turn)", _setup_chat, _run_chat,
    description="An interactive session like LISA's chat.py: type a question, then an image path (asked on the "
                "first question and after /image). Follow-up questions continue the conversation about the same "
                "image. Each answer's masks and overlay are written to --out as <stem>_t<turn>_mask_<i>.png and "
                "<stem>_t<turn>_overlay.png, and result.json lists every turn. Without --recipe or --checkpoint the "
                "shipped demo model is used when installed.\n" + _CHAT_HELP + "\n"
                "Input is read from stdin, so a session can be scripted by piping lines into it.",
    epilog="examples:\n"
           "  lisa-kit chat --checkpoint /ckpt/LISA-7B-v1 --vision-tower /ckpt/clip-vit-large-patch14 --device cuda\n"
           "  printf 'Segment the cat.\\ncat.jpg\\nAnd the dog?\\n/quit\\n' | lisa-kit chat --recipe lisa-tiny",
)
