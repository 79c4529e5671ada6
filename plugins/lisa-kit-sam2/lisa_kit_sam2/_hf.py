"""Helpers shared by the transformers-backed decoders (``hf_sam``, ``sam_hq``, ``sam2``,
``edgetam``, ``sam3``): checked ``from_pretrained``, config dicts, the pixel arithmetic of
transformers' torchvision image processors, box/point prompts through the model's own
prompt encoder, and the handling of a released LISA checkpoint's SAM weights."""
from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from lisa_kit.errors import CheckpointError, InputError, RecipeError
from lisa_kit.interfaces import ImageMeta

# transformers' IMAGENET_DEFAULT_MEAN / _STD: what both the SAM and the SAM2 processors use.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# transformers' IMAGENET_STANDARD_MEAN / _STD: what the SAM 3 processor uses.
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
RESCALE_FACTOR = 1 / 255
DEFAULT_WIDTH = 256  # SamMaskDecoderConfig / Sam2MaskDecoderConfig hidden_size: SAM's and SAM2's prompt size
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class DecoderConfigError(RecipeError, ValueError):
    """A decoder's ``variant``/``config``/``pretrained`` arguments do not describe a model.
    A :class:`RecipeError` (the CLI prints one line) and a ``ValueError`` (what these
    builders raised before it existed)."""

    def __init__(self, message: str):
        super().__init__(message, key="model.mask_decoder")


class ForeignWeightsWarning(UserWarning):
    """A checkpoint's weights belong to another decoder (a released LISA checkpoint holds
    SAM's) and were not loaded."""


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``; nested dicts merge key by key (a copy is returned)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# The component attribute that holds the transformers model: its state-dict keys are the
# model's under this prefix (what `fp32_prefixes` and `normalize_keys` name).
MODEL_PREFIX = "model."


def load_pretrained(model_cls, path: str, component: str, model_types: tuple[str, ...] = (),
                    dtype: torch.dtype | None = None, owner=None):
    """``model_cls.from_pretrained(path)`` from a local directory, refusing anything that
    does not fit exactly: a missing directory or file, a ``config.json`` whose
    ``model_type`` is not one of ``model_types`` (when given), or weights with missing,
    unexpected or mis-shaped keys raise :class:`CheckpointError` naming the path
    (transformers would only warn and leave those tensors randomly initialised).

    ``dtype``: the precision asked for (``None``: fp32, transformers' default, as before).
    Each tensor is read once, straight into the dtype that
    :func:`lisa_kit.checkpoint.io.param_dtype` gives its key under ``owner`` (the component
    class, holding the model as ``model.``; ``None``: a rule that keeps nothing): what
    ``owner.fp32_prefixes`` keeps is read in fp32, everything else in ``dtype``. The
    result is bit-identical to loading in fp32 and casting by that rule afterwards
    (:func:`~lisa_kit.checkpoint.io.cast_component`), without ever holding an fp32 copy of
    the large image encoder, and once loaded nothing keeps the checkpoint file mapped
    (:func:`_copy_kept`): see :func:`_reading_class` for why transformers' own loader is
    steered rather than lisa_kit's streaming loader used."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise CheckpointError(f"pretrained directory not found: {p}", component=component, file=p)
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{p} has no config.json (expected a directory written by "
                              f"{model_cls.__name__}.save_pretrained)", component=component, file=p / "config.json")
    if not any((p / f).is_file() for f in WEIGHT_FILES):
        raise CheckpointError(f"no weights in {p} (looked for {', '.join(WEIGHT_FILES)})",
                              component=component, file=p)
    found = _model_type(p / "config.json")
    # transformers only warns, and where the weights happen to fit builds the other model in
    # this class's clothing (a SAM2 directory gives EdgeTamModel a Hiera trunk).
    if model_types and found is not None and found not in model_types:
        raise CheckpointError(f"{p} holds a {found!r} model, not {' or '.join(map(repr, model_types))} "
                              f"({model_cls.__name__})", component=component, file=p / "config.json")
    from lisa_kit.checkpoint.io import cast_component
    from lisa_kit.checkpoint.safe import hf_load

    reader, read_kwargs = _reading_class(model_cls, owner, dtype)
    # Mis-shaped tensors are reported below, by key, rather than as transformers' error.
    model, info = hf_load(reader.from_pretrained, p, component=component, what=model_cls.__name__,
                          output_loading_info=True, ignore_mismatched_sizes=True, **read_kwargs)
    problems, first = [], None
    for label in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        entries = sorted(info.get(label) or (), key=str)
        if not entries:
            continue
        keys = [e[0] if isinstance(e, tuple) else str(e) for e in entries]
        first = first or keys[0]
        shown = [f"{e[0]} (checkpoint {tuple(e[1])}, model {tuple(e[2])})" if isinstance(e, tuple) and len(e) == 3
                 else str(k) for e, k in zip(entries, keys)]
        problems.append(f"{label.replace('_', ' ')}: {len(keys)} (e.g. {', '.join(shown[:5])})")
    if problems:
        raise CheckpointError(f"the weights in {p} do not fit {model_cls.__name__}: " + "; ".join(problems),
                              component=component, key=first, file=p)
    if reader is not model_cls:
        model.__class__ = model_cls  # the reader only adds its dtype plan: a plain model_cls from here on
        _check_kept(model, owner, dtype, component, p)
        _copy_kept(model, owner, dtype)
        # Down to the rule: tie sources read wide for a kept tie target, and any tensor
        # transformers builds in fp32 whatever the dtype (a no-op where the read placed all).
        cast_component(_RuleView(model, owner), dtype)
        _record_build_dtype(model.config, dtype)
    return model


def _reading_class(model_cls, owner, dtype: torch.dtype | None) -> tuple[type, dict]:
    """``(class, kwargs)`` whose ``from_pretrained(path, **kwargs)`` reads each tensor once
    into the dtype :func:`~lisa_kit.checkpoint.io.param_dtype` gives its key under ``owner``
    (kept keys: the precision a load without ``dtype`` builds in, fp32); ``(model_cls, {})``
    where nothing is asked or the rule keeps the whole model (read as before).

    transformers' ``from_pretrained(dtype=...)`` casts every floating tensor as it reads it
    (a few tensors in flight, never an fp32 copy of the model); its one per-tensor exception
    is the model's dtype plan (``_get_dtype_plan``, where ``_keep_in_fp32_modules_strict``
    goes), which these models leave empty. A subclass whose plan names, anchored, every key
    the rule keeps makes transformers read exactly those in fp32. Not taken: loading in
    ``dtype`` and upcasting the kept parts afterwards (not exact: their bf16 rounding would
    stay), and building under ``empty_weights`` to stream with ``load_file_into`` as
    ``build_timm`` does (it would restate what ``from_pretrained`` does for these models:
    the official SAM 3 checkpoint's ``detector_model.`` prefix, the tracker and video keys it
    ignores, tied embeddings; for no saving in memory). A transformers without dtype plans
    gets the old read (fp32, cast afterwards): correct, only not lean."""
    from lisa_kit.checkpoint.io import param_dtype

    # Every key lies under MODEL_PREFIX: when the rule keeps that prefix it keeps every key.
    if dtype is None or param_dtype(owner, MODEL_PREFIX, dtype) is None or not hasattr(model_cls, "_get_dtype_plan"):
        return model_cls, {}
    build = torch.get_default_dtype()  # what from_pretrained without `dtype` builds and reads in

    def _get_dtype_plan(self, requested: torch.dtype) -> dict:
        # The component's rule replaces the class's plan: a plain fp32 load and cast (what this
        # must equal) knows nothing of the class's keep-in-fp32 modules either.
        keep = {k for k, t in self.state_dict().items()
                if t.is_floating_point() and param_dtype(owner, MODEL_PREFIX + k, requested) is None}
        # A tied key is not read but copied from its source after the read (SAM's prompt
        # encoder's positional matrix from the image embedding's): a kept one needs its
        # source read wide too, then cast down by the rule (exact) once the tie is made.
        ties = getattr(self, "all_tied_weights_keys", None) or {}
        keep |= {source for target, source in ties.items() if target in keep}
        return {f"^{re.escape(k)}$": build for k in keep}

    reader = type(model_cls.__name__, (model_cls,), {"_get_dtype_plan": _get_dtype_plan,
                                                     "__module__": model_cls.__module__})
    return reader, {"dtype": dtype}


class _RuleView(nn.Module):
    """A bare transformers ``model`` seen as ``owner`` holds it (under ``MODEL_PREFIX``, with
    its ``fp32_prefixes``), for :func:`~lisa_kit.checkpoint.io.cast_component`."""

    def __init__(self, model: nn.Module, owner):
        from lisa_kit.checkpoint.io import fp32_prefixes

        super().__init__()
        self.model = model
        self.fp32_prefixes = fp32_prefixes(owner)


def _check_kept(model, owner, dtype: torch.dtype, component: str, path: Path) -> None:
    """Refuse a read in which a tensor the rule keeps came back narrower (a transformers
    whose loader ignored the dtype plan): upcasting it now would not restore its bits."""
    from lisa_kit.checkpoint.io import param_dtype

    build = torch.get_default_dtype()
    for k, t in model.state_dict().items():
        if t.is_floating_point() and param_dtype(owner, MODEL_PREFIX + k, dtype) is None and t.dtype != build:
            raise CheckpointError(f"{component}: {k} was read in {t.dtype}, not {build} as the component keeps it "
                                  f"(this transformers did not apply the per-tensor dtype plan); load without "
                                  f"a dtype and cast afterwards", component=component, key=k, file=path)


def _copy_kept(model, owner, dtype: torch.dtype) -> None:
    """Give the kept tensors memory of their own. transformers copies a tensor only to cast
    it: one the checkpoint already stores in fp32 comes back as a view of the memory-mapped
    file, and a single view keeps the whole mapping, the encoder's fp32 bytes included,
    resident for the model's life (measured: SAM 3 with a 150M-parameter ViT kept 600 MiB
    of file pages beside its 300 MiB of bf16 weights). The kept part is the small one."""
    from lisa_kit.checkpoint.io import param_dtype

    with torch.no_grad():
        for prefix, mod in model.named_modules():
            pre = MODEL_PREFIX + (f"{prefix}." if prefix else "")
            for name, t in mod._parameters.items():
                if t is not None and t.is_floating_point() and param_dtype(owner, pre + name, dtype) is None:
                    t.data = t.data.clone()
            for name, t in mod._buffers.items():
                if (t is not None and t.is_floating_point() and name not in mod._non_persistent_buffers_set
                        and param_dtype(owner, pre + name, dtype) is None):
                    mod._buffers[name] = t.clone()


def _record_build_dtype(config, read: torch.dtype) -> None:
    """``from_pretrained(dtype=read)`` records ``read`` on the config and its sub-configs (at
    every depth where a model is built from one); a model read partly in fp32 keeps the
    record of a plain read there (the default dtype), as before: a config exported from the
    component rebuilds sub-models in the recorded dtype (a random build would otherwise come
    out part bf16). Records the read did not make (``None``) are left as they are."""
    if getattr(config, "dtype", None) == read:
        config.dtype = torch.get_default_dtype()
    for name in getattr(config, "sub_configs", {}):
        sub = getattr(config, name, None)
        if sub is not None:
            _record_build_dtype(sub, read)


def make_config(config_cls, config: dict, component: str):
    """``config_cls(**config)``, its errors typed (:class:`DecoderConfigError` naming the
    component); ``model_type`` (written by ``export_config``) is dropped."""
    cfg = {k: v for k, v in config.items() if k != "model_type"}
    try:
        return config_cls(**cfg)
    except (TypeError, ValueError, KeyError) as e:
        raise DecoderConfigError(f"invalid {config_cls.__name__} for {component}: {type(e).__name__}: {e}") from e


def build_model(model_cls, make_config, variants: dict, variant: str | None, pretrained: str | None,
                config: dict | None, component: str, model_types: tuple[str, ...] = (),
                dtype: torch.dtype | None = None, owner=None):
    """The transformers model a decoder's build arguments describe: ``pretrained`` (a local
    directory of one of ``model_types``, loaded strictly by :func:`load_pretrained`, each
    tensor read into the dtype ``owner``'s rule gives it for ``dtype``), or random weights
    of ``make_config(config over the variant's)`` (fp32 whatever ``dtype``: the caller casts).
    Wrong combinations and unknown variants raise :class:`DecoderConfigError`."""
    name = component.split(":")[-1]
    if pretrained is not None:
        if variant is not None or config is not None:
            raise DecoderConfigError(f"{name}: give either `pretrained` or `variant`/`config`, not both")
        return load_pretrained(model_cls, pretrained, component, model_types, dtype=dtype, owner=owner)
    if variant is not None and variant not in variants:
        raise DecoderConfigError(f"unknown {name} variant {variant!r}; available: {', '.join(variants)}")
    if variant is None and config is None:
        raise DecoderConfigError(f"{name} needs `pretrained` (a {model_cls.__name__} directory), `variant` or `config`")
    return model_cls(make_config(deep_merge(variants.get(variant, {}), config or {})))


def build_decoder(decoder_cls, model_cls, make_config, variants: dict, variant: str | None, pretrained: str | None,
                  config: dict | None, model_types: tuple[str, ...], dtype=None, mean: list[float] | None = None,
                  std: list[float] | None = None, **kwargs):
    """``decoder_cls(model, mean=, std=, **kwargs)`` around the transformers model
    :func:`build_model` gives (``dtype`` resolved, ``decoder_cls``'s rule); ``mean``/``std``
    default to the ``pretrained`` directory's ``preprocessor_config.json``, else ImageNet's."""
    from lisa_kit.components._util import resolve_dtype

    model = build_model(model_cls, make_config, variants, variant, pretrained, config, decoder_cls.component,
                        model_types, dtype=resolve_dtype(dtype), owner=decoder_cls)
    pre = read_preprocessor(pretrained)
    return decoder_cls(model, mean=mean or pre.get("image_mean", IMAGENET_MEAN),
                       std=std or pre.get("image_std", IMAGENET_STD), **kwargs)


def sam_weights_or_none(state: dict, component: str, label: str, warning_cls: type[UserWarning],
                        is_sam) -> dict | None:
    """``normalize_keys`` of a decoder that cannot use SAM's weights: when ``is_sam(state)``
    (a released LISA checkpoint's SAM ViT decoder), warn and return ``None`` (the importer
    then leaves the decoder as built, with the weights of its own ``pretrained``); other
    keys get the ``model.`` prefix of the wrapped transformers model."""
    if is_sam(state):
        warnings.warn(f"{component}: the checkpoint's SAM (ViT) mask-decoder weights do not apply to {label} and are "
                      f"not loaded; {label} keeps the weights of model.mask_decoder.pretrained, and the checkpoint's "
                      "seg head was trained for SAM, so train before use", warning_cls, stacklevel=3)
        return None
    return {k if k.startswith("model.") else f"model.{k}": v for k, v in state.items()}


def _model_type(config_json: Path) -> str | None:
    """``model_type`` of a ``config.json``; ``None`` when unreadable (``from_pretrained`` then
    reports it)."""
    import json

    try:
        value = json.loads(config_json.read_text())
    except (OSError, ValueError):
        return None
    return value.get("model_type") if isinstance(value, dict) else None


def decoder_width(variants: dict, variant: str | None, pretrained: str | None, config: dict | None) -> dict:
    """``{"prompt_dim": ...}`` read from configs only (a ``sizes`` function for the registry):
    the mask decoder's ``hidden_size`` in the pretrained directory's ``config.json``, or in
    the variant's and ``config``'s dicts (transformers' default, 256, where none is set).
    ``{}`` when it cannot be told (the directory is not there yet, an unknown variant, or
    neither source given: the build reports those)."""
    if pretrained is not None:
        import json

        f = Path(pretrained).expanduser() / "config.json"
        if not f.is_file():
            return {}
        cfg = json.loads(f.read_text())
    elif (variant is not None and variant not in variants) or (variant is None and config is None):
        return {}
    else:
        cfg = deep_merge(variants.get(variant, {}) if variant else {}, config or {})
    width = (cfg.get("mask_decoder_config") or {}).get("hidden_size", DEFAULT_WIDTH)
    return {"prompt_dim": int(width)}


def read_preprocessor(path: str | None) -> dict:
    """``preprocessor_config.json`` of a pretrained directory, or ``{}``."""
    if path is None:
        return {}
    f = Path(path).expanduser() / "preprocessor_config.json"
    if not f.is_file():
        return {}
    import json

    return json.loads(f.read_text())


def to_uint8_chw(image: np.ndarray) -> torch.Tensor:
    """RGB ``uint8 (H, W, 3)`` -> ``uint8 (3, H, W)`` tensor (what the processors resize)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {tuple(image.shape)}")
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()


def resize_bilinear(chw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """transformers' torchvision-backend resize: bilinear with antialiasing, on the ``uint8``
    tensor itself (so the result is rounded back to ``uint8``)."""
    from torchvision.transforms.v2 import functional as tvF

    return tvF.resize(chw, list(size), interpolation=tvF.InterpolationMode.BILINEAR, antialias=True)


def normalize(chw_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """Rescale by 1/255 and normalise, fused as the processors do it: ``(x - mean*255) /
    (std*255)`` in float32. ``(3, h, w)`` uint8 -> float32."""
    m = torch.tensor(mean) * (1.0 / RESCALE_FACTOR)
    s = torch.tensor(std) * (1.0 / RESCALE_FACTOR)
    return (chw_uint8.to(torch.float32) - m.view(-1, 1, 1)) / s.view(-1, 1, 1)


def square_preprocess(image: np.ndarray, size: int, mean, std) -> tuple[torch.Tensor, ImageMeta]:
    """``uint8 (H, W, 3) -> float32 (3, size, size)``: the square resize (aspect ratio not
    kept) and normalisation of ``Sam2ImageProcessor`` / ``Sam3ImageProcessor``, with the
    image's :class:`ImageMeta` (its original size; the whole square is the image)."""
    chw = to_uint8_chw(image)
    h, w = image.shape[:2]
    x = normalize(resize_bilinear(chw, (size, size)), mean, std)
    return x, ImageMeta(original_size=(h, w), input_size=(size, size))


class ModelParts:
    """The parts of a transformers SAM/SAM2 ``self.model``, by the names LISA's training
    rule (``mask_decoder`` trains, ``image_encoder`` stays frozen) and the benchmark's
    stage timers look for."""

    @property
    def image_encoder(self) -> nn.Module:
        return self.model.vision_encoder

    @property
    def prompt_encoder(self) -> nn.Module:
        return self.model.prompt_encoder

    @property
    def mask_decoder(self) -> nn.Module:
        return self.model.mask_decoder

    def encoder_dtype(self) -> torch.dtype:
        """The image encoder's precision (pixels are cast to it)."""
        return next(self.model.vision_encoder.parameters()).dtype

    def decoder_dtype(self) -> torch.dtype:
        """The mask decoder's precision (fp32 under ``fp32_prefixes``): image features of any
        precision, e.g. a bf16 image encoder's, are cast to it before decoding."""
        return next(self.model.mask_decoder.parameters()).dtype


# Point labels of the geometry interface (SAM's): foreground, background, padding.
POINT_LABELS = (1, 0, -1)


def check_geometry(boxes, points, point_labels, component: str):
    """Validate ``decode_geometry``'s arguments (:class:`InputError` naming what is wrong):
    ``boxes (M, 4)`` xyxy with ``x1 <= x2``, ``y1 <= y2``; ``points (M, K, 2)`` with
    ``point_labels (M, K)`` in :data:`POINT_LABELS`; finite floats; at least one of them,
    the same ``M >= 1`` for both."""
    if boxes is None and points is None:
        raise InputError(f"{component}: decode_geometry needs boxes or points (got neither)")
    counts = []
    if boxes is not None:
        if not (isinstance(boxes, torch.Tensor) and boxes.is_floating_point() and boxes.dim() == 2
                and boxes.shape[1] == 4):
            raise InputError(f"{component}: boxes must be a float tensor (M, 4) x1, y1, x2, y2, got {_describe(boxes)}")
        if not torch.isfinite(boxes).all():
            raise InputError(f"{component}: boxes must be finite")
        if (boxes[:, 2:] < boxes[:, :2]).any():
            raise InputError(f"{component}: boxes must have x1 <= x2 and y1 <= y2 (xyxy)")
        counts.append(boxes.shape[0])
    if points is None:
        if point_labels is not None:
            raise InputError(f"{component}: point_labels given without points")
    else:
        if not (isinstance(points, torch.Tensor) and points.is_floating_point() and points.dim() == 3
                and points.shape[2] == 2 and points.shape[1] >= 1):
            raise InputError(f"{component}: points must be a float tensor (M, K >= 1, 2) x, y, got {_describe(points)}")
        if not torch.isfinite(points).all():
            raise InputError(f"{component}: points must be finite")
        if not (isinstance(point_labels, torch.Tensor) and not point_labels.is_floating_point()
                and tuple(point_labels.shape) == tuple(points.shape[:2])):
            raise InputError(f"{component}: point_labels must be an integer tensor (M, K) = {tuple(points.shape[:2])} "
                             f"with the points, got {_describe(point_labels)}")
        if not torch.isin(point_labels, torch.tensor(POINT_LABELS, device=point_labels.device)).all():
            raise InputError(f"{component}: point_labels must be 1 (foreground), 0 (background) or -1 (padding)")
        counts.append(points.shape[0])
    if min(counts) < 1 or len(set(counts)) > 1:
        raise InputError(f"{component}: boxes and points must give the same number M >= 1 of masks, got "
                         f"{' and '.join(map(str, counts))}")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).removeprefix('torch.')} {tuple(x.shape)}"
    return type(x).__name__


class GeometryPrompts:
    """``decode_geometry`` for a transformers SAM-family model (``SamModel``, ``SamHQModel``,
    ``Sam2Model``, ``EdgeTamModel``): boxes and points go through the model's own prompt
    encoder exactly as its ``forward`` sends ``input_boxes``/``input_points`` (a box is two
    corner tokens; points without a box get SAM's padding point), and the resulting sparse
    tokens through the component's ``decode_tokens``. The class sets ``component``."""

    accepts_geometry: ClassVar[bool] = True
    component: ClassVar[str]

    def decode_geometry(self, features: dict[str, torch.Tensor], boxes: torch.Tensor | None,
                        points: torch.Tensor | None,
                        point_labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``boxes (M, 4)`` xyxy and/or ``points (M, K, 2)`` xy with ``point_labels (M, K)``
        (1 foreground, 0 background, -1 padding), in the input frame (pixels of the resized
        image inside the ``S x S`` square: :meth:`ImageMeta.to_input`) -> ``low_res
        (M, 1, S/4, S/4)`` logits and ``(M, 1)`` scores, like ``decode``."""
        check_geometry(boxes, points, point_labels, self.component)
        pe = self.model.prompt_encoder
        device = pe.no_mask_embed.weight.device
        # Coordinates stay float32 (in bf16 a 1024 px frame would be cut to 8 px steps); the
        # positional encoding casts them itself. One image, M prompt sets: a leading 1.
        sparse, _ = pe(input_points=None if points is None else points.to(device, torch.float32)[None],
                       input_labels=None if points is None else point_labels.to(device, torch.long)[None],
                       input_boxes=None if boxes is None else boxes.to(device, torch.float32)[None],
                       input_masks=None)
        return self.decode_tokens(features, sparse[0])  # (M, T, P)
