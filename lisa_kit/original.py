"""Side by side with the original LISA code, where a user has it (never a dependency).

The original (github dvlab-research/LISA) pins transformers 4.31 and cannot be imported
next to lisa_kit, so it runs in its own interpreter: :func:`run_original` starts
``lisa_kit/_original_runner.py`` (a script that imports only the original's code) with
the Python of the original's environment. :func:`compare` then runs lisa_kit on the same
checkpoint, image and prompt and measures, rather than claims, the differences:

* the prompt token ids (template and ``<image>`` handling) and the generated tokens,
  with the first position where they part;
* the mask logits (max and mean absolute difference), the binary masks (IoU, pixels
  that differ);
* the wall-clock time per query of each (median of ``repeats`` after a warm-up here;
  the runner reports each of its repeats), with device and precision.

``lisa-kit compare-original`` is the command-line face (``--original-output DIR``
reuses a runner output instead of starting the original again).
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lisa_kit.errors import CheckpointError, InputError

RUNNER = Path(__file__).with_name("_original_runner.py")
ORIGINAL_JSON = "original.json"
ORIGINAL_MASKS = "original_masks.npy"


@dataclass
class OriginalOutput:
    """What the runner wrote: prompt ids (``-200`` = image), generated ids, decoded text,
    ``masks (M, H, W)`` float32 logits and the timings/versions in ``info``."""

    input_ids: list[int]
    new_ids: list[int]
    text: str
    masks: np.ndarray
    info: dict

    @classmethod
    def read(cls, directory) -> "OriginalOutput":
        d = Path(directory)
        if not (d / ORIGINAL_JSON).is_file() or not (d / ORIGINAL_MASKS).is_file():
            raise CheckpointError(f"not an output of the original-LISA runner (needs {ORIGINAL_JSON} and "
                                  f"{ORIGINAL_MASKS})", file=d)
        info = json.loads((d / ORIGINAL_JSON).read_text())
        masks = np.load(d / ORIGINAL_MASKS, allow_pickle=False)
        return cls(list(info["input_ids"]), list(info["new_ids"]), info.get("text", ""), masks, info)


def run_original(lisa_repo, checkpoint, image, prompt, out, *, python: str | None = None,
                 vision_tower: str | None = None, device: str = "cpu", precision: str = "fp32", repeats: int = 3,
                 max_new_tokens: int = 512, timeout: float | None = None) -> OriginalOutput:
    """Run the original code in ``python`` (its environment's interpreter; default this
    one) and read back what it wrote to ``out``."""
    repo = Path(lisa_repo)
    if not (repo / "model" / "LISA.py").is_file():
        raise InputError(f"{repo} is not a checkout of the original LISA code (no model/LISA.py)")
    cmd = [python or sys.executable, str(RUNNER), "--lisa-repo", str(repo), "--checkpoint", str(checkpoint),
           "--image", str(image), "--prompt", prompt, "--out", str(out), "--device", device,
           "--precision", precision, "--repeats", str(repeats), "--max-new-tokens", str(max_new_tokens)]
    if vision_tower:
        cmd += ["--vision-tower", str(vision_tower)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise InputError(f"the original LISA code failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return OriginalOutput.read(out)


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(seg, original: OriginalOutput, image, prompt: str, *, repeats: int = 3,
            max_new_tokens: int | None = None) -> dict:
    """Run ``seg`` (a :class:`~lisa_kit.api.Segmenter` loaded from the same checkpoint,
    on its device and precision) on ``image``/``prompt`` greedily, as many new tokens as
    the original produced, and compare with ``original``. Returns the report (see the
    module docstring)."""
    from lisa_kit.generation import GenerationConfig, generate
    from lisa_kit.images import load_image
    from lisa_kit.interfaces import move_input

    model, device = seg.model, seg.device
    arr = load_image(image)
    ids = seg.prompt_ids(prompt)
    n_new = int(max_new_tokens or max(1, len(original.new_ids)))
    md_dtype = next(model.mask_decoder.parameters()).dtype

    def once():
        with torch.inference_mode():
            enc = model.vision_encoder
            vpx = move_input(enc.collate([enc.preprocess(arr)]), device, seg.dtype)
            mpx, meta = model.mask_decoder.preprocess(arr)
            return generate(model, [ids], [[0]], vpx, mpx[None].to(device, md_dtype), [meta],
                            GenerationConfig(max_new_tokens=n_new))[0]

    once()  # warm-up: allocator, kernels
    times, g = [], None
    for _ in range(max(1, repeats)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        g = once()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)

    ours_masks = g.masks.float().cpu().numpy()
    theirs = original.masks.astype(np.float32)
    report = {
        "prompt": prompt,
        "prompt_ids_equal": ids == original.input_ids,
        "prompt_ids_first_difference": _first_difference(ids, original.input_ids),
        "tokens_equal": list(g.token_ids) == original.new_ids,
        "tokens_first_difference": _first_difference(list(g.token_ids), original.new_ids),
        "ours": {"token_ids": list(g.token_ids), "text": g.text, "masks": int(ours_masks.shape[0]),
                 "seconds": times, "seconds_median": statistics.median(times), "device": str(device),
                 "precision": seg.precision},
        "original": {"token_ids": original.new_ids, "text": original.text, "masks": int(theirs.shape[0]),
                     "seconds": original.info.get("seconds"),
                     "seconds_median": statistics.median(original.info["seconds"]) if original.info.get("seconds")
                     else None,
                     "device": original.info.get("device"), "precision": original.info.get("precision"),
                     "versions": original.info.get("versions")},
    }
    if ours_masks.shape == theirs.shape and ours_masks.size:
        diff = np.abs(ours_masks - theirs)
        a, b = ours_masks > 0, theirs > 0
        union = int((a | b).sum())
        report["masks"] = {"logit_max_abs_diff": float(diff.max()), "logit_mean_abs_diff": float(diff.mean()),
                           "pixels_differing": int((a != b).sum()), "pixels": int(a.size),
                           "iou": float((a & b).sum() / union) if union else 1.0}
    else:
        report["masks"] = {"shape_ours": list(ours_masks.shape), "shape_original": list(theirs.shape)}
    o, t = report["ours"]["seconds_median"], report["original"]["seconds_median"]
    report["speedup"] = (t / o) if (o and t) else None
    return report


def markdown(report: dict) -> str:
    """A short table of a :func:`compare` report."""
    m = report["masks"]
    rows = [("prompt ids equal", report["prompt_ids_equal"]), ("generated tokens equal", report["tokens_equal"]),
            ("answer (lisa_kit)", repr(report["ours"]["text"])), ("answer (original)", repr(report["original"]["text"]))]
    if "logit_max_abs_diff" in m:
        rows += [("mask logits max |diff|", f"{m['logit_max_abs_diff']:.3g}"),
                 ("mask IoU (logit > 0)", f"{m['iou']:.6f}"),
                 ("pixels differing", f"{m['pixels_differing']} of {m['pixels']}")]
    else:
        rows += [("mask shapes", f"{m['shape_ours']} vs {m['shape_original']}")]
    fmt = lambda s: f"{s * 1000:.1f} ms" if s else "-"  # noqa: E731
    rows += [("time per query (lisa_kit, median)", fmt(report["ours"]["seconds_median"])),
             ("time per query (original, median)", fmt(report["original"]["seconds_median"])),
             ("speed-up", f"{report['speedup']:.2f}x" if report["speedup"] else "-")]
    return "| quantity | value |\n| --- | --- |\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
