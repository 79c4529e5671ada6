"""Memory and time at LISA's real widths: load, one ``seg()``, export, one training step.

Not a test: a measurement to run by hand and commit with the device named.

    python benchmarks/scale.py --layers 2 4 --out benchmarks/results/scale_cpu
    python benchmarks/scale.py --layers 1 2 --device cuda --out benchmarks/results/scale_gpu
    python benchmarks/scale.py --layers 2 4 --original /src/LISA --original-python /envs/lisa/bin/python
    python benchmarks/scale.py --widths tiny --layers 1 2 --out /tmp/scale_tiny     # seconds (what CI runs)

For each depth (number of LLM layers) it **generates** a released-LISA checkpoint at real
widths with random bf16 weights -- LLaMA-7B (hidden 4096, intermediate 11008, 32 heads;
vocabulary 32000 + LLaVA's pad + LISA's ``[SEG]``, ``<im_start>``, ``<im_end>`` = 32004 rows
as in LISA-7B-v1), CLIP ViT-L/14 at 224 px
(its own fp32 directory, as ``openai/clip-vit-large-patch14``), SAM ViT-H, projector
1024 -> 4096, seg head 4096 -> 256 -- in three forms: sharded ``pytorch_model-*.bin`` + index
(the released files), sharded ``model-*.safetensors`` + index, and lisa_kit's own directory.
The model is built on the meta device (every key, shape and config, no memory) and each
tensor is generated into the shard being written (:func:`lisa_kit.checkpoint.export.with_fill`):
the generator never holds more than one shard (lisa_kit's format keeps a component per file,
so there the LLM file).

Then each measurement runs in a fresh interpreter of its own (its peak is its own): the
process's peak RSS (``VmHWM``; also its RSS before the measured action and the peak growth
during it, ``/proc/self/clear_refs``), wall time, and on CUDA ``max_memory_allocated``:

* ``load_lisa_hf_bin``, ``load_lisa_hf_safetensors``, ``load_lisa_kit``:
  ``Segmenter.from_checkpoint(dir, precision="bf16")``;
* ``seg``: one ``seg()`` (one image, one question, the answer forced to ``--answer-tokens``
  tokens ending in ``[SEG]`` as ``lisa-kit bench`` forces it) after loading the safetensors form;
* ``seg_q8``: the 8 :data:`QUESTIONS` about that image in one ``seg_batch()`` call, each
  answer forced the same way (the 8-vs-1 ratio is in ``results.md``);
* ``export``: ``export_lisa_hf`` of that loaded model (safetensors, default shard size);
* ``train``: one optimizer step of :class:`lisa_kit.train.loop.Trainer` (LoRA q/v, bf16
  autocast, activation checkpointing, synthetic samples) on the ``.bin`` form, at batch 1
  (``train``), LISA's per-device batch 2 (``train_b2``) and 4 (``train_b4``). ``results.md``
  fits peak = fixed + per-sample x batch at each depth and at the extrapolated sizes: the
  memory one more sample costs, per LLM layer, and the largest batch that fits 24 / 40 / 80 GiB.

Across depths every metric is fitted as ``a + b * params`` (least squares) and extrapolated
to LISA-7B (32 layers) and LISA-13B (40 layers, hidden 5120, intermediate 13824, 40 heads):
``results.json`` and ``results.md`` in ``--out``, the 7B/13B rows marked as extrapolated.
``--original PATH`` (a checkout of dvlab-research/LISA) also loads each ``.bin`` checkpoint
with the original ``LISAForCausalLM.from_pretrained(low_cpu_mem_usage=True,
torch_dtype=bfloat16)`` in ``--original-python`` (its own environment, transformers 4.31), as
``original_from_pretrained``, fitted and extrapolated like lisa_kit's loads.

Disk: about 6 bytes x params per depth for the three forms, plus 1.2 GB of CLIP; each
depth's files are removed after its measurements unless ``--keep``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch

MEASUREMENTS = ("load_lisa_hf_bin", "load_lisa_hf_safetensors", "load_lisa_kit", "seg", "seg_q8", "export", "train",
                "train_b2", "train_b4")
# seg_q8: these 8 questions about one image in one seg_batch() call (issue 12: <= 2x one question)
QUESTIONS = ("Where is the red shape? Please output segmentation mask.",
             "Segment the largest shape.", "What is the leftmost object in this image?",
             "Which shape has the most corners? Please output segmentation mask.",
             "Please segment the shape nearest to the top edge.", "the small blue square",
             "Can you segment the object below the red shape in this image?",
             "What in this picture could be used to hold water? Please respond with segmentation mask.")
# Samples per micro-batch of each training measurement: 1, LISA's per-device batch (2) and 4;
# the slope over them is the memory of one more sample (its activations), the intercept what
# does not grow with the batch (weights, masters, gradients, optimizer state).
TRAIN_BATCH = {"train": 1, "train_b2": 2, "train_b4": 4}
# GPU memory sizes the training budget is worked out for (a 24 GB card, A100-40GB, 80 GB cards)
GPU_BUDGETS_GIB = (24, 40, 80)
ORIGINAL_LOAD = "original_from_pretrained"  # --original: the original LISA's from_pretrained, in its interpreter
METRICS = ("wall_s", "peak_rss_bytes", "cuda_peak_bytes")
FORMS = ("lisa_hf_bin", "lisa_hf_safetensors", "lisa_kit")

# The real widths (LISA-7B-v1: LLaVA-7B = LLaMA-7B/Vicuna; CLIP ViT-L/14 224 px; SAM ViT-H).
CLIP_L14 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
            "image_size": 224, "patch_size": 14, "hidden_act": "quick_gelu", "projection_dim": 768,
            "layer_norm_eps": 1e-5}
LLAMA = {"model_type": "llama", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32}
LLAMA_13B = {"hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40, "num_key_value_heads": 40}
FULL_DEPTH = {"LISA-7B": (LLAMA_7B, 32), "LISA-13B": (LLAMA_13B, 40)}
LLAMA_VOCAB = 32000  # LLaMA's SentencePiece model
LISA_ROWS = 32004  # LISA-7B-v1's embedding / lm_head rows: LLaVA's pad token, then [SEG], <im_start>, <im_end>
LISA_ADDED = ("[SEG]", "<im_start>", "<im_end>")  # what lisa_kit's build adds to the tokenizer
SHARD = {"real": "2GB", "tiny": "100KB"}  # several shards even at a few layers, as a 7B release has


# -- the model (meta device) ---------------------------------------------------------------
def padded_tokenizer(pieces: int, out: Path) -> Path:
    """The tiny test tokenizer grown to ``pieces`` SentencePiece pieces (unused ``▁padN``
    pieces of the lowest scores): a LLaMA-sized vocabulary without a download."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    from lisa_kit.testing import tiny_tokenizer_dir

    src = tiny_tokenizer_dir()
    proto = pb.ModelProto()
    proto.ParseFromString((src / "tokenizer.model").read_bytes())
    have = {p.piece for p in proto.pieces}
    low = min(p.score for p in proto.pieces)
    i = 0
    while len(proto.pieces) < pieces:
        i += 1
        if f"▁pad{i}" not in have:
            p = proto.pieces.add()
            p.piece, p.score, p.type = f"▁pad{i}", low - i, pb.ModelProto.SentencePiece.NORMAL
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "tokenizer_config.json", out / "tokenizer_config.json")
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())
    return out


def recipe(widths: str, layers: int, tokenizer: Path | None) -> dict:
    """The reference recipe at ``widths`` (``real`` or ``tiny``) with ``layers`` LLM layers."""
    from lisa_kit.testing import tiny_recipe

    r = tiny_recipe()
    m = r["model"]
    m["llm"]["config"] = {**m["llm"]["config"], "num_hidden_layers": layers}
    if widths == "real":
        m["vision_encoder"] = {"name": "hf_clip", "config": CLIP_L14}
        m["llm"] = {"name": "hf_causal_lm", "tokenizer": str(tokenizer),
                    "config": {**LLAMA, **LLAMA_7B, "num_hidden_layers": layers, "vocab_size": LLAMA_VOCAB}}
        m["mask_decoder"] = {"name": "sam", "variant": "vit_h"}
    r["name"] = f"scale-{widths}-{layers}"
    return r


def meta_model(widths: str, layers: int, tokenizer: Path | None):
    from lisa_kit.builder import build_model

    with torch.device("meta"):
        return build_model(recipe(widths, layers, tokenizer))


def count(module) -> int:
    return sum(v.numel() for v in module.state_dict().values())


def llama_params(llm: dict, layers: int, vocab: int) -> int:
    """A LLaMA causal LM's parameters from its widths: untied embeddings and head, per layer
    four attention and three MLP matrices and two norms, a final norm."""
    h, inter = llm["hidden_size"], llm["intermediate_size"]
    kv = h // llm["num_attention_heads"] * llm["num_key_value_heads"]
    return 2 * vocab * h + layers * (2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h) + h


def lisa_params(model, llm: dict, layers: int) -> int:
    """Parameters of the whole model (tower included) with the LLM at widths ``llm`` and
    ``layers`` layers, the vocabulary and everything else as in ``model``; the projector and
    seg head follow the LLM's width."""
    h = llm["hidden_size"]
    dv, p = model.projector.in_dim, model.seg_head.out_dim
    projector = dv * h + h  # LISA's linear mm_projector
    seg_head = h * h + h + h * p + p  # Linear-ReLU-Linear
    return (count(model.vision_encoder) + count(model.mask_decoder) + projector + seg_head
            + llama_params(llm, layers, model.llm.vocab_size))


def _llm_widths(model) -> dict:
    c = model.llm.model.config
    return {k: getattr(c, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                         "num_key_value_heads")}


# -- generating checkpoints ------------------------------------------------------------------
def random_fill(planned) -> torch.Tensor:
    """A tensor for one planned key, the same for the same key in every form: norms' weights
    1, other vectors 0, matrices N(0, 0.02) (a random model, but a finite one)."""
    if not planned.dtype.is_floating_point:
        return torch.arange(int(np.prod(planned.shape)), dtype=planned.dtype).reshape(planned.shape)
    if len(planned.shape) <= 1:
        fill = 1.0 if planned.key.endswith("weight") else 0.0
        return torch.full(planned.shape, fill, dtype=planned.dtype)
    g = torch.Generator().manual_seed(zlib.crc32(planned.key.encode()))
    return torch.randn(planned.shape, generator=g, dtype=planned.dtype).mul_(0.02)


def generate(model, point: Path, clip: Path, widths: str, shard: int) -> dict[str, Path]:
    """The three forms of ``model``'s checkpoint under ``point`` (the CLIP tower in ``clip``,
    written once); returns their directories."""
    import yaml

    from lisa_kit.checkpoint import export as ex
    from lisa_kit.checkpoint.native import FORMAT_VERSION, _components

    if not (clip / "config.json").exists():
        ex.write_vision_tower(model.vision_encoder, clip, safetensors=True, dtype=torch.float32, fill=random_fill)
    dirs = {form: point / form for form in FORMS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ex.ExportWarning)  # tiny widths are not LISA's ViT-H: noted, fine
        for form, st in (("lisa_hf_bin", False), ("lisa_hf_safetensors", True)):
            ex.write_lisa_hf(model, dirs[form], vision_tower=str(clip.resolve()), safetensors=st,
                             dtype=torch.bfloat16, max_shard_size=shard, fill=random_fill)
            if widths == "real":  # a released directory has none: LISA's code builds ViT-H
                (dirs[form] / ex.SAM_CONFIG).unlink()
    # lisa_kit's own format: the resolved recipe, one bf16 safetensors file per component
    native = dirs["lisa_kit"]
    native.mkdir(parents=True)
    r = {"name": model.recipe["name"], "model": {}}
    for kind, comp in _components(model).items():
        node = {"name": model.recipe["model"][kind]["name"], **comp.export_config()}
        r["model"][kind] = node
        tensors = [ex.plan(k, v, torch.bfloat16) for k, v in comp.state_dict().items()]
        ex.write_shards(ex.with_fill(tensors, random_fill), native, True, sys.maxsize, prefix=kind)
    r["model"]["llm"]["tokenizer"] = "tokenizer"
    r["model"].update(seg_token=model.seg_token, seg_hidden=model.seg_hidden)
    r["lisa_kit_format"] = FORMAT_VERSION
    model.tokenizer.save(native / "tokenizer")
    (native / "recipe.yaml").write_text(yaml.safe_dump(r, sort_keys=False))
    return dirs


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# -- one measurement (its own process) ---------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak() -> bool:
    try:  # Linux: VmHWM := VmRSS, so the peak of what follows can be read
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _load(form: str, dirs: dict, clip: str, device: str):
    from lisa_kit.api import Segmenter

    return Segmenter.from_checkpoint(dirs[form], vision_tower=clip, device=device, precision="bf16")


def measure(name: str, dirs: dict, clip: str, device: str, answer_tokens: int, work: Path) -> dict:
    """Run measurement ``name``; what is timed is the action itself, after any setup."""
    import lisa_kit.api  # noqa: F401  (imports are not what is measured)
    import lisa_kit.builder  # noqa: F401
    import transformers  # noqa: F401
    # transformers imports its model code lazily, on first use: about 2.8 s of a 4 s load at
    # 2 layers would be imports. The original's script imports its model before its clock
    # starts, so these do too (the models the generated checkpoint holds).
    import transformers.models.clip.modeling_clip  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from lisa_kit.registry import get_registry

    get_registry()  # plugin discovery imports every component's libraries once
    rss0 = _status_kib("VmRSS") * 1024
    cuda = device.startswith("cuda")
    setup_t0 = time.perf_counter()
    action = None
    extra: dict = {}  # what the measurement reports besides time and memory
    if name.startswith("load_"):
        def action():
            return _load(name.removeprefix("load_"), dirs, clip, device)
    elif name in ("seg", "seg_q8", "export"):
        seg = _load("lisa_hf_safetensors", dirs, clip, device)
        if name in ("seg", "seg_q8"):
            from lisa_kit.bench import answer_tokens as forced_tokens
            from lisa_kit.bench import forced_answer
            from lisa_kit.testing import synthetic_image

            image, _ = synthetic_image(480, 640, 0)
            forced = forced_tokens(seg.model, answer_tokens)

            questions = QUESTIONS if name == "seg_q8" else QUESTIONS[:1]

            def action():
                with forced_answer(forced):
                    rs = seg.seg_batch(image, list(questions), max_new_tokens=answer_tokens)
                assert all(r.masks.shape[0] == 1 for r in rs), "a forced [SEG] gave no mask"
                return rs
        else:
            from lisa_kit.checkpoint.export import export_lisa_hf

            def action():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return export_lisa_hf(seg.model, work / "export", vision_tower=clip, overwrite=True)
    elif name in TRAIN_BATCH:
        from lisa_kit.checkpoint.lisa_hf import lisa_recipe
        from lisa_kit.train.loop import Trainer

        from lisa_kit.checkpoint.export import SAM_CONFIG

        sam = dirs["lisa_hf_bin"] / SAM_CONFIG  # tiny widths; a real release has none (ViT-H)
        r = lisa_recipe(dirs["lisa_hf_bin"], vision_tower=clip, sam=str(sam) if sam.exists() else None)
        tr = Trainer(r, work / "run", progress=False,
                     device=device, overrides=[
                         "data.sources={synthetic: {datasets: [synthetic], rate: 1, split: train, options: {size: 8}}}",
                         "train.val=null", "train.save_every=0", "train.workers=0", "train.steps=1",
                         "train.warmup_steps=1", f"train.batch_size={TRAIN_BATCH[name]}", "train.grad_accumulation=1",
                         "train.precision=bf16", "train.activation_checkpointing=true"])
        micro, where = next(tr._micro_batches())

        # the text the step trains on (before the image tokens are fused in), for the report
        extra["input_ids_shape"] = list(tr._collate(micro).input_ids.shape)

        def action():
            stats = tr.train_step([micro], [where])
            assert np.isfinite(stats["loss"]), stats
            return stats
    else:
        raise SystemExit(f"unknown measurement {name!r}; known: {', '.join(MEASUREMENTS)}")
    setup_s = time.perf_counter() - setup_t0
    before = _status_kib("VmRSS") * 1024
    peak_before = _status_kib("VmHWM") * 1024
    growth_known = _reset_peak()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    action()
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    hwm = _status_kib("VmHWM") * 1024
    out = {"measurement": name, "wall_s": wall, "setup_s": setup_s, "rss_start_bytes": rss0,
           "rss_before_bytes": before,
           "peak_rss_bytes": max(hwm, peak_before),  # the whole process: loading included
           "action_peak_growth_bytes": hwm - before if growth_known else None,
           # 1-minute load averages around the action: times from a busy machine are inflated
           "loadavg_before": load_before, "loadavg_after": os.getloadavg()[0]}
    if cuda:
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return {**out, **extra}


# -- the original's loader (its own interpreter) --------------------------------------------------
ORIGINAL = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from transformers import AutoTokenizer
from model.LISA import LISAForCausalLM

def kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))

ckpt, tower, device = sys.argv[2], sys.argv[3], sys.argv[4]
t0 = time.perf_counter()
tok = AutoTokenizer.from_pretrained(ckpt, use_fast=False)
seg = tok("[SEG]", add_special_tokens=False).input_ids[0]
model = LISAForCausalLM.from_pretrained(ckpt, low_cpu_mem_usage=True, vision_tower=tower, seg_token_idx=seg,
                                        torch_dtype=torch.bfloat16)
model.get_model().initialize_vision_modules(model.get_model().config)   # chat.py: the CLIP tower
model.get_model().get_vision_tower().to(dtype=torch.bfloat16)
if device != "cpu":
    model = model.to(device)
out = {"measurement": "original_from_pretrained", "wall_s": time.perf_counter() - t0,
       "peak_rss_bytes": kib("VmHWM") * 1024}
if device != "cpu":
    out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
print(json.dumps(out))
"""


# -- fitting ---------------------------------------------------------------------------------
def fit(params: list[int], values: list[float]) -> dict | None:
    """Least squares ``value = a + b * params`` (``None`` with fewer than two depths)."""
    x, y = np.asarray(params, dtype=float), np.asarray(values, dtype=float)
    if len(np.unique(x)) < 2:
        return None
    b, a = np.polyfit(x, y, 1)
    pred = a + b * x
    ss = float(((y - y.mean()) ** 2).sum())
    return {"a": float(a), "b": float(b), "r2": 1.0 - float(((y - pred) ** 2).sum()) / ss if ss > 0 else 1.0,
            "max_abs_residual": float(np.abs(y - pred).max()), "depths": int(len(np.unique(x)))}


def fits_and_extrapolation(points: list[dict], targets: dict[str, int]) -> tuple[dict, dict]:
    fits: dict = {}
    extrapolated: dict = {name: {"params": n} for name, n in targets.items()}
    for m in (*MEASUREMENTS, ORIGINAL_LOAD):  # the original's load is fitted the same way, for the side by side
        for metric in METRICS:
            rows = [(p["params"], p["measurements"][m][metric]) for p in points
                    if m in p["measurements"] and p["measurements"][m].get(metric) is not None]
            f = fit([r[0] for r in rows], [r[1] for r in rows]) if rows else None
            if f is None:
                continue
            fits.setdefault(m, {})[metric] = f
            for name, n in targets.items():
                extrapolated[name].setdefault(m, {})[metric] = f["a"] + f["b"] * n
    return fits, extrapolated


# -- the run ------------------------------------------------------------------------------------
def _child(name: str, dirs: dict, clip: Path, device: str, answer_tokens: int, work: Path, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_measure", name, "--_dirs", json.dumps(
        {k: str(v) for k, v in dirs.items()}), "--_clip", str(clip), "--device", device,
        "--answer-tokens", str(answer_tokens), "--_work", str(work)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        return {"measurement": name, "error": (res.stderr or res.stdout)[-2000:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _original(repo: str, python: str, ckpt: Path, clip: Path, device: str, timeout: float) -> dict:
    res = subprocess.run([python, "-c", ORIGINAL, repo, str(ckpt), str(clip), device], capture_output=True,
                         text=True, timeout=timeout, cwd=repo)
    if res.returncode != 0:
        return {"measurement": ORIGINAL_LOAD, "error": (res.stderr or res.stdout)[-2000:]}
    out = json.loads(res.stdout.strip().splitlines()[-1])
    # transformers 4.31 names weights it had to initialise ("newly initialized"): a load that
    # did not read every weight is not the same work, so its words are kept with the numbers
    said = [line for line in res.stderr.splitlines() if "initialized" in line or "not used" in line]
    out["loader_warnings"] = said[-5:]
    return out


def environment(device: str) -> dict:
    from lisa_kit.provenance import git_state, versions

    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(line.split()[1] for line in f if line.startswith("MemTotal:"))) * 1024
    except OSError:
        pass
    return {"device": name, "memory_bytes": mem, "threads": torch.get_num_threads(), "versions": versions(),
            "git": git_state(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"


def _gib(x) -> str:
    return "-" if x is None else f"{x / 2**30:.2f} GiB"


def questions_ratio(res: dict) -> list[str]:
    """Markdown lines: ``seg_q8`` / ``seg`` wall time per measured depth, and of the fitted
    lines at the extrapolated sizes (issue 12's goal: at most 2)."""
    rows = [(p["layers"], p["measurements"]["seg_q8"]["wall_s"] / p["measurements"]["seg"]["wall_s"])
            for p in res["points"] if "wall_s" in p["measurements"].get("seg", {})
            and "wall_s" in p["measurements"].get("seg_q8", {})]
    if not rows:
        return []
    out = ["", "## 8 questions on one image / 1 question (wall time)", "", "| layers | 8Q / 1Q |", "| --- | --- |"]
    out += [f"| {layers} | {r:.2f} |" for layers, r in rows]
    fits = res.get("fits", {})
    lines = [fits.get(m, {}).get("wall_s") for m in ("seg", "seg_q8")]
    # a time that falls as the model grows is noise (a busy machine): no extrapolation from it
    if all(f is not None and f["b"] >= 0 for f in lines):
        for name, ext in res["extrapolated"].items():
            one, eight = ext.get("seg", {}).get("wall_s"), ext.get("seg_q8", {}).get("wall_s")
            if one and eight and one > 0:
                out.append(f"| {name} (extrapolated) | {eight / one:.2f} |")
    return out


def batch_fit(peaks: dict[int, float]) -> tuple[float, float] | None:
    """``peak = fixed + per_sample * batch`` by least squares over ``{batch: peak bytes}``
    (``None`` with fewer than two batch sizes)."""
    if len(peaks) < 2:
        return None
    per_sample, fixed = np.polyfit(list(peaks), list(peaks.values()), 1)
    return float(fixed), float(per_sample)


def largest_batch(fixed: float, per_sample: float, budget_bytes: float) -> str:
    if fixed > budget_bytes:
        return "none"
    if per_sample <= 0:
        return "n/a (per sample <= 0)"
    # the fits are least squares: a batch that fits exactly must not round down to one less
    return str(int((budget_bytes - fixed) / per_sample + 1e-6))


def step_peak(r: dict, cuda: bool) -> float | None:
    """The training step's own peak: on CUDA ``max_memory_allocated`` (reset before the step);
    on the CPU the RSS before the step plus its peak growth (``/proc/self/clear_refs``), so a
    higher peak while loading does not hide what the batch adds; ``None`` when not measured."""
    if cuda:
        return r.get("cuda_peak_bytes")
    if r.get("rss_before_bytes") is None or r.get("action_peak_growth_bytes") is None:
        return None
    return r["rss_before_bytes"] + r["action_peak_growth_bytes"]


def training_budget(res: dict) -> list[str]:
    """Markdown lines: each depth's (and each extrapolated size's) training-step peak split
    into a part that does not grow with the batch and one per sample, and the largest batch
    that fits :data:`GPU_BUDGETS_GIB`."""
    cuda = res["device"].startswith("cuda")
    peaks = {p["layers"]: {b: v for m, b in TRAIN_BATCH.items()
                           if (v := step_peak(p["measurements"].get(m, {}), cuda)) is not None} for p in res["points"]}
    params = {p["layers"]: p["params"] for p in res["points"]}
    rows: list[tuple[str, int | None, tuple[float, float]]] = [
        (f"{layers} layers (measured)", layers, f) for layers, per in peaks.items() if (f := batch_fit(per))]
    if not rows:
        return []
    # each batch size's step peak fitted a + b * params across depths, then split at each size
    across = {b: fit([params[layers] for layers in peaks if b in peaks[layers]],
                     [peaks[layers][b] for layers in peaks if b in peaks[layers]]) for b in TRAIN_BATCH.values()}
    across = {b: line for b, line in across.items() if line is not None}
    if all(line["b"] >= 0 for line in across.values()):  # a cost falling as the model grows is noise
        for name, ext in res["extrapolated"].items():
            split = batch_fit({b: line["a"] + line["b"] * ext["params"] for b, line in across.items()})
            if split:
                rows.append((f"{name} (extrapolated)", None, split))
    budgets = " | ".join(f"{g} GiB" for g in GPU_BUDGETS_GIB)
    out = ["", "## Training: fixed memory, memory per sample, largest batch", "",
           "The peak of one training step (" + ("CUDA `max_memory_allocated`" if cuda else
                                                "RSS before the step + its peak growth") +
           ") fitted as fixed + per sample x batch over the batch sizes "
           f"{sorted(TRAIN_BATCH.values())}; at LISA-7B/13B from each batch size's fit across depths "
           "(extrapolated); largest batch = (budget - fixed) / per sample.", "",
           f"| where | fixed | per sample | largest batch: {budgets} |", "| --- | --- | --- | " +
           " | ".join("---" for _ in GPU_BUDGETS_GIB) + " |"]
    for where, _layers, (fixed, per) in rows:
        out.append(f"| {where} | {_gib(fixed)} | {_gib(per)} | " +
                   " | ".join(largest_batch(fixed, per, g * 2**30) for g in GPU_BUDGETS_GIB) + " |")
    measured = [(layers, per) for _w, layers, (_f, per) in rows if layers is not None]
    if len(measured) >= 2:
        (l0, p0), (l1, p1) = measured[0], measured[-1]
        out += ["", f"One more sample costs {_gib((p1 - p0) / (l1 - l0))} more per LLM layer "
                f"(between {l0} and {l1} layers)."]
    shapes = sorted({tuple(p["measurements"][m]["input_ids_shape"]) for p in res["points"] for m in TRAIN_BATCH
                     if "input_ids_shape" in p["measurements"].get(m, {})})
    if shapes:
        out += ["", "Text per step (`input_ids`, before the image tokens are fused in): "
                + ", ".join(" x ".join(map(str, s)) for s in shapes) + "."]
    if not cuda:
        out += ["", "Measured on the CPU: the process's RSS includes the Python runtime and its libraries, "
                "and lacks a GPU's CUDA context and allocator slack; `--device cuda` measures the GPU itself."]
    return out


def markdown(res: dict) -> str:
    env = res["env"]
    lines = [f"# Scale benchmark ({res['widths']} widths, {res['device']})", "",
             f"{env['device']}; torch {env['versions'].get('torch')}, transformers "
             f"{env['versions'].get('transformers')}, commit {(env['git'].get('commit') or '?')[:10]}; "
             f"{env['date']}. Random bf16 weights, LLM depths {res['layers']}; each measurement in its own "
             "process. Peak = the process's peak RSS (VmHWM), loading included.", "",
             "## Measured", "",
             "| layers | params | measurement | wall s | peak RSS | RSS growth during action | CUDA peak |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for p in res["points"]:
        for m, r in p["measurements"].items():
            if "error" in r:
                lines.append(f"| {p['layers']} | {_count(p['params'])} | {m} | failed: "
                             f"{r['error'].strip().splitlines()[-1][:120]} | | | |")
                continue
            lines.append(f"| {p['layers']} | {_count(p['params'])} | {m} | {r['wall_s']:.2f} | "
                         f"{_gib(r.get('peak_rss_bytes'))} | {_gib(r.get('action_peak_growth_bytes'))} | "
                         f"{_gib(r.get('cuda_peak_bytes'))} |")
    lines += ["", "## Fit `a + b * params` and extrapolation", "",
              "**The LISA-7B and LISA-13B columns are extrapolated** from the depths above (least squares), "
              "not measured.", ""]
    names = list(res["extrapolated"])
    lines += ["| measurement | metric | a | b (per param) | r2 | " + " | ".join(f"{n} (extrapolated)" for n in names)
              + " |", "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in names) + " |"]
    two = False
    for m, per in res["fits"].items():
        for metric, f in per.items():
            unit = (lambda v: f"{v:.1f} s") if metric == "wall_s" else _gib
            two |= f.get("depths", 3) == 2
            # a cost that falls as the model grows is noise (a busy machine), not a trend
            ext = (["n/a (b < 0)"] * len(names) if f["b"] < 0 else
                   [unit(res["extrapolated"][n][m][metric]) for n in names])
            lines.append(f"| {m} | {metric} | {unit(f['a'])} | {f['b']:.3g} | {f['r2']:.4f} | " + " | ".join(ext) + " |")
    if two:
        lines += ["", "With two depths the line passes through both points: r2 = 1 by construction, and the "
                  "fit cannot show curvature or noise. Measure three or more depths for a check."]
    lines += questions_ratio(res)
    lines += training_budget(res)
    lines += ["", "params: " + ", ".join(f"{n} {_count(res['extrapolated'][n]['params'])}" for n in names)
              + " (computed from the widths, CLIP tower and SAM included)."]
    if res.get("notes"):
        lines += [""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


def run(a) -> dict:
    from lisa_kit.cli.export import _size

    device = a.device
    keep_work = a.workdir is not None or a.keep
    work = Path(a.workdir or tempfile.mkdtemp(prefix="lisa_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    shard = _size(a.max_shard_size or SHARD[a.widths])
    # the pieces LISA's tokenizer holds before lisa_kit adds its tokens (LLaMA's + LLaVA's pad)
    pieces = LISA_ROWS - len(LISA_ADDED)
    tokenizer = padded_tokenizer(pieces, work / "tokenizer") if a.widths == "real" else None
    clip = work / "clip-vit-large-patch14" if a.widths == "real" else work / "clip-vit-tiny-patch14"
    wanted = a.measure or list(MEASUREMENTS)
    notes = []
    points = []
    model = None
    try:
        for layers in sorted(set(a.layers)):
            model = meta_model(a.widths, layers, tokenizer)
            if a.widths == "real" and model.llm.vocab_size != LISA_ROWS:
                raise SystemExit(f"the model has {model.llm.vocab_size} vocabulary rows, LISA-7B {LISA_ROWS}")
            widths = _llm_widths(model)
            n = lisa_params(model, widths, layers)
            counted = sum(count(getattr(model, k)) for k in ("vision_encoder", "projector", "llm", "mask_decoder",
                                                                "seg_head", "fusion"))
            if n != counted:  # the formula extrapolates: it must count what the model holds
                raise SystemExit(f"parameter formula {n} != the model's {counted} at {layers} layers")
            point = work / f"layers_{layers}"
            t0 = time.perf_counter()
            print(f"[{layers} layers] generating {n / 1e9:.3f}B params ...", file=sys.stderr, flush=True)
            dirs = generate(model, point, clip, a.widths, shard)
            gen_s = time.perf_counter() - t0
            rec = {"layers": layers, "params": n, "generate_s": gen_s,
                   "checkpoint_bytes": {f: dir_bytes(d) for f, d in dirs.items()},
                   "clip_bytes": dir_bytes(clip), "measurements": {}}
            jobs = {m: (lambda m=m: _child(m, dirs, clip, device, a.answer_tokens, point, a.timeout))
                    for m in wanted if not (m in TRAIN_BATCH and a.train_layers and layers not in a.train_layers)}
            if a.original:
                jobs[ORIGINAL_LOAD] = lambda: _original(a.original, a.original_python or sys.executable,
                                                        dirs["lisa_hf_bin"], clip, device, a.timeout)
            for m, job in jobs.items():
                print(f"[{layers} layers] {m} ...", file=sys.stderr, flush=True)
                rec["measurements"][m] = r = job()
                print(f"[{layers} layers] {m}: " + (f"{r['wall_s']:.2f} s, peak {_gib(r['peak_rss_bytes'])}"
                                                    if "error" not in r else "FAILED"), file=sys.stderr, flush=True)
            points.append(rec)
            if not a.keep:
                shutil.rmtree(point, ignore_errors=True)
        if a.train_layers:
            notes.append(f"train measured at {sorted(a.train_layers)} layers only.")
        if not a.original:
            notes.append("original LISA not run (no --original checkout given).")
        targets = {name: lisa_params(model, w, depth) for name, (w, depth) in FULL_DEPTH.items()}
        fits, extrapolated = fits_and_extrapolation(points, targets)
        failed = sorted({m for p in points for m, r in p["measurements"].items() if "error" in r})
        if failed:
            notes.append(f"failed measurements (see results.json): {', '.join(failed)}")
        return {"widths": a.widths, "device": device, "dtype": "bfloat16", "layers": sorted(set(a.layers)),
                "max_shard_size": shard, "env": environment(device), "points": points, "fits": fits,
                "extrapolated": extrapolated, "extrapolated_note": "LISA-7B/13B values are extrapolated from the "
                "fit across the measured depths, not measured", "notes": notes}
    finally:
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4], help="LLM depths to generate and measure")
    ap.add_argument("--widths", choices=("real", "tiny"), default="real",
                    help="real: LLaMA-7B / CLIP ViT-L/14 / SAM ViT-H; tiny: the test components (seconds)")
    ap.add_argument("--out", default="benchmarks/results/scale_cpu", help="directory for results.json/.md")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--measure", nargs="+", choices=MEASUREMENTS, help="only these (default: all)")
    ap.add_argument("--train-layers", type=int, nargs="+", help="measure train only at these depths")
    ap.add_argument("--answer-tokens", type=int, default=4, help="forced answer length of seg ([SEG] last)")
    ap.add_argument("--max-shard-size", help=f"checkpoint shards (default {SHARD['real']} real, {SHARD['tiny']} tiny)")
    ap.add_argument("--original", metavar="PATH", help="checkout of dvlab-research/LISA: also time its from_pretrained")
    ap.add_argument("--original-python", metavar="PY", help="the interpreter of the original's environment")
    ap.add_argument("--workdir", help="where checkpoints are generated (kept; default a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per measurement")
    ap.add_argument("--report", metavar="RESULTS_JSON",
                    help="measure nothing: refit and rewrite results.json/.md (in --out) from this file")
    ap.add_argument("--note", action="append", default=[], help="a line added to the results' notes")
    ap.add_argument("--_measure", help=argparse.SUPPRESS)
    ap.add_argument("--_dirs", help=argparse.SUPPRESS)
    ap.add_argument("--_clip", help=argparse.SUPPRESS)
    ap.add_argument("--_work", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._measure:  # a child: one measurement, one JSON line
        dirs = {k: Path(v) for k, v in json.loads(a._dirs).items()}
        print(json.dumps(measure(a._measure, dirs, a._clip, a.device, a.answer_tokens, Path(a._work))))
        return 0
    if a.report:
        res = json.loads(Path(a.report).read_text())
        res["fits"], res["extrapolated"] = fits_and_extrapolation(
            res["points"], {n: v["params"] for n, v in res["extrapolated"].items()})
    else:
        res = run(a)
    res["notes"] = list(dict.fromkeys([*res.get("notes", []), *a.note]))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "results.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
