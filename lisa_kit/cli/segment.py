"""``lisa-kit segment`` and ``lisa-kit chat``: masks for images from the command line.

Both load a model the same way (``--recipe NAME [key=value ...]``, ``--checkpoint DIR``,
or the shipped demo model when neither is given), read images through the one intake
(:func:`lisa_kit.images.load_image`, limits ``--max-pixels`` / ``--max-aspect``) and write
the same files: for each answer ``<stem>_mask_<i>.png`` (0/255 at the image's size),
``<stem>_overlay.png``, ``<stem>_annotated.png`` and one ``result.json``.

``result.json`` describes exactly the files present at every moment (:class:`_RunRecord`):
rewritten atomically after each image, ``in_progress`` while an image's files are being
written, ``complete`` at the end; a failed image has ``error`` instead of ``masks``;
``skipped`` lists directory entries that are not images. A run into a directory that holds
an earlier run deletes that run's masks and overlays first.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from lisa_kit.cli import add_subcommand

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
    g.add_argument("--device-map", default=None, metavar="auto|balanced|JSON",
                   help="a checkpoint, or a recipe with weights, larger than one GPU: spread the LLM's decoder layers over the "
                        "visible GPUs (auto: fill in order; balanced: even) or over the devices of a JSON of "
                        "capacities ('{\"cuda:0\": \"20GiB\", \"cuda:1\": \"40GiB\"}'); replaces --device")
    g.add_argument("--quantization", default=None, choices=("8bit", "4bit"),
                   help="load the LLM 8-/4-bit with bitsandbytes (CUDA only)")
    g.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="longest answer in tokens (default: the recipe's generation.max_new_tokens, else 512)")
    from lisa_kit.images import DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS

    g.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"refuse images with more pixels, before decoding them (default {DEFAULT_MAX_PIXELS})")
    g.add_argument("--max-aspect", type=float, default=DEFAULT_MAX_ASPECT, metavar="R",
                   help="refuse images whose long side is more than R times the short side "
                        f"(default {DEFAULT_MAX_ASPECT:g})")
    if out:  # the web demo writes no files
        p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output directory (default: ./{DEFAULT_OUT})")


def _limits(args):
    from lisa_kit.images import ImageLimits

    return ImageLimits(max_pixels=args.max_pixels, max_aspect=args.max_aspect)


def _load_segmenter(args):
    from lisa_kit import api

    recipe, overrides = (args.recipe[0], args.recipe[1:]) if args.recipe else (None, [])
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        from lisa_kit.errors import InputError

        raise InputError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    extra = {}
    if args.device_map is not None:  # a recipe without checkpoint weights refuses it (builder.load)
        extra["device_map"] = args.device_map
    return api.load(recipe, overrides, checkpoint=args.checkpoint, device=args.device, precision=args.precision,
                    quantization=args.quantization, vision_tower=args.vision_tower,
                    max_new_tokens=args.max_new_tokens, image_limits=_limits(args), **extra)


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


def _shown(path) -> str:
    """A path for the terminal: bytes that are not UTF-8 as ``\\xNN`` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _save_outputs(out: Path, stem: str, image, res) -> dict:
    """Write masks, the overlay (the image's size, masks outlined in colours chosen against
    it) and the annotated picture (the overlay with the question, the answer as caption and
    a legend per ``[SEG]``); the result.json entry for them."""
    import numpy as np
    from PIL import Image

    from lisa_kit.visualize import annotate_result, overlay

    masks = []
    for i, (m, score) in enumerate(zip(res.masks, res.scores)):
        name = f"{stem}_mask_{i}.png"
        Image.fromarray(m.astype(np.uint8) * 255, "L").save(out / name)
        rejected = bool(res.rejected[i]) if i < len(res.rejected) else False  # a [REJ]: empty on purpose
        why = res.malformed[i] if i < len(res.malformed) else None  # a text box/point object that could not be read
        masks.append({"file": name, "area": int(m.sum()), "score": float(score), "rejected": rejected,
                      **({"malformed": why} if why is not None else {})})
    ov = f"{stem}_overlay.png"
    Image.fromarray(overlay(image, res.masks)).save(out / ov)
    annotated = f"{stem}_annotated.png"
    Image.fromarray(annotate_result(image, res, title=res.prompt).pixels).save(out / annotated)
    return {"prompt": res.prompt, "answer": res.text, "image_size": list(res.image_size), "overlay": ov,
            "annotated": annotated, "masks": masks}


def _write_json(path: Path, data: dict) -> None:
    """Atomically (write aside, then rename). A file name that is not UTF-8 (Python holds
    its bytes as lone surrogates) is written as ``\\udcNN`` escapes, which ``json.load``
    turns back into the same name."""
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    tmp.write_bytes(text.encode("utf-8", "backslashreplace"))
    os.replace(tmp, path)


def _model_info(seg) -> dict:
    return {"model": seg.source, "device": str(seg.device), "precision": seg.precision,
            "quantization": seg.quantization}


# -- one run's files in --out -------------------------------------------------------------
RESULT_JSON = "result.json"
_OUTPUT_NAME = re.compile(r".+_(mask_\d+|overlay|annotated)\.png")


def _outputs_of(record: dict) -> set[str]:
    """The mask and overlay files a result.json says its run wrote (``results`` of
    ``segment``, ``turns`` of ``chat``), plus those of the image it was writing
    (``in_progress``). Only plain names of lisa-kit's own pattern count: a hand-edited
    file cannot make a run delete anything else."""
    names: set[str] = set()
    entries = [*(record.get("results") or []), *(record.get("turns") or [])]
    for e in entries:
        if isinstance(e, dict):
            names.update((e.get("overlay"), e.get("annotated")))
            names.update(m.get("file") for m in e.get("masks") or [] if isinstance(m, dict))
    return {n for n in names if isinstance(n, str) and n == Path(n).name and _OUTPUT_NAME.fullmatch(n)}


class _RunRecord:
    """``result.json`` of one run, true at every moment: rewritten atomically after each
    image; ``in_progress`` names the stem being written (so a run cut short leaves no file
    undescribed); ``complete`` turns true at the end. Opening one in a directory that holds
    an earlier run first deletes that run's files, so runs never mix."""

    def __init__(self, out: Path, header: dict, items: str):
        self.out, self.items = out, items
        self.record = {**header, items: [], "complete": False, "in_progress": None}
        self._clear_previous()
        self.save()

    def _clear_previous(self) -> None:
        path = self.out / RESULT_JSON
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # none, or not ours: nothing to clear
            return
        if not isinstance(old, dict):
            return
        names = _outputs_of(old)
        stem = (old.get("in_progress") or {}).get("stem") if isinstance(old.get("in_progress"), dict) else None
        if isinstance(stem, str) and stem == _safe_stem(stem):
            names.update(p.name for p in self.out.glob(f"{stem}_*.png") if _OUTPUT_NAME.fullmatch(p.name)
                         and p.name[len(stem):].startswith(("_mask_", "_overlay", "_annotated")))
        for name in names:
            (self.out / name).unlink(missing_ok=True)

    def save(self) -> None:
        _write_json(self.out / RESULT_JSON, self.record)

    def begin(self, image, stem: str) -> None:
        self.record["in_progress"] = {"image": str(image), "stem": stem}
        self.save()

    def add(self, entry: dict) -> None:
        self.record[self.items].append(entry)
        self.record["in_progress"] = None
        self.save()

    def finish(self, **extra) -> None:
        self.record.update(extra, complete=True, in_progress=None)
        self.save()


# -- segment ----------------------------------------------------------------------------
def _setup_segment(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, metavar="PATH_OR_DIR",
                   help="an image file, or a directory of images (every format PIL reads: jpg, png, gif — "
                        "first frame —, webp, tiff, bmp, ...; not recursive)")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the question, as plain text")
    _add_model_args(p)


def image_suffixes() -> set[str]:
    """File name suffixes of the formats PIL can open (not those it only writes)."""
    from PIL import Image

    Image.init()
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _list_images(path: Path, exclude: set[str] = frozenset()) -> tuple[list[Path], list[dict]]:
    """The images of a directory, and every other entry with why it is skipped."""
    suffixes = image_suffixes()
    paths, skipped = [], []
    for p in sorted(path.iterdir()):
        if p.name in exclude:
            reason = "an output of the earlier run in --out"
        elif p.is_dir():
            reason = "a directory (directories are not searched)"
        elif not p.is_file():
            reason = "not a regular file"
        elif p.suffix.lower() not in suffixes:
            reason = f"not an image format PIL reads ({p.suffix or 'no suffix'})"
        else:
            paths.append(p)
            continue
        skipped.append({"file": str(p), "reason": reason})
    return paths, skipped


def _unique_stem(path: Path, stems: set[str]) -> str:
    stem = _safe_stem(path.stem)
    if stem in stems:
        stem = _safe_stem(f"{path.stem}_{path.suffix.lstrip('.')}")
    n, base = 2, stem
    while stem in stems:
        stem, n = f"{base}_{n}", n + 1
    stems.add(stem)
    return stem


def _run_segment(args: argparse.Namespace) -> int:
    from lisa_kit.api import _check_prompt
    from lisa_kit.errors import InputError, LisaKitError
    from lisa_kit.images import load_image

    _check_prompt(args.prompt, "--prompt")
    limits = _limits(args)
    src = Path(args.image).expanduser()
    out = Path(args.out).expanduser()
    is_dir = src.is_dir()
    skipped: list[dict] = []
    if is_dir:
        earlier: set[str] = set()
        if out.resolve() == src.resolve():  # the earlier run's masks are not inputs
            try:
                earlier = _outputs_of(json.loads((out / RESULT_JSON).read_text(encoding="utf-8"))) | {RESULT_JSON}
            except (OSError, ValueError, AttributeError):
                pass
        paths, skipped = _list_images(src, earlier)
        if not paths:
            raise InputError(f"no images in {_shown(src)} ({len(skipped)} entries, none in a format PIL reads)")
    else:
        paths = [src]
        image = load_image(src, limits)  # a single bad image: exit 2 before loading the model
    out = _out_dir(args.out)
    seg = _load_segmenter(args)
    if not is_dir:  # a single image that cannot be answered leaves an earlier run in --out as it was
        answer = seg.seg(image, args.prompt)

    run = _RunRecord(out, {**_model_info(seg), "prompt": args.prompt, "skipped": skipped}, "results")
    stems: set[str] = set()
    failed = 0
    it = paths
    if is_dir:
        from tqdm import tqdm

        it = tqdm(paths, desc="segment", unit="img", file=sys.stderr)
    for path in it:
        try:
            if is_dir:
                image = load_image(path, seg.image_limits)
                res = seg.seg(image, args.prompt)
            else:
                res = answer
        except Exception as e:  # noqa: BLE001 - one image's failure must not end a directory run
            failed += 1
            why = str(e) if isinstance(e, LisaKitError) else f"unexpected {type(e).__name__}: {e}"
            run.add({"image": str(path), "error": why})
            print(f"{_shown(path)}: {why}", file=sys.stderr)
            continue
        stem = _unique_stem(path, stems)
        run.begin(path, stem)
        run.add({"image": str(path), **_save_outputs(out, stem, image, res)})
        if not is_dir:
            print(f"{_shown(path)}: {res.text}")
            print(f"{len(res.masks)} mask(s) written to {_shown(out)}")
            if (why := res.no_mask_reason()) is not None:
                print(f"note: {why}", file=sys.stderr)
    run.finish(failed=failed)
    if is_dir:
        print(f"{len(paths) - failed}/{len(paths)} images segmented; results in {_shown(out / RESULT_JSON)}")
        if skipped:
            print(f"{len(skipped)} entries skipped (not images; listed in result.json)", file=sys.stderr)
        if failed:
            print(f"error: {failed} of {len(paths)} image(s) failed (each with its reason in result.json)",
                  file=sys.stderr)
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


def _tolerant_stdin() -> None:
    """Bytes on stdin that are not UTF-8 become lone surrogates (Python's
    ``surrogateescape``) instead of a UnicodeDecodeError that would end the session: a
    path keeps its exact bytes, a question with them is answered by an error line."""
    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(errors="surrogateescape")
        except (ValueError, OSError):  # a stream that cannot switch: strict decoding stays
            pass


def _clean_path(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    return os.path.expanduser(text)


def _run_chat(args: argparse.Namespace) -> int:
    from lisa_kit.api import _check_prompt
    from lisa_kit.errors import DataError, LisaKitError
    from lisa_kit.images import load_image

    out = _out_dir(args.out)
    limits = _limits(args)
    image_path = image = None
    if args.image:
        image_path, image = _clean_path(args.image), load_image(_clean_path(args.image), limits)
    seg = _load_segmenter(args)
    _tolerant_stdin()
    run = _RunRecord(out, _model_info(seg), "turns")
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
                        image = load_image(image_path, limits)
                        print(f"image: {_shown(image_path)} ({image.shape[0]}x{image.shape[1]})", flush=True)
                    except DataError as e:
                        image_path = None
                        print(f"error: {e}", file=sys.stderr, flush=True)
            elif cmd == "/help":
                print(_CHAT_HELP, flush=True)
            else:
                print(f"unknown command {cmd}; /help lists them", file=sys.stderr, flush=True)
            continue
        try:  # before asking for an image: undecodable text gets its error line at once
            _check_prompt(text, "question")
        except LisaKitError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        while image is None:
            path = _ask("image path> ")
            if path is None:
                run.finish()
                return 0
            if not path.strip():
                continue
            try:
                image_path = _clean_path(path)
                image = load_image(image_path, limits)
            except DataError as e:
                print(f"error: {e}", file=sys.stderr, flush=True)
        try:
            res = seg.seg(image, text, history=history)
        except LisaKitError as e:  # e.g. the conversation outgrew the LLM: say so, keep going
            print(f"error: {e}" + (" (/reset starts over)" if history else ""), file=sys.stderr, flush=True)
            continue
        turn += 1
        stem = f"{_safe_stem(Path(image_path).stem)}_t{turn}"
        run.begin(image_path, stem)
        entry = {"turn": turn, "image": str(image_path), **_save_outputs(out, stem, image, res)}
        run.add(entry)
        history.append((text, res.text))
        print(f"answer: {res.text}", flush=True)
        if entry["masks"]:
            print("masks: " + ", ".join(_shown(out / m["file"]) for m in entry["masks"])
                  + f"; overlay: {_shown(out / entry['overlay'])}", flush=True)
        elif (why := res.no_mask_reason()) is not None:
            print(f"note: {why}", file=sys.stderr, flush=True)
    run.finish()
    return 0


add_subcommand(
    "segment", "segment images from a text prompt", _setup_segment, _run_segment,
    description="Answer a question about an image (or every image in a directory) and write one mask per "
                "[SEG] of the answer: <stem>_mask_<i>.png (0/255, the image's size), <stem>_overlay.png "
                "(the masks outlined over the image), <stem>_annotated.png (the overlay with the question, the "
                "answer and a legend per [SEG]) and result.json (per image: path, prompt, answer, size, and each "
                "mask's file, area and score; an image that failed has its 'error' instead; 'skipped' lists "
                "directory entries that are not images, with the reason; 'complete' turns true at the end). "
                "result.json is rewritten after every image, so it always describes the files present; a run "
                "into an --out holding an earlier run first deletes that run's masks and overlays.\n"
                "Images larger than --max-pixels or more elongated than --max-aspect are refused before they "
                "are decoded.\n"
                "Without --recipe or --checkpoint the shipped demo model is used when installed.\n"
                "Exit codes: 0 done; 1 some images of a directory failed (each with its reason in result.json; "
                "the others are done); 2 bad arguments, an unreadable single image or a model that cannot be "
                "loaded.",
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
