"""Conformance checks of one component: the contract of its kind, on CPU, at its tiny size.

:func:`check_component` builds a spec's ``tiny`` configuration, runs it through its kind's
interface (shapes and dtypes documented in :mod:`lisa_kit.interfaces`), compares its
``sizes`` function (if any) with the built module, saves it with safetensors and loads
it back into a second, differently initialised instance, which must then give identical
outputs, and builds it once more without memory (:func:`check_meta_build`: parameters on
the meta device, then the saved weights streamed in) with the same outputs. A failure raises :class:`ConformanceError` (an ``AssertionError``) naming the
component and what did not hold.

lisa_kit's own tests run it on every registered component (``tests/test_conformance.py``);
plugin authors run it on theirs with the pytest plugin::

    pytest --lisa-kit-conformance=my-dist      # a distribution or entry-point name

or call it from their own tests (``for spec in plugin_specs("my-dist"): check_component(spec)``).
"""
from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from lisa_kit.interfaces import BASES, SIZE_NAMES, ComponentSpec, VisionFeatures, per_image

__all__ = ["ConformanceError", "check_component", "check_meta_build", "build_tiny", "run_contract", "check_sizes", "plugin_specs",
           "matching_plugins"]

# Odd, non-square image sizes: preprocessing must not assume a shape.
_IMAGE_HW = ((37, 53), (60, 40))
_BATCH, _TOKENS, _SEG_ROWS, _PROMPTS = 2, 5, 4, 3
_GEOMETRY_POINTS = 3  # points per geometric prompt: foreground, background, padding
_FUSION_EMBED_DIM, _FUSION_FEATURES = 8, 5
_CACHE_TOL = 1e-5  # cached decoding vs a full pass, fp32
_DECODE_TOL = 1e-5  # one mask decoded with others vs alone, fp32 (batched matmuls may round differently)


class ConformanceError(AssertionError):
    """A component does not meet its kind's contract."""


def _check(condition: bool, label: str, message: str) -> None:
    if not condition:
        raise ConformanceError(f"{label}: {message}")


def _label(spec: ComponentSpec) -> str:
    return f"{spec.kind}:{spec.name}"


def _image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _close(a: torch.Tensor, b: torch.Tensor, label: str, what: str, **tol) -> None:
    try:
        torch.testing.assert_close(a, b, **tol)
    except AssertionError as exc:
        raise ConformanceError(f"{label}: {what}: {exc}") from None


def build_tiny(spec: ComponentSpec, seed: int = 0) -> torch.nn.Module:
    """The spec's ``tiny`` instance in eval mode, initialised from ``seed``.

    Built the way a recipe builds it (:func:`lisa_kit.builder.build_component`: ``@``
    assets resolved, the result checked against the kind's base class), through a
    registry holding only this spec, so the spec need not be installed."""
    import lisa_kit
    from lisa_kit.builder import build_component
    from lisa_kit.registry import Registry
    from lisa_kit.testing import resolve_tiny

    class _One:
        @lisa_kit.hookimpl
        def lisa_kit_components(self):
            return [spec]

    registry = Registry.empty()
    registry.register(_One(), name=spec.name, distribution="<conformance>")
    torch.manual_seed(seed)
    return build_component(spec.kind, {"name": spec.name, **resolve_tiny(spec.tiny)}, registry).eval()


def run_contract(kind: str, comp: torch.nn.Module, label: str | None = None) -> list[torch.Tensor]:
    """Run ``comp`` through the contract of ``kind``; returns the outputs a reloaded copy must reproduce."""
    label = label or f"{kind}:{type(comp).__name__}"
    if kind not in _CONTRACTS:
        raise ConformanceError(f"{label}: no conformance contract for kind {kind!r}")
    _check(isinstance(comp, BASES[kind]), label, f"built a {type(comp).__name__}, not a {BASES[kind].__name__}")
    return _CONTRACTS[kind](comp, label)


def _vision_encoder(comp, label):
    (h0, w0), (h1, w1) = _IMAGE_HW
    px = comp.preprocess(_image(h0, w0, 0))
    other = comp.preprocess(_image(h1, w1, 1))
    sized = comp.tokens_for((h0, w0)) is not None  # a token count that depends on the image
    if not sized:
        _check(isinstance(px, torch.Tensor) and px.dtype == torch.float32 and px.dim() == 3 and px.shape[0] == 3,
               label, f"preprocess(uint8 (H, W, 3)) must return float32 (3, h, w), got {_describe(px)}")
        _check(other.shape == px.shape, label, f"preprocess gives {tuple(px.shape)} for a {h0}x{w0} image but "
               f"{tuple(other.shape)} for {h1}x{w1}: every image must come out the same size")
    out = comp(comp.collate([px, other]))
    if isinstance(out, VisionFeatures):
        expected = [(comp.tokens_for(hw) if sized else comp.num_tokens, comp.feature_dim) for hw in _IMAGE_HW]
        got = [tuple(t.shape) for t in out.tokens]
        _check(got == expected and all(t.dtype == torch.float32 for t in out.tokens), label,
               f"forward(collate([a, b])) must return VisionFeatures of float32 (N_i, feature_dim) = {expected} "
               f"(N_i = tokens_for((H, W))), got {got}")
        return list(out.tokens)
    expected = (2, comp.num_tokens, comp.feature_dim)
    _check(tuple(out.shape) == expected and out.dtype == torch.float32, label,
           f"forward((2, 3, h, w)) must return float32 (I, num_tokens, feature_dim) = {expected}, got {_describe(out)}")
    return [out]


def _projector(comp, label):
    x = torch.randn(_BATCH, _TOKENS, comp.in_dim, generator=torch.Generator().manual_seed(0))
    out = comp(x)
    expected = (_BATCH, _TOKENS, comp.out_dim)
    _check(tuple(out.shape) == expected, label,
           f"forward((I, N, in_dim={comp.in_dim})) must return (I, N, out_dim) = {expected}, got {_describe(out)}")
    return [out]


def _seg_head(comp, label):
    out = comp(torch.randn(_SEG_ROWS, comp.in_dim, generator=torch.Generator().manual_seed(0)))
    expected = (_SEG_ROWS, comp.out_dim)
    _check(tuple(out.shape) == expected, label,
           f"forward((K, in_dim={comp.in_dim})) must return (K, out_dim) = {expected}, got {_describe(out)}")
    return [out]


def _llm(comp, label):
    tok = comp.tokenizer
    ids = torch.tensor([tok.encode_text("Can you segment the red circle in this image?")[:9]])
    emb = comp.embed(ids)
    expected = (1, ids.shape[1], comp.hidden_size)
    _check(tuple(emb.shape) == expected, label, f"embed((B, T)) must return (B, T, hidden_size) = {expected}, "
           f"got {_describe(emb)}")
    am = torch.ones_like(ids)
    full = comp(emb, attention_mask=am)
    _check(full.hidden.shape == emb.shape, label, f"forward: hidden must be (B, L, D) = {expected}, "
           f"got {_describe(full.hidden)}")
    _check(full.logits is not None and full.logits.shape[:2] == ids.shape, label,
           f"forward: logits must be (B, L, V) with (B, L) = {tuple(ids.shape)}, got {_describe(full.logits)}")
    # The cached path must agree with the full pass (generation relies on it).
    pre = comp(emb[:, :-1], attention_mask=am[:, :-1], use_cache=True)
    step = comp(emb[:, -1:], attention_mask=am, position_ids=torch.tensor([[ids.shape[1] - 1]]),
                cache=pre.cache, use_cache=True, logits="last")
    _close(step.logits[:, -1], full.logits[:, -1], label, "the last logits with the KV cache differ from a full pass",
           atol=_CACHE_TOL, rtol=_CACHE_TOL)
    return [full.logits]


def _mask_decoder(comp, label):
    h, w = _IMAGE_HW[0]
    px, meta = comp.preprocess(_image(h, w, 0))
    _check(tuple(px.shape) == (3, comp.image_size, comp.image_size), label,
           f"preprocess must return (3, S, S) with S = image_size = {comp.image_size}, got {_describe(px)}")
    _check(tuple(meta.original_size) == (h, w), label, f"ImageMeta.original_size must be {(h, w)}, "
           f"got {meta.original_size}")
    feats = comp.encode_image(px[None])
    _check(isinstance(feats, Mapping) and all(v.shape[0] == 1 for v in feats.values()), label,
           "encode_image((1, 3, S, S)) must return a dict of tensors with batch dimension 1, got "
           + (str({k: tuple(v.shape) for k, v in feats.items()}) if isinstance(feats, Mapping) else _describe(feats)))
    prompts = torch.randn(_PROMPTS, comp.prompt_dim, generator=torch.Generator().manual_seed(0))
    low, scores = comp.decode(feats, prompts)
    _check(tuple(low.shape[:2]) == (_PROMPTS, 1) and tuple(scores.shape) == (_PROMPTS, 1), label,
           f"decode(features, (M={_PROMPTS}, prompt_dim)) must return (M, 1, h', w') and (M, 1), "
           f"got {_describe(low)} and {_describe(scores)}")
    # Generation decodes all prompts of an image in one call: mask m may depend on prompt m only.
    for m in range(_PROMPTS):
        low_m, scores_m = comp.decode(feats, prompts[m:m + 1])
        _close((low_m, scores_m), (low[m:m + 1], scores[m:m + 1]), label,
               f"decode: prompt {m} decoded alone differs from prompt {m} decoded with {_PROMPTS - 1} others "
               "(the prompts of one call must be independent)", atol=_DECODE_TOL, rtol=_DECODE_TOL)
    masks = comp.postprocess(low, meta)
    _check(tuple(masks.shape) == (_PROMPTS, h, w) and masks.dtype == torch.float32, label,
           f"postprocess must return float32 (M, H, W) = {(_PROMPTS, h, w)} at the original size, "
           f"got {_describe(masks)}")
    geometry = _geometry(comp, label, feats, meta) if getattr(comp, "accepts_geometry", False) else []
    return [low, scores, masks, *geometry]


def _geometry_prompts(meta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_PROMPTS`` boxes ``(M, 4)`` and ``_GEOMETRY_POINTS`` points ``(M, K, 2)`` with labels
    ``(M, K)`` (one background point, one padding point) inside an image's input frame."""
    g = torch.Generator().manual_seed(1)
    hw = torch.tensor(meta.input_size[::-1], dtype=torch.float32)  # (w, h): x first
    corners = torch.rand(_PROMPTS, 2, 2, generator=g) * hw
    boxes = torch.cat([corners.min(1).values, corners.max(1).values], 1)
    points = torch.rand(_PROMPTS, _GEOMETRY_POINTS, 2, generator=g) * hw
    labels = torch.ones(_PROMPTS, _GEOMETRY_POINTS, dtype=torch.long)
    labels[:, 1], labels[:, -1] = 0, -1
    return boxes, points, labels


def _geometry(comp, label, feats, meta) -> list[torch.Tensor]:
    """``decode_geometry`` (decoders with ``accepts_geometry``): shapes for boxes and points
    together, boxes alone and points alone (boxes alone without ``accepts_points``), and
    each prompt alone equal to the batch."""
    boxes, points, labels = _geometry_prompts(meta)
    outs = []
    kinds = [("boxes only", (boxes, None, None))]
    if getattr(comp, "accepts_points", True):
        kinds = [("boxes and points", (boxes, points, labels)), *kinds, ("points only", (None, points, labels))]
    for what, args in kinds:
        low, scores = comp.decode_geometry(feats, *args)
        _check(tuple(low.shape[:2]) == (_PROMPTS, 1) and tuple(scores.shape) == (_PROMPTS, 1), label,
               f"decode_geometry with {what} (M={_PROMPTS}) must return (M, 1, h', w') and (M, 1), "
               f"got {_describe(low)} and {_describe(scores)}")
        for m in range(_PROMPTS):
            one = tuple(a[m:m + 1] if a is not None else None for a in args)
            _close(comp.decode_geometry(feats, *one), (low[m:m + 1], scores[m:m + 1]), label,
                   f"decode_geometry ({what}): prompt {m} decoded alone differs from prompt {m} decoded with "
                   f"{_PROMPTS - 1} others (the prompts of one call must be independent)",
                   atol=_DECODE_TOL, rtol=_DECODE_TOL)
        outs += [low, scores]
    masks = comp.postprocess(outs[0], meta)
    _check(tuple(masks.shape) == (_PROMPTS, *meta.original_size), label,
           f"postprocess of decode_geometry's logits must return (M, H, W) at the original size, got {_describe(masks)}")
    return outs


def _fusion(comp, label):
    from lisa_kit.testing import tiny_tokenizer_dir
    from lisa_kit.tokenizer import SentencePieceTokenizer

    tok = SentencePieceTokenizer.from_dir(tiny_tokenizer_dir())
    tok.add_special_tokens(comp.image_tokens())
    wrap = comp.wrap_image(tok)
    _check(wrap.count(comp.IMAGE_SLOT) == 1, label,
           f"wrap_image must contain IMAGE_SLOT ({comp.IMAGE_SLOT}) exactly once, got {wrap}")
    torch.manual_seed(0)  # the fusion has no weights: same inputs, same outputs
    embed = torch.nn.Embedding(len(tok), _FUSION_EMBED_DIM)
    feats = comp.example_features(3, _FUSION_FEATURES, _FUSION_EMBED_DIM)
    rows = [[7, *wrap, 9, 10], [7, *wrap, 11, *wrap, 12]]
    outs = []
    for side in ("right", "left"):
        T = max(map(len, rows))
        ids = torch.full((2, T), tok.pad_id)
        am = torch.zeros(2, T, dtype=torch.bool)
        for b, r in enumerate(rows):
            sl = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
            ids[b, sl], am[b, sl] = torch.tensor(r), True
        fb = comp.fuse(ids, am, None, feats, [[0], [1, 2]], embed, padding_side=side)
        for b in range(2):
            for t in range(T):
                p = int(fb.token_positions[b, t])
                if p >= 0:  # every text token sits where the fusion says it does
                    _close(fb.inputs_embeds[b, p], embed(ids[b, t]), label,
                           f"{side} padding: text token {t} of row {b} is not at token_positions = {p}")
        counts = [int(t.shape[0]) for t in per_image(feats)]  # image 0 in row 0, images 1 and 2 in row 1
        expected = sum(len(r) - r.count(comp.IMAGE_SLOT) for r in rows) + sum(counts)
        _check(int(fb.attention_mask.sum()) == expected, label,
               f"{side} padding: the fused attention mask covers {int(fb.attention_mask.sum())} positions, "
               f"expected {expected} (text tokens + every image's features)")
        outs.append(fb.inputs_embeds)
    return outs


_CONTRACTS = {"vision_encoder": _vision_encoder, "projector": _projector, "seg_head": _seg_head, "llm": _llm,
              "mask_decoder": _mask_decoder, "fusion": _fusion}


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).replace('torch.', '')} {tuple(x.shape)}"
    return repr(x) if len(repr(x)) < 80 else type(x).__name__


def check_sizes(spec: ComponentSpec, comp: torch.nn.Module) -> None:
    """``spec.sizes(**tiny)`` (when the spec has one) must name the kind's sizes and equal the built module's."""
    if spec.sizes is None:
        return
    from lisa_kit.testing import resolve_tiny

    label = _label(spec)
    sizes = spec.sizes(**resolve_tiny(spec.tiny))
    _check(isinstance(sizes, Mapping), label, f"sizes() must return a dict, got {sizes!r}")
    allowed = SIZE_NAMES[spec.kind]
    unknown = sorted(set(sizes) - set(allowed))
    _check(not unknown, label, f"sizes() returned {unknown}, which {spec.kind} does not have "
           f"(its sizes: {', '.join(allowed) or 'none'})")
    for name, value in sizes.items():
        actual = getattr(comp, name, None)
        _check(value == actual, label, f"sizes() says {name}={value} but the built component has {name}={actual}")


def check_component(spec: ComponentSpec, workdir: str | Path | None = None) -> None:
    """Every conformance check of ``spec`` (see the module docstring); ``workdir`` holds
    the saved weights (a temporary directory when ``None``). Raises :class:`ConformanceError`."""
    from safetensors.torch import load_file

    from lisa_kit.checkpoint.io import load_into, save_safetensors

    from lisa_kit.errors import LisaKitError

    label = _label(spec)
    try:
        comp = build_tiny(spec, seed=0)
    except LisaKitError as exc:  # e.g. tiny kwargs the build does not take, or the wrong base class
        raise ConformanceError(f"{label}: its tiny configuration {spec.tiny!r} does not build: {exc}") from exc
    with torch.no_grad():
        before = run_contract(spec.kind, comp, label)
    bad = sorted({str(p.dtype) for p in comp.parameters() if p.dtype != torch.float32})
    _check(not bad, label, f"the tiny instance must be float32 on CPU, has parameters in {', '.join(bad)}")
    _check(callable(getattr(comp, "export_config", None)), label,
           "components must have export_config() -> dict (a self-contained config for lisa_kit checkpoints)")
    _check(isinstance(comp.export_config(), dict), label, "export_config() must return a dict")
    check_sizes(spec, comp)
    check_reduced_precision(spec, comp)
    with tempfile.TemporaryDirectory(prefix="lisa_kit_conformance_") as tmp:
        f = Path(workdir or tmp) / f"{spec.kind}-{spec.name}.safetensors"
        save_safetensors(dict(comp.state_dict()), f)
        other = build_tiny(spec, seed=1)
        load_into(other, load_file(str(f)), spec.kind, strict=True)
    with torch.no_grad():
        after = run_contract(spec.kind, other, label)
    for i, (a, b) in enumerate(zip(before, after)):
        _close(a, b, label, f"output {i} differs after a safetensors save and load into a fresh instance",
               atol=0, rtol=0)
    check_meta_build(spec, comp, before, workdir)


def check_reduced_precision(spec: ComponentSpec, comp: torch.nn.Module,
                            dtype: torch.dtype = torch.bfloat16) -> None:
    """A mask decoder cast to ``dtype`` by the precision rule the loader applies
    (:func:`~lisa_kit.checkpoint.io.cast_component`: what ``fp32_prefixes`` declares keeps
    fp32, the rest takes ``dtype``) still runs its contract, with float32 mask logits; and
    ``spec.component_class``, which the load estimates read, is the class the build returns."""
    import copy

    from lisa_kit.checkpoint.io import cast_component

    label = _label(spec)
    cls = spec.component_class
    _check(cls is None or isinstance(comp, cls), label,
           f"component_class is {getattr(cls, '__name__', cls)!r} but the build returns {type(comp).__name__}")
    if spec.kind != "mask_decoder":
        return
    low = copy.deepcopy(comp)
    cast_component(low, dtype)
    try:
        with torch.no_grad():
            run_contract(spec.kind, low, label)
    except ConformanceError:
        raise
    except Exception as exc:  # the declared prefixes do not cover what must stay fp32
        raise ConformanceError(
            f"{label}: cast to {str(dtype).removeprefix('torch.')} by its fp32_prefixes "
            f"{tuple(getattr(comp, 'fp32_prefixes', ()))!r} it no longer runs ({type(exc).__name__}: {exc}); "
            "keep the parts that build float32 tensors at run time under fp32_prefixes") from exc


def check_meta_build(spec: ComponentSpec, comp: torch.nn.Module, expected: list,
                     workdir: str | Path | None = None) -> None:
    """The component builds without memory: under
    :func:`~lisa_kit.checkpoint.io.empty_weights` every parameter is on the meta device;
    streaming the saved state of ``comp`` (its tiny instance) into it leaves nothing on
    meta, and the buffers it made itself are right: its outputs equal ``expected`` (those
    of ``comp``) exactly. This is how checkpoints are loaded (a full-size model is never
    built with random weights first)."""
    from lisa_kit.checkpoint.io import empty_weights, load_file_into, save_safetensors
    from lisa_kit.errors import LisaKitError

    label = _label(spec)
    try:
        with empty_weights():
            empty = build_tiny(spec, seed=2)
    except Exception as exc:  # any failure here is the component's: report it as such
        raise ConformanceError(f"{label}: cannot be built without memory (parameters on the meta device): "
                               f"{type(exc).__name__}: {exc}") from exc
    real = [n for n, p in empty.named_parameters() if p.device.type != "meta"]
    _check(not real, label, f"built under empty_weights() it still allocates parameters ({', '.join(real[:3])}): "
           "create parameters as nn.Parameter attributes so the build costs no memory")
    try:
        with tempfile.TemporaryDirectory(prefix="lisa_kit_conformance_") as tmp:
            weights = Path(workdir or tmp) / f"{spec.kind}-{spec.name}-meta.safetensors"
            save_safetensors(dict(comp.state_dict()), weights)
            load_file_into(empty, weights, spec.kind, strict=True)
    except LisaKitError as exc:
        raise ConformanceError(f"{label}: its saved weights do not load into an instance built without memory: "
                               f"{exc}") from exc
    try:
        with torch.no_grad():
            after = run_contract(spec.kind, empty, label)
    except ConformanceError:
        raise
    except Exception as exc:  # e.g. a buffer computed from parameter values at build: still on meta
        raise ConformanceError(f"{label}: built without memory and loaded, it does not run: "
                               f"{type(exc).__name__}: {exc} (a buffer derived from parameter values in the build? "
                               "compute it in forward)") from exc
    for i, (a, b) in enumerate(zip(expected, after)):
        _close(a, b, label, f"output {i} differs when built without memory and loaded (a buffer the checkpoint "
               "does not hold is not re-created by the build?)", atol=0, rtol=0)


# -- selecting a plugin's components ----------------------------------------------------
def matching_plugins(selector: str, registry=None) -> list:
    """Plugins (:class:`~lisa_kit.registry.PluginInfo`, loaded or not) whose distribution
    or entry-point name is ``selector`` (``-``/``_``/``.`` and case are not told apart)."""
    from lisa_kit.registry import _canonical, get_registry

    registry = registry or get_registry()
    want = _canonical(selector)
    return [p for p in registry.plugins if want in (_canonical(p.distribution), _canonical(p.name))]


def plugin_specs(selector: str, registry=None) -> list[ComponentSpec]:
    """The component specs provided by the plugins :func:`matching_plugins` finds, by kind
    and name. Raises :class:`~lisa_kit.errors.PluginError` when none matches or one of them
    failed to load."""
    from lisa_kit.errors import PluginError
    from lisa_kit.registry import get_registry

    registry = registry or get_registry()
    plugins = matching_plugins(selector, registry)
    if not plugins:
        known = sorted({p.distribution for p in registry.plugins} | {p.name for p in registry.plugins})
        raise PluginError(f"no lisa_kit plugin has the distribution or entry-point name {selector!r}; "
                          f"installed: {', '.join(known) or '(none)'} (see `lisa-kit plugins`)")
    for p in plugins:
        if p.error or p.skipped:
            raise PluginError(f"plugin {p.describe()} is {p.status}" + (f"\n{p.traceback}" if p.traceback else ""))
    pairs = sorted({pair for p in plugins for pair in p.components})
    return [registry.get(kind, name) for kind, name in pairs]
