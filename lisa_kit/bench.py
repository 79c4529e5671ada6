"""Latency / memory / throughput benchmark of LisaModel variants (``lisa-kit bench``).

A *matrix* (YAML) names model variants (a recipe plus overrides) and scenarios (images
per batch, questions per image, forced answer length, image size; any of the first
three may be a list, which makes it a swept *axis*). Every (variant, scenario, point)
runs :func:`lisa_kit.generation.generate` -- the real inference path: prefill, one
KV-cached step per token, one mask per ``[SEG]`` -- with

* the answer **forced**: ``lisa_kit.generation._pick`` is replaced (only while the
  bench runs) by a function that returns a fixed filler token for ``answer_tokens - 1``
  steps and ``[SEG]`` last, so every row decodes exactly ``answer_tokens`` tokens and
  the mask path always runs once per question. A ``prompt_strategy: text_geometry``
  model has no ``[SEG]``: its forced answer is one well-formed answer in its own format
  (:meth:`~lisa_kit.geometry_answers.TextGeometry.write` of one object: the box around
  the image's central half and its centre point, in the format's frame), tokenised with
  the model's tokenizer, and the point's ``answer_tokens`` is that answer's length
  (the scenario's value is ignored for it); its questions are put in the recipe's
  instruction (``TextGeometry.ask``), as evaluation does;
* each stage **timed** by wrapping the model's stage callables on the instance (never
  the class): ``encode_vision`` (CLIP + projector), ``fusion.fuse``, the LLM's
  ``forward`` (prompt calls = prefill: one, or two when rows share an image prefix;
  one-token cached calls = decode steps),
  ``mask_decoder.encode_image``, ``seg_head.forward``, ``mask_decoder.decode`` (and
  ``decode_geometry``, the box/point path: both are ``mask_decode``),
  ``mask_decoder.postprocess``. Timers do not nest (an inner stage inside an outer one
  is not counted twice), so ``sum(stages) <= total``; the rest is reported as
  ``other`` (token bookkeeping, ``_pick``, embedding lookups, ``[SEG]`` gather/stack,
  tokenizer decode). On CUDA every boundary is ``torch.cuda.synchronize``-ed.

Clock: ``time.perf_counter``. Memory: CUDA -> ``torch.cuda.max_memory_allocated``
(peak during one measured call, and its growth over the memory allocated before);
CPU -> growth of the process's peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``)
during the point's runs, plus the current RSS (psutil) after them. The CPU number is a
high-water mark: it is 0 when the point stayed below an earlier peak.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lisa_kit.errors import InputError

# Stage keys in pipeline order; every point reports all of them.
STAGES = ("vision_encoder", "mask_encoder", "fusion", "llm_prefill", "llm_decode", "seg_head", "mask_decode",
          "postprocess")
DERIVED = ("other", "total", "decode_per_token")
AXES = ("questions_per_image", "batch_size", "answer_tokens")

TOP_KEYS = {"name", "description", "variants", "scenarios", "repeats", "warmup", "device", "dtype", "quality", "seed"}
VARIANT_KEYS = {"recipe", "overrides", "vocab_size", "description"}
SCENARIO_KEYS = {"name", "questions_per_image", "batch_size", "answer_tokens", "image_size"}
QUALITY_KEYS = {"dataset", "root", "limit", "mode", "max_new_tokens"}
SCENARIO_DEFAULTS = {"questions_per_image": 1, "batch_size": 1, "answer_tokens": 8, "image_size": 224}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


class BenchMatrixError(InputError):
    """A benchmark matrix is malformed; the message names the file and the key."""


# -- the matrix ---------------------------------------------------------------------
@dataclass
class Variant:
    name: str
    recipe: Any
    overrides: list[str] = field(default_factory=list)
    vocab_size: int | None = None


@dataclass
class Scenario:
    name: str
    questions_per_image: list[int]
    batch_size: list[int]
    answer_tokens: list[int]
    image_size: int | list[int]

    def axes(self) -> list[str]:
        return [a for a in AXES if len(getattr(self, a)) > 1]

    def points(self) -> list[dict]:
        return [dict(zip(AXES, combo), image_size=self.image_size)
                for combo in itertools.product(self.questions_per_image, self.batch_size, self.answer_tokens)]


@dataclass
class Matrix:
    variants: list[Variant]
    scenarios: list[Scenario]
    repeats: int = 5
    warmup: int = 1
    device: str = "auto"
    dtype: str = "fp32"
    quality: dict | None = None
    seed: int = 0
    name: str = "bench"
    source: str = "<dict>"

    def as_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "repeats": self.repeats, "warmup": self.warmup,
                "device": self.device, "dtype": self.dtype, "seed": self.seed, "quality": self.quality,
                "variants": {v.name: {"recipe": v.recipe if isinstance(v.recipe, str) else "<inline>",
                                      "overrides": v.overrides, "vocab_size": v.vocab_size} for v in self.variants},
                "scenarios": [s.__dict__ for s in self.scenarios]}


def _err(src: str, key: str, msg: str) -> BenchMatrixError:
    return BenchMatrixError(f"{src}: {key}: {msg}")


def _check_keys(src: str, where: str, node: Any, allowed: set[str]) -> dict:
    if not isinstance(node, dict):
        raise _err(src, where or "<top>", f"expected a mapping, got {type(node).__name__}")
    for k in node:
        if k not in allowed:
            key = f"{where}.{k}" if where else str(k)
            raise _err(src, key, f"unknown key {k!r}; allowed keys: {', '.join(sorted(allowed))}")
    return node


def _int_list(src: str, key: str, value: Any, minimum: int = 1) -> list[int]:
    vals = value if isinstance(value, list) else [value]
    if not vals:
        raise _err(src, key, "empty list")
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise _err(src, key, f"expected integers >= {minimum}, got {v!r}")
    return [int(v) for v in vals]


def parse_matrix(data: dict | str | os.PathLike, *, check_recipes: bool = True) -> Matrix:
    """Load and validate a matrix (a path or a mapping). Unknown or ill-typed keys raise
    :class:`BenchMatrixError` naming the file and the dotted key. ``check_recipes``
    also resolves every variant's recipe and overrides (no weights are built)."""
    src = "<dict>"
    if not isinstance(data, dict):
        import yaml

        src = str(data)
        try:
            data = yaml.safe_load(Path(data).read_text())
        except OSError as e:
            raise BenchMatrixError(f"cannot read benchmark matrix {src}: {e}") from None
        except yaml.YAMLError as e:
            raise BenchMatrixError(f"{src}: invalid YAML: {e}") from None
    top = _check_keys(src, "", data, TOP_KEYS)
    for req in ("variants", "scenarios"):
        if req not in top:
            raise _err(src, req, "missing (required)")
    variants = []
    vnode = top["variants"]
    if not isinstance(vnode, dict) or not vnode:
        raise _err(src, "variants", "expected a non-empty mapping {name: {recipe: ..., overrides: [...]}}")
    for name, node in vnode.items():
        node = _check_keys(src, f"variants.{name}", node, VARIANT_KEYS)
        if "recipe" not in node:
            raise _err(src, f"variants.{name}.recipe", "missing (required)")
        ov = node.get("overrides") or []
        if isinstance(ov, dict):  # {key: value} form
            ov = [f"{k}={json.dumps(v)}" for k, v in ov.items()]
        if not isinstance(ov, list) or not all(isinstance(o, str) for o in ov):
            raise _err(src, f"variants.{name}.overrides", "expected a list of 'key=value' strings")
        vs = node.get("vocab_size")
        if vs is not None:
            vs = _int_list(src, f"variants.{name}.vocab_size", vs)[0]
        variants.append(Variant(str(name), node["recipe"], list(ov), vs))
    snode = top["scenarios"]
    if not isinstance(snode, list) or not snode:
        raise _err(src, "scenarios", "expected a non-empty list of scenarios")
    scenarios = []
    for i, node in enumerate(snode):
        where = f"scenarios[{i}]"
        node = _check_keys(src, where, node, SCENARIO_KEYS)
        vals = {**SCENARIO_DEFAULTS, **node}
        sc = Scenario(
            name=str(node.get("name", f"scenario{i}")),
            questions_per_image=_int_list(src, f"{where}.questions_per_image", vals["questions_per_image"]),
            batch_size=_int_list(src, f"{where}.batch_size", vals["batch_size"]),
            answer_tokens=_int_list(src, f"{where}.answer_tokens", vals["answer_tokens"]),
            image_size=vals["image_size"])
        isz = _int_list(src, f"{where}.image_size", sc.image_size, minimum=8)
        if len(isz) not in (1, 2):
            raise _err(src, f"{where}.image_size", "an int or [height, width]")
        sc.image_size = isz[0] if len(isz) == 1 else isz
        scenarios.append(sc)
    names = [s.name for s in scenarios]
    if len(set(names)) != len(names):
        raise _err(src, "scenarios", f"scenario names must be unique, got {names}")
    repeats = _int_list(src, "repeats", top.get("repeats", 5))[0]
    warmup = _int_list(src, "warmup", top.get("warmup", 1), minimum=0)[0]
    dtype = str(top.get("dtype", "fp32"))
    if dtype not in DTYPES:
        raise _err(src, "dtype", f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    device = str(top.get("device", "auto"))
    quality = top.get("quality")
    if quality is not None:
        quality = dict(_check_keys(src, "quality", quality, QUALITY_KEYS))
        quality.setdefault("dataset", "synthetic:val")
        quality.setdefault("mode", "teacher")
        if quality["mode"] not in ("teacher", "generate"):
            raise _err(src, "quality.mode", f"teacher or generate, got {quality['mode']!r}")
    m = Matrix(variants, scenarios, repeats, warmup, device, dtype, quality, int(top.get("seed", 0)),
               str(top.get("name", Path(src).stem if src != "<dict>" else "bench")), src)
    if check_recipes:
        from lisa_kit.errors import LisaKitError
        from lisa_kit.recipes import check_recipe, load_recipe

        for v in variants:
            try:
                check_recipe(load_recipe(v.recipe, v.overrides), allow_missing=False)
            except LisaKitError as e:
                raise _err(src, f"variants.{v.name}", f"recipe does not resolve: {e}") from None
    return m


# -- timing -------------------------------------------------------------------------
class _StageTimer:
    """Accumulates wall time per stage for one call; stages do not nest."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.times: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self._depth = 0

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def stage(self, name: str):
        if self._depth:
            yield
            return
        self._depth += 1
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0
            self.counts[name] = self.counts.get(name, 0) + 1
            self._depth -= 1


@contextlib.contextmanager
def instrumented(model, timer_ref: list):
    """Wrap the model's stage callables on the instance; ``timer_ref[0]`` is the active
    :class:`_StageTimer` (or ``None``: no timing)."""
    saved: list[tuple[Any, str, bool, Any]] = []

    def wrap(obj, attr, stage_of):
        had = attr in obj.__dict__
        orig = getattr(obj, attr)

        def wrapped(*a, **k):
            t = timer_ref[0]
            if t is None:
                return orig(*a, **k)
            with t.stage(stage_of(a, k)):
                return orig(*a, **k)

        saved.append((obj, attr, had, obj.__dict__.get(attr)))
        setattr(obj, attr, wrapped)

    wrap(model, "encode_vision", lambda a, k: "vision_encoder")
    wrap(model, "encode_masks", lambda a, k: "mask_encoder")
    wrap(model.fusion, "fuse", lambda a, k: "fusion")
    # Decode steps feed one token through the cache; a prefill may take two calls (several
    # questions on one image: the shared prefix, then the rows' own tokens on its cache).
    wrap(model.llm, "forward", lambda a, k: "llm_decode" if k.get("cache") is not None
         and (a[0] if a else k["inputs_embeds"]).shape[1] == 1 else "llm_prefill")
    wrap(model.seg_head, "forward", lambda a, k: "seg_head")
    wrap(model.mask_decoder, "decode", lambda a, k: "mask_decode")
    wrap(model.mask_decoder, "decode_geometry", lambda a, k: "mask_decode")  # text_geometry models' mask path
    wrap(model.mask_decoder, "postprocess", lambda a, k: "postprocess")
    try:
        yield
    finally:
        for obj, attr, had, old in reversed(saved):
            if had:
                setattr(obj, attr, old)
            else:
                delattr(obj, attr)


@contextlib.contextmanager
def forced_answer(tokens: list[int]):
    """Make :func:`lisa_kit.generation.generate` pick ``tokens[step]`` at each step."""
    import lisa_kit.generation as gen

    orig = gen._pick
    step = [0]

    def pick(logits, cfg, generator):
        t = tokens[min(step[0], len(tokens) - 1)]
        step[0] += 1
        return torch.full((logits.shape[0],), t, dtype=torch.long, device=logits.device)

    gen._pick = pick
    try:
        yield step
    finally:
        gen._pick = orig


#: The forced text_geometry answer's object: the box spanning this central fraction of
#: the image on each side (centred), its point the image centre.
GEOMETRY_BOX_FRACTION = 0.5


def answer_tokens(model, n: int, image_size: tuple[int, int] | None = None) -> list[int]:
    """The forced answer's tokens. A ``[SEG]`` model: ``n`` tokens, ordinary text then
    ``[SEG]`` last. A ``text_geometry`` model (no ``[SEG]``; ``n`` is ignored): its own
    format's answer naming one object in an image of ``image_size`` ``(H, W)`` -- the box
    around the central :data:`GEOMETRY_BOX_FRACTION` of each side and the centre point,
    written by :meth:`~lisa_kit.geometry_answers.TextGeometry.write` in the recipe's frame --
    tokenised with the model's tokenizer, so the mask path decodes one mask per question."""
    tok = model.tokenizer
    geometry = getattr(model, "text_geometry", None)
    if geometry is not None:
        if image_size is None:
            raise InputError("a text_geometry model's forced answer needs the image size")
        h, w = image_size
        mx, my = w * (1 - GEOMETRY_BOX_FRACTION) / 2, h * (1 - GEOMETRY_BOX_FRACTION) / 2
        text = geometry.write([((mx, my, w - mx, h - my), [(w / 2, h / 2)])], (h, w))
        return tok.encode_text(text)
    special = {model.seg_token_id, tok.eos_id, tok.pad_id, getattr(tok, "bos_id", None)}
    filler = [t for t in tok.encode_text("Sure, it is the shape that answers the question") if t not in special] or [5]
    return [filler[i % len(filler)] for i in range(n - 1)] + [model.seg_token_id]


def _summary(xs: list[float]) -> dict:
    a = np.asarray(xs, dtype=float)
    return {"median": float(np.median(a)), "p10": float(np.percentile(a, 10)), "p90": float(np.percentile(a, 90)),
            "q1": float(np.percentile(a, 25)), "q3": float(np.percentile(a, 75)), "mean": float(a.mean()),
            "min": float(a.min()), "max": float(a.max()), "n": len(xs)}


def _maxrss_bytes() -> int:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def _rss_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover
        return None


def param_counts(model) -> dict[str, int]:
    """Parameters per component (and SAM's parts when it has them); ``total`` counts
    shared tensors once."""
    out = {}
    for name in ("vision_encoder", "projector", "llm", "mask_decoder", "seg_head", "fusion"):
        mod = getattr(model, name, None)
        out[name] = sum(p.numel() for p in mod.parameters()) if isinstance(mod, torch.nn.Module) else 0
    md = model.mask_decoder
    for part in ("image_encoder", "prompt_encoder", "mask_decoder"):
        sub = getattr(md, part, None)
        if isinstance(sub, torch.nn.Module):
            out[f"mask_decoder.{part}"] = sum(p.numel() for p in sub.parameters())
    out["total"] = sum(p.numel() for p in model.parameters())
    return out


# -- inputs -------------------------------------------------------------------------
def make_inputs(model, n_images: int, questions: int, image_size, seed: int = 0):
    """``n_images`` synthetic scenes with ``questions`` prompts each (one row per
    question; rows of an image are consecutive)."""
    from lisa_kit.conversation import IMAGE, Conversation, encode, recipe_template
    from lisa_kit.datasets.synthetic import SyntheticReasoningSet

    hw = tuple(image_size) if isinstance(image_size, (list, tuple)) else (image_size, image_size)
    ds = SyntheticReasoningSet(None, "val", image_size=hw, seed=seed, questions_per_image=max(questions, 1))
    template = recipe_template(model.recipe, model.tokenizer)
    slot_ids = model.fusion.wrap_image(model.tokenizer)
    geometry = getattr(model, "text_geometry", None)
    vis, sam, metas, prompts, rows = [], [], [], [], []
    for i in range(n_images):
        rec = ds[i % len(ds)] if len(ds) else None
        image = rec.image()
        texts = [t.text for t in rec.targets] or ["the shape"]
        vis.append(model.vision_encoder.preprocess(image))
        px, meta = model.mask_decoder.preprocess(image)
        sam.append(px)
        metas.append(meta)
        for q in range(questions):
            text = texts[q % len(texts)]
            question = f"{text} Please output segmentation mask."
            if geometry is not None:  # text box/point answers: the question inside the recipe's instruction
                question = geometry.ask(question)
            conv = Conversation(template).add([IMAGE, "\n" + question])
            prompts.append(encode(conv, model.tokenizer, slot_ids)[0])
            rows.append([i])
    return prompts, rows, model.vision_encoder.collate(vis), torch.stack(sam), metas


def resolve_device(name: str) -> torch.device:
    if name in ("auto", "", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} asked for but CUDA is not available")
    return dev


# -- measurement ----------------------------------------------------------------------
def measure_point(model, point: dict, *, repeats: int, warmup: int, device: torch.device, dtype: torch.dtype,
                  seed: int = 0) -> dict:
    """Time :func:`generate` on one point; returns per-stage summaries (seconds),
    throughput, memory and the decoded step count."""
    from lisa_kit.generation import GenerationConfig, generate
    from lisa_kit.interfaces import move_input

    B, Q, A = point["batch_size"], point["questions_per_image"], point["answer_tokens"]
    prompts, rows, vis, sam, metas = make_inputs(model, B, Q, point["image_size"], seed)
    # A VLM tower's collated input is its own dict (patches, grids): floats take the dtype.
    vis, sam = move_input(vis, device, dtype), sam.to(device, dtype)
    forced = answer_tokens(model, A, metas[0].original_size)
    A = len(forced)  # a text_geometry model's answer has its own length
    cfg = GenerationConfig(max_new_tokens=A)
    cuda = device.type == "cuda"
    timer_ref: list = [None]
    per_stage: dict[str, list[float]] = {s: [] for s in (*STAGES, *DERIVED)}
    counts: dict[str, int] = {}
    mem: dict[str, Any] = {}
    outs = None
    with instrumented(model, timer_ref), torch.inference_mode():
        for _ in range(warmup):
            with forced_answer(forced):
                generate(model, prompts, rows, vis, sam, metas, cfg)
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            hwm0 = _maxrss_bytes()
        for r in range(repeats):
            t = _StageTimer(cuda)
            timer_ref[0] = t
            with forced_answer(forced):
                t.sync()
                t0 = time.perf_counter()
                outs = generate(model, prompts, rows, vis, sam, metas, cfg)
                t.sync()
                total = time.perf_counter() - t0
            timer_ref[0] = None
            measured = sum(t.times.get(s, 0.0) for s in STAGES)
            for s in STAGES:
                per_stage[s].append(t.times.get(s, 0.0))
            per_stage["total"].append(total)
            per_stage["other"].append(max(total - measured, 0.0))
            steps = t.counts.get("llm_decode", 0)
            per_stage["decode_per_token"].append(t.times.get("llm_decode", 0.0) / steps if steps else 0.0)
            counts = dict(t.counts)
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated(device)
            mem = {"method": "torch.cuda.max_memory_allocated", "peak_bytes": int(peak),
                   "peak_over_baseline_bytes": int(peak - base), "baseline_bytes": int(base)}
        else:
            mem = {"method": "resource.getrusage(RUSAGE_SELF).ru_maxrss growth (process high-water mark; "
                             "0 = stayed below an earlier peak) + psutil RSS after",
                   "peak_over_baseline_bytes": max(_maxrss_bytes() - hwm0, 0), "rss_after_bytes": _rss_bytes()}
    n_masks = sum(len(o.masks) for o in outs) if outs is not None else 0
    med_total = statistics.median(per_stage["total"])
    return {
        **{k: point[k] for k in (*AXES, "image_size")}, "answer_tokens": A,
        "rows": len(prompts), "prompt_tokens": max(len(p) for p in prompts),
        "decode_steps": counts.get("llm_decode", 0), "calls": counts, "masks": n_masks,
        "stages": {s: _summary(v) for s, v in per_stage.items()},
        "throughput": {"queries_per_s": len(prompts) / med_total, "images_per_s": B / med_total,
                       "tokens_per_s": len(prompts) * A / med_total},
        "memory": mem,
    }


def measure_quality(model, quality: dict, device) -> dict:
    from lisa_kit.datasets import open_dataset
    from lisa_kit.evaluate import Evaluator, parse_dataset

    name, split = parse_dataset(quality.get("dataset", "synthetic:val"))
    reader = open_dataset(name, quality.get("root"), split)
    mode = quality.get("mode", "teacher")
    res = Evaluator(model, reader, (mode,), limit=quality.get("limit"),
                    max_new_tokens=quality.get("max_new_tokens", 32), progress=False).run()
    a = res[mode]["all"]
    return {"dataset": f"{name}:{split}", "mode": mode, "giou": a["giou"], "ciou": a["ciou"],
            "n_queries": a.get("n_queries"), "n_samples": a.get("n_samples")}


def environment(device: torch.device) -> dict:
    from lisa_kit.provenance import versions

    env = {"versions": versions(), "python": platform.python_version(), "platform": platform.platform(),
           "device": str(device), "torch_threads": torch.get_num_threads()}
    env["git_commit"] = env["versions"].get("git_commit")
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    env["device_name"] = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        env["cpu_count"] = os.cpu_count()
    return env


def run_matrix(matrix: Matrix, out: str | os.PathLike | None = None, *, log=print, variants: list[str] | None = None,
               plots: bool = True) -> dict:
    """Run every variant x scenario x point; write ``results.json``, ``results.md`` and
    the plots into ``out`` (when given); return the results dict."""
    from lisa_kit.builder import load

    device = resolve_device(matrix.device)
    dtype = DTYPES[matrix.dtype]
    results = {"matrix": matrix.as_dict(), "environment": environment(device), "variants": {}, "points": [],
               "stage_keys": list(STAGES), "derived_keys": list(DERIVED), "units": "seconds",
               "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    chosen = [v for v in matrix.variants if not variants or v.name in variants]
    if variants and len(chosen) != len(set(variants)):
        missing = sorted(set(variants) - {v.name for v in matrix.variants})
        raise InputError(f"unknown variant(s) {missing}; the matrix has {[v.name for v in matrix.variants]}")
    for v in chosen:
        torch.manual_seed(matrix.seed)
        t0 = time.perf_counter()
        low = dtype if dtype != torch.float32 else None
        model = load(v.recipe, v.overrides, dtype=low)  # checkpoint tensors cast once, as they stream in
        if v.vocab_size and v.vocab_size > model.llm.vocab_size:
            model.llm.resize_vocab(v.vocab_size)  # real-size embedding / lm_head for a stand-in tokenizer
        model = model.eval()
        if low is not None:
            # Random-weight recipes and resized rows: the API's rule (parts a component declares,
            # e.g. SAM's prompt encoder, stay fp32; a part already in `dtype` is not copied).
            from lisa_kit.api import _cast

            _cast(model, low)
        model.to(device)
        build_s = time.perf_counter() - t0
        info = {"recipe": v.recipe if isinstance(v.recipe, str) else "<inline>", "overrides": v.overrides,
                "params": param_counts(model), "build_s": build_s}
        log(f"[{v.name}] built in {build_s:.1f}s, {info['params']['total'] / 1e6:.2f}M parameters")
        if matrix.quality:
            info["quality"] = measure_quality(model, matrix.quality, device)
            log(f"[{v.name}] quality {info['quality']['dataset']} [{info['quality']['mode']}]: "
                f"gIoU {info['quality']['giou']:.4f} cIoU {info['quality']['ciou']:.4f}")
        results["variants"][v.name] = info
        for sc in matrix.scenarios:
            for point in sc.points():
                r = measure_point(model, point, repeats=matrix.repeats, warmup=matrix.warmup, device=device,
                                  dtype=dtype, seed=matrix.seed)
                r = {"variant": v.name, "scenario": sc.name, "axes": sc.axes(), **r}
                results["points"].append(r)
                log(f"[{v.name}/{sc.name}] B={r['batch_size']} Q={r['questions_per_image']} "
                    f"A={r['answer_tokens']}: total {r['stages']['total']['median'] * 1e3:.1f} ms "
                    f"({r['throughput']['queries_per_s']:.1f} q/s)")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if out is not None:
        write_outputs(results, out, plots=plots)
    return results


# -- reporting ----------------------------------------------------------------------
def _ms(x: float) -> str:
    return f"{x * 1e3:.2f}"


def _mb(x) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def markdown(results: dict) -> str:
    env = results["environment"]
    m = results["matrix"]
    lines = [f"# lisa-kit bench: {m['name']}", "",
             f"Device: **{env['device_name']}** (`{env['device']}`, {env.get('torch_threads')} torch threads), "
             f"dtype {m['dtype']}; torch {env['versions'].get('torch')}, transformers "
             f"{env['versions'].get('transformers')}, lisa_kit {env['versions'].get('lisa_kit')}, "
             f"commit `{(env.get('git_commit') or '?')[:10]}`. Repeats {m['repeats']} (warm-up {m['warmup']}); "
             "times are medians in ms, spread p10-p90 of the total. B = images, Q = questions per image, "
             "A = forced answer tokens ([SEG] last).", "", "## Parameters", "",
             "| variant | vision | projector | LLM | mask decoder (image enc.) | seg head | total |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, v in results["variants"].items():
        p = v["params"]
        lines.append(f"| {name} | {p['vision_encoder']:,} | {p['projector']:,} | {p['llm']:,} | "
                     f"{p['mask_decoder']:,} ({p.get('mask_decoder.image_encoder', 0):,}) | {p['seg_head']:,} | "
                     f"{p['total']:,} |")
    q = {n: v["quality"] for n, v in results["variants"].items() if v.get("quality")}
    if q:
        lines += ["", "## Quality", "", "| variant | dataset | mode | gIoU | cIoU | queries |",
                  "| --- | --- | --- | ---: | ---: | ---: |"]
        for n, r in q.items():
            lines.append(f"| {n} | {r['dataset']} | {r['mode']} | {r['giou']:.4f} | {r['ciou']:.4f} | "
                         f"{r['n_queries']} |")
    cols = ["vision", "mask enc", "fusion", "prefill", "decode (steps)", "ms/token", "seg head", "mask dec",
            "post", "other", "total (p10-p90)", "q/s", "img/s", "peak MB"]
    lines += ["", "## Latency", "", "| variant | scenario | B | Q | A | " + " | ".join(cols) + " |",
              "| --- | --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in cols) + " |"]
    for r in results["points"]:
        s = {k: v["median"] for k, v in r["stages"].items()}
        t = r["stages"]["total"]
        cells = [_ms(s["vision_encoder"]), _ms(s["mask_encoder"]), _ms(s["fusion"]), _ms(s["llm_prefill"]),
                 f"{_ms(s['llm_decode'])} ({r['decode_steps']})", _ms(s["decode_per_token"]), _ms(s["seg_head"]),
                 _ms(s["mask_decode"]), _ms(s["postprocess"]), _ms(s["other"]),
                 f"{_ms(t['median'])} ({_ms(t['p10'])}-{_ms(t['p90'])})",
                 f"{r['throughput']['queries_per_s']:.1f}", f"{r['throughput']['images_per_s']:.1f}",
                 _mb(r["memory"].get("peak_bytes", r["memory"].get("peak_over_baseline_bytes")))]
        lines.append(f"| {r['variant']} | {r['scenario']} | {r['batch_size']} | {r['questions_per_image']} | "
                     f"{r['answer_tokens']} | " + " | ".join(cells) + " |")
    mem = results["points"][0]["memory"]["method"] if results["points"] else ""
    lines += ["", f"Peak memory: {mem}.", ""]
    return "\n".join(lines)


def plot(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    pts = results["points"]
    if not pts:
        return written
    # Latency breakdown: the first point of each (variant, scenario), stacked by stage.
    first: dict[tuple, dict] = {}
    for r in pts:
        first.setdefault((r["variant"], r["scenario"]), r)
    keys = list(first)
    stages = [*STAGES, "other"]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(keys) + 3), 5))
    bottom = np.zeros(len(keys))
    cmap = plt.get_cmap("tab10")
    for i, s in enumerate(stages):
        vals = np.array([first[k]["stages"][s]["median"] * 1e3 for k in keys])
        ax.bar(range(len(keys)), vals, bottom=bottom, label=s, color=cmap(i % 10))
        bottom += vals
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{v}\n{s}\nB{first[(v, s)]['batch_size']} Q{first[(v, s)]['questions_per_image']} "
                        f"A{first[(v, s)]['answer_tokens']}" for v, s in keys], fontsize=7)
    ax.set_ylabel("median latency (ms)")
    ax.set_title(f"stage breakdown ({results['environment']['device_name']})", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    p = out / "latency_breakdown.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    written.append(p)
    # Scaling per swept axis.
    for axis in AXES:
        groups: dict[tuple, list[dict]] = {}
        for r in pts:
            if axis in r["axes"]:
                fixed = tuple((a, r[a]) for a in AXES if a != axis and a in r["axes"])
                groups.setdefault((r["variant"], r["scenario"], fixed), []).append(r)
        if not groups:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (v, s, fixed), rs in groups.items():
            rs = sorted(rs, key=lambda r: r[axis])
            x = [r[axis] for r in rs]
            y = np.array([r["stages"]["total"]["median"] * 1e3 for r in rs])
            lo = y - np.array([r["stages"]["total"]["p10"] * 1e3 for r in rs])
            hi = np.array([r["stages"]["total"]["p90"] * 1e3 for r in rs]) - y
            label = f"{v} / {s}" + "".join(f" {a}={val}" for a, val in fixed)
            ax.errorbar(x, y, yerr=[np.maximum(lo, 0), np.maximum(hi, 0)], marker="o", capsize=3, label=label)
        ax.set_xlabel(axis)
        ax.set_ylabel("total latency, median (ms), p10-p90")
        ax.set_title(f"scaling with {axis}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        p = out / f"scaling_{axis}.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append(p)
    return written


def write_outputs(results: dict, out: str | os.PathLike, plots: bool = True) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "results.json", "md": out / "results.md"}

    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    files["json"].write_text(json.dumps(clean(results), indent=2))
    files["md"].write_text(markdown(results))
    if plots:
        for p in plot(results, out):
            files[p.stem] = p
    return files
