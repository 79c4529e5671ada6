"""A native vision-language model as lisa_kit components, from one local transformers
directory: Qwen2.5-VL, Qwen3-VL, InternVL, LLaVA-OneVision (:data:`FAMILIES`).

The VLM is split where lisa_kit's kinds meet, and each part runs transformers' own code:

* ``vision_encoder: hf_vlm_vision`` - the VLM's vision model with its merger/projector,
  reached through ``get_image_features``, with the directory's own image processor (Qwen:
  dynamic resolution, ``min_pixels``/``max_pixels``; InternVL: a variable number of tiles;
  LLaVA-OneVision: anyres crops). ``preprocess`` returns the processor's per-image output
  (Qwen: ``pixel_values (P_i, C)`` flattened patches and ``image_grid_thw (1, 3)``;
  InternVL: ``(P_i, 3, S, S)`` tiles and ``num_patches (1,)``; LLaVA-OneVision:
  ``(1, P_i, 3, S, S)`` crops and ``image_sizes (1, 2)``); ``collate`` batches them;
  ``forward`` returns :class:`~lisa_kit.interfaces.VisionFeatures` (``(N_i, D)`` per
  image, already in the LM's width; ``extra``: the grids / tile counts / sizes, and
  Qwen3-VL's ``deepstack`` features).
* ``projector: identity`` - the VLM's own merger/projector already maps to the LM's width.
* ``llm: hf_vlm_lm`` - the conditional-generation model without its vision parts: the
  language model and ``lm_head`` (:class:`~lisa_kit.components.hf_causal_lm.HFCausalLM`);
  the tokenizer is the directory's, ``[SEG]`` is added by the builder as for every LLM.
* ``fusion: hf_vlm_fusion`` - the LLaVA splice (every image slot replaced by its
  ``N_i`` features, between the family's own start/end tokens) with the family's position
  scheme: Qwen's M-RoPE ``(3, B, L)`` from transformers' ``get_rope_index`` (read from the
  same config), 1-D positions otherwise; Qwen3-VL's deepstack features as ``llm_inputs``.

Each part is built without memory and reads only its own tensors from the directory,
renamed from the checkpoint's layout by transformers' own conversion mapping (a layout
that needs tensors merged falls back to ``from_pretrained`` of the whole model, through
:func:`~lisa_kit.checkpoint.safe.hf_load`, keeping one part).
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

import lisa_kit
from lisa_kit.components._image_ops import resize_to
from lisa_kit.components._util import hf_config_dict, read_json, resolve_dtype
from lisa_kit.components.hf_causal_lm import HFCausalLM
from lisa_kit.components.llava_splice import LlavaSplice
from lisa_kit.errors import CheckpointError, RecipeError
from lisa_kit.interfaces import ComponentSpec, FusedBatch, LMOutput, Projector, VisionEncoder, VisionFeatures
from lisa_kit.tokenizer import load_tokenizer


@dataclass(frozen=True)
class Family:
    """What differs between VLM families: the transformers classes (by name, looked up in
    ``transformers``), the image processor classes a directory may carry, the tokens that
    wrap an image in a prompt (``None``: the slot alone) and how images become tokens."""

    model_class: str
    base_class: str
    image_processor_classes: tuple[str, ...]
    image_start: str | None
    image_end: str | None
    mrope: bool = False
    deepstack: bool = False  # vision features also added inside the first LM layers (Qwen3-VL)
    tiles: bool = False  # the processor cuts an image into tiles of a fixed token count (InternVL)
    anyres: bool = False  # LLaVA-NeXT-style grid of crops, unpadded and packed with newline tokens


FAMILIES: dict[str, Family] = {
    "qwen2_5_vl": Family("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel",
                         ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorPil"),
                         "<|vision_start|>", "<|vision_end|>", mrope=True),
    "qwen3_vl": Family("Qwen3VLForConditionalGeneration", "Qwen3VLModel",
                       ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorPil"),
                       "<|vision_start|>", "<|vision_end|>", mrope=True, deepstack=True),
    "internvl": Family("InternVLForConditionalGeneration", "InternVLModel",
                       ("GotOcr2ImageProcessor", "GotOcr2ImageProcessorPil"), "<img>", "</img>", tiles=True),
    "llava_onevision": Family("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel",
                              ("LlavaOnevisionImageProcessor", "LlavaOnevisionImageProcessorPil"), None, None,
                              anyres=True),
}
LM_ATTR = "language_model"  # the inner model's language model, in every family above


def _family(config, component: str) -> Family:
    mt = getattr(config, "model_type", None)
    if mt not in FAMILIES:
        raise CheckpointError(f"model_type {mt!r} is not a VLM family lisa_kit knows; known: {', '.join(FAMILIES)}",
                              component=component, key="model_type")
    return FAMILIES[mt]


def _transformers(name: str):
    import transformers

    return getattr(transformers, name)


def _config(pretrained: str | None, config: dict | None, component: str):
    """The VLM's transformers config from ``pretrained``'s ``config.json`` or a ``config``
    dict (with ``model_type``)."""
    from transformers import AutoConfig

    from lisa_kit.checkpoint.safe import hf_load

    if pretrained is not None:
        return hf_load(AutoConfig.from_pretrained, pretrained, component=component)
    if config is not None:
        cfg = dict(config)
        mt = cfg.pop("model_type", None)
        if mt not in FAMILIES:
            raise RecipeError(f"config.model_type must be one of {', '.join(FAMILIES)}, got {mt!r}",
                              key=f"model.{component.split(':')[0]}.config")
        return AutoConfig.for_model(mt, **cfg)
    raise RecipeError(f"{component} needs `pretrained` (a local transformers VLM directory) or `config`",
                      key=f"model.{component.split(':')[0]}")


def _prune(model: nn.Module, keep: str) -> None:
    """Drop what the other component owns: ``keep="vision"`` removes the language model and
    ``lm_head``; ``keep="lm"`` every part of the inner model but the language model (the
    vision tower, merger or multimodal projector, and parameters of the inner model itself)."""
    inner = model.model
    if keep == "vision":
        setattr(inner, LM_ATTR, None)
        model.lm_head = None
    else:
        for name, _ in list(inner.named_children()):
            if name != LM_ATTR:
                setattr(inner, name, None)
        for name in list(inner._parameters):  # e.g. LLaVA-OneVision's image_newline
            inner.register_parameter(name, None)


class _NoStreaming(Exception):
    """The checkpoint needs transformers' own loader (a conversion that merges tensors, or a
    transformers release without the renaming API used here)."""


def _stream(path: str, cfg, cls, component: str, dtype: torch.dtype | None, keep: str) -> nn.Module:
    """Build ``cls`` without memory, keep one part and read only that part's tensors, renamed
    from the checkpoint's layout by transformers' own conversion mapping (as ``from_pretrained``
    renames them), each cast once to ``dtype`` (default: the config's, else float32)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError as e:
        raise _NoStreaming(str(e)) from e
    from lisa_kit.checkpoint.io import Placer, checkpoint_keys, empty_weights, iter_tensors

    if dtype is None:
        named = getattr(cfg, "dtype", None)
        dtype = resolve_dtype(named) if isinstance(named, str) and named != "auto" else named
    dtype = dtype or torch.float32
    with empty_weights():
        model = cls._from_config(cfg, dtype=dtype)
    layout = model.state_dict()  # (meta) the whole model's names decide the base-model prefix
    try:  # transformers-internal API: a release where it differs takes transformers' own loader
        transforms = get_model_conversion_mapping(model)
        if any(isinstance(t, WeightConverter) for t in transforms):
            raise _NoStreaming("tensor-merging conversions")
        names = {k: rename_source_key(k, transforms, [], model.base_model_prefix, layout)[0]
                 for k in checkpoint_keys(path)}
    except (TypeError, AttributeError, ValueError) as e:
        raise _NoStreaming(f"{type(e).__name__}: {e}") from e
    _prune(model, keep)
    placer = Placer(model, component, dtype=dtype, file=path)
    for k, v, f in iter_tensors(path, want=lambda k: names.get(k) in placer.expected):
        placer.put(names[k], v, f)
    placer.finish(strict=False)  # the other part's tensors were never read
    missing = sorted(placer.expected - placer.seen)
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} weights of the {keep} part (e.g. {', '.join(missing[:5])})",
                              component=component, key=missing[0], file=path)
    return model.eval()


def _model(pretrained: str | None, config: dict | None, component: str, dtype: torch.dtype | None, keep: str,
           attn_implementation: str = "sdpa") -> nn.Module:
    """The conditional-generation model with only the ``keep`` part (``"vision"`` or ``"lm"``,
    :func:`_prune`): from ``pretrained`` only that part's tensors are read (transformers'
    ``from_pretrained`` of the whole model where the layout needs it); from ``config``,
    random weights (under ``empty_weights`` that costs no memory)."""
    from lisa_kit.checkpoint.safe import hf_load

    cfg = _config(pretrained, config, component)
    cls = _transformers(_family(cfg, component).model_class)
    cfg._attn_implementation = attn_implementation
    if pretrained is not None:
        try:
            return _stream(pretrained, cfg, cls, component, dtype, keep)
        except _NoStreaming:
            kw = {"dtype": dtype} if dtype is not None else {}
            model = hf_load(cls.from_pretrained, pretrained, component=component,
                            attn_implementation=attn_implementation, **kw)
    else:
        model = cls._from_config(cfg, dtype=dtype or torch.float32)
    _prune(model, keep)
    return model


# -- vision ---------------------------------------------------------------------------
class HFVLMVision(VisionEncoder):
    """The VLM's vision side (its inner model without the language model), run through
    transformers' ``get_image_features``. ``forward(inputs) -> VisionFeatures``."""

    def __init__(self, vlm: nn.Module, image_processor, family: Family, resize: tuple[int, int] | None = None):
        super().__init__()
        self.vlm = vlm  # inner model (e.g. Qwen2_5_VLModel) with language_model removed
        self.image_processor = image_processor
        self.family = family
        # A fixed (H, W) every image is resized to (bilinear, aspect not kept) before the
        # processor: the frame a model was trained to read, e.g. Seg-Zero's 840 x 840.
        self.resize = tuple(int(v) for v in resize) if resize is not None else None
        cfg = vlm.config
        self.feature_dim = _feature_dim(cfg.to_dict())
        self.config = cfg
        # What the processor gives per image besides pixels: Qwen's grid, InternVL's tile
        # count, LLaVA-OneVision's original size.
        self._index_key = "num_patches" if family.tiles else "image_sizes" if family.anyres else "image_grid_thw"
        self._counter = _AnyresCount(cfg, image_processor) if family.anyres else None

    def preprocess(self, image: np.ndarray) -> dict[str, torch.Tensor]:
        """RGB ``uint8 (H, W, 3)`` -> the image processor's output for one image: Qwen:
        ``pixel_values (P, C·t·p·p)`` float32 and ``image_grid_thw (1, 3)``; InternVL:
        ``pixel_values (P, 3, S, S)`` (``P`` tiles) and ``num_patches (1,)``."""
        if self.resize is not None:
            image = np.array(resize_to(Image.fromarray(image), self.resize, Image.BILINEAR))  # writable
        out = self.image_processor(images=[np.ascontiguousarray(image)], return_tensors="pt")
        return {"pixel_values": out["pixel_values"].float(),
                self._index_key: torch.as_tensor(out[self._index_key]).long().reshape(1, -1).squeeze(-1)}

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``I`` preprocessed images -> ``pixel_values`` of all of them concatenated
        (patches or tiles; LLaVA-OneVision: ``(I, P_max, 3, S, S)``, crops zero-padded to the
        most crops, as its processor batches them) and ``image_grid_thw (I, 3)`` /
        ``num_patches (I,)`` / ``image_sizes (I, 2)``."""
        px = [it["pixel_values"] for it in items]
        if self.family.anyres:
            most = max(p.shape[1] for p in px)
            px = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, most - p.shape[1])) for p in px]
        return {"pixel_values": torch.cat(px), self._index_key: torch.cat([it[self._index_key] for it in items])}

    @property
    def merge_size(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    def tokens_for(self, size: tuple[int, int]) -> int:
        """``N`` of an image of ``size`` (H, W): Qwen: its resized grid over
        (patch · merge)², by the processor's own ``smart_resize``; InternVL: the
        processor's tile count times the tokens of one tile."""
        ip = self.image_processor
        size = self.resize if self.resize is not None else size
        if self._counter is not None:
            return self._counter(int(size[0]), int(size[1]))
        if self.family.tiles:
            return int(ip.get_number_of_image_patches(int(size[0]), int(size[1]))) * int(self.config.image_seq_length)
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        patch = int(ip.patch_size)
        h, w = smart_resize(int(size[0]), int(size[1]), factor=patch * self.merge_size,
                            min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"])
        return (h // patch // self.merge_size) * (w // patch // self.merge_size)

    def forward(self, inputs: dict[str, torch.Tensor]) -> VisionFeatures:
        cfg = self.config
        if self.family.anyres:  # every image gets its crops (transformers' single-image case)
            px, sizes = inputs["pixel_values"], inputs["image_sizes"]
            out = self.vlm.get_image_features(px, sizes, vision_feature_layer=cfg.vision_feature_layer,
                                              vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                              vision_aspect_ratio=cfg.vision_aspect_ratio, return_dict=True)
            return VisionFeatures([t.to(px.dtype) for t in out.pooler_output], {"image_sizes": sizes})
        if self.family.tiles:
            px, tiles = inputs["pixel_values"], inputs["num_patches"]  # config values as transformers' forward
            out = self.vlm.get_image_features(px, vision_feature_layer=cfg.vision_feature_layer,
                                              vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                              return_dict=True).pooler_output  # (P, tokens per tile, D)
            tokens = [t.flatten(0, 1).to(px.dtype) for t in out.split(tiles.tolist())]  # (P_i * tokens, D)
            return VisionFeatures(tokens, {"num_patches": tiles})
        px, grid = inputs["pixel_values"], inputs["image_grid_thw"]
        out = self.vlm.get_image_features(px, grid, return_dict=True)
        tokens = [t.to(px.dtype) for t in out.pooler_output]  # per image (N_i, D), N_i = t·h·w / merge²
        extra = {"image_grid_thw": grid}
        if self.family.deepstack:  # Qwen3-VL: per injected LM layer, per image (N_i, D)
            extra["deepstack"] = [[t.to(px.dtype) for t in layer] for layer in out.deepstack_features]
        return VisionFeatures(tokens, extra)

    def export_config(self) -> dict:
        out = {"config": hf_config_dict(self.config), "image_processor": self.image_processor.to_dict()}
        return {**out, "resize": list(self.resize)} if self.resize is not None else out


class _AnyresCount:
    """LLaVA-OneVision's visual token count of an image of a given size: transformers'
    own ``LlavaOnevisionProcessor._get_number_of_features`` (which reads only these
    attributes), so the count needs no tokenizer and no forward pass."""

    def __init__(self, config, image_processor):
        from transformers import LlavaOnevisionProcessor

        vc = config.vision_config
        self.image_processor = image_processor
        self.num_image_tokens = (vc.image_size // vc.patch_size) ** 2
        self.vision_aspect_ratio = config.vision_aspect_ratio
        self.strategy = config.vision_feature_select_strategy
        self._features = types.MethodType(LlavaOnevisionProcessor._get_number_of_features, self)
        self._get_unpadded_features = types.MethodType(LlavaOnevisionProcessor._get_unpadded_features, self)

    def __call__(self, height: int, width: int) -> int:
        side = self.image_processor.size["height"]  # the crops' size
        n = self._features(height, width, side, side)
        return n - 1 if self.strategy == "default" else n  # "default" drops the CLS position


def _processor_class(name: str, family: Family) -> str | None:
    """The family's processor class ``name`` stands for (older files name the torchvision
    one ``...Fast``), ``None`` when it is none of them."""
    for cls in family.image_processor_classes:
        if name in (cls, cls + "Fast"):
            return cls
    return None


def _image_processor(pretrained: str | None, saved: dict | None, family: Family, min_pixels, max_pixels):
    from lisa_kit.checkpoint.safe import hf_load

    if pretrained is not None:
        from transformers import AutoImageProcessor

        ip = hf_load(AutoImageProcessor.from_pretrained, pretrained, component="vision_encoder:hf_vlm_vision")
    elif saved is not None:
        saved = dict(saved)
        given = saved.pop("image_processor_type", None) or family.image_processor_classes[0]
        name = _processor_class(given, family)
        if name is None:
            raise RecipeError(f"image_processor_type must be one of {', '.join(family.image_processor_classes)}, "
                              f"got {given!r}", key="model.vision_encoder.image_processor")
        ip = _transformers(name).from_dict(saved)
    else:
        ip = _transformers(family.image_processor_classes[0])()
    if _processor_class(type(ip).__name__, family) is None:
        raise CheckpointError(f"the image processor is a {type(ip).__name__}, expected one of "
                              f"{', '.join(family.image_processor_classes)}", component="vision_encoder:hf_vlm_vision")
    if not family.mrope:
        if min_pixels is not None or max_pixels is not None:
            raise RecipeError("min_pixels/max_pixels bound Qwen's dynamic resolution; this VLM's processor "
                              f"({type(ip).__name__}) has fixed-size tiles", key="model.vision_encoder.max_pixels")
        return ip
    size = dict(ip.size)
    for key, value in (("shortest_edge", min_pixels), ("longest_edge", max_pixels)):
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                name = "min_pixels" if key == "shortest_edge" else "max_pixels"
                raise RecipeError(f"must be a positive whole number of pixels, got {value!r}",
                                  key=f"model.vision_encoder.{name}")
            size[key] = value
    if size["shortest_edge"] > size["longest_edge"]:
        raise RecipeError(f"min_pixels ({size['shortest_edge']}) is above max_pixels ({size['longest_edge']})",
                          key="model.vision_encoder.min_pixels")
    ip.size = type(ip.size)(**size) if not isinstance(ip.size, dict) else size
    return ip


def build_hf_vlm_vision(pretrained: str | None = None, config: dict | None = None,
                        image_processor: dict | None = None, min_pixels: int | None = None,
                        max_pixels: int | None = None, dtype: str | None = None,
                        resize: list[int] | None = None) -> HFVLMVision:
    """``pretrained``: a local transformers VLM directory (weights, config and image
    processor); ``config``/``image_processor``: their dicts (random weights; lisa_kit's own
    checkpoints). ``min_pixels``/``max_pixels``: the dynamic-resolution bounds (Qwen);
    ``resize``: ``[H, W]`` every image is resized to first (Seg-Zero: ``[840, 840]``)."""
    component = "vision_encoder:hf_vlm_vision"
    model = _model(pretrained, config, component, resolve_dtype(dtype), keep="vision")
    family = _family(model.config, component)
    inner = model.model  # the language model and lm_head belong to the llm component
    inner.requires_grad_(False)
    ip = _image_processor(pretrained, image_processor, family, min_pixels, max_pixels)
    if resize is not None and not (isinstance(resize, (list, tuple)) and len(resize) == 2
                                   and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in resize)):
        raise RecipeError(f"expected [height, width] in pixels, got {resize!r}", key="model.vision_encoder.resize")
    return HFVLMVision(inner, ip, family, resize)


def _feature_dim(cfg: dict) -> int | None:
    """Width of the vision side's output: Qwen's merger ``out_hidden_size``; a family with
    a multimodal projector (InternVL, LLaVA-OneVision) maps to the LM's ``hidden_size``."""
    vc, tc = cfg.get("vision_config") or {}, cfg.get("text_config") or {}
    fam = FAMILIES.get(cfg.get("model_type"))
    if fam is not None and (fam.tiles or fam.anyres):
        return int(tc["hidden_size"]) if "hidden_size" in tc else None
    return int(vc["out_hidden_size"]) if "out_hidden_size" in vc else None


def sizes_hf_vlm_vision(pretrained: str | None = None, config: dict | None = None, **_) -> dict:
    dim = _feature_dim(_raw_config(pretrained, config) or {})
    return {} if dim is None else {"feature_dim": dim}


def _raw_config(pretrained: str | None, config: dict | None) -> dict | None:
    if pretrained is not None:
        f = Path(pretrained) / "config.json"
        return read_json(f) if f.is_file() else None
    return dict(config) if config is not None else None


# -- projector ------------------------------------------------------------------------
class IdentityProjector(Projector):
    """No projection: the tower already gives the LLM's width (a VLM's merger)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        if in_dim != out_dim:
            raise RecipeError(f"the identity projector needs the tower's feature_dim ({in_dim}) to equal the LLM's "
                              f"hidden_size ({out_dim}); use a linear or mlp2x_gelu projector",
                              key="model.projector")
        self.in_dim = self.out_dim = in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def export_config(self) -> dict:
        return {"in_dim": self.in_dim, "out_dim": self.out_dim}


def build_identity(in_dim: int, out_dim: int) -> IdentityProjector:
    return IdentityProjector(in_dim, out_dim)


# -- language model -------------------------------------------------------------------
class HFVLMLanguageModel(HFCausalLM):
    """The VLM's language model and ``lm_head`` (its vision parts removed). Positions may
    be ``(3, B, L)`` (M-RoPE), which the Qwen text models take as they are.

    Qwen3-VL's deepstack arrives as the fusion's ``llm_inputs``: ``visual_pos_masks (B, L)``
    bool and ``deepstack_embeds (B, L, K, D)``; layer ``k < K``'s output gets
    ``deepstack_embeds[..., k, :]`` added at the visual positions (transformers' own
    ``_deepstack_process``, fed ``(n_visual, D)`` per layer in row-major order as its model does)."""

    def forward(self, inputs_embeds, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                logits=True, output_layers=False, visual_pos_masks=None, deepstack_embeds=None) -> LMOutput:
        kw = {}
        if deepstack_embeds is not None:
            mask = visual_pos_masks.bool()
            layers = deepstack_embeds.shape[2]
            kw = {"visual_pos_masks": mask,
                  "deepstack_visual_embeds": [deepstack_embeds[:, :, k][mask] for k in range(layers)]}
        return super().forward(inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                               use_cache=use_cache, logits=logits, output_layers=output_layers, **kw)

    def export_config(self) -> dict:
        return {"config": hf_config_dict(self.model.config)}


def build_hf_vlm_lm(pretrained: str | None = None, config: dict | None = None, tokenizer: str | None = None,
                    attn_implementation: str = "sdpa", dtype: str | None = None) -> HFVLMLanguageModel:
    """``pretrained``: a local transformers VLM directory; ``config``: its config dict
    (random weights); ``tokenizer``: tokenizer directory (default: ``pretrained``)."""
    component = "llm:hf_vlm_lm"
    model = _model(pretrained, config, component, resolve_dtype(dtype), "lm", attn_implementation)
    tok_dir = tokenizer or pretrained
    if tok_dir is None:
        raise RecipeError("hf_vlm_lm needs `tokenizer` (a tokenizer directory) when built from `config`",
                          key="model.llm.tokenizer")
    tok = load_tokenizer(Path(tok_dir), "hf")
    model.config.use_cache = True
    return HFVLMLanguageModel(model, tok)


def sizes_hf_vlm_lm(pretrained: str | None = None, config: dict | None = None, **_) -> dict:
    cfg = _raw_config(pretrained, config)
    tc = (cfg or {}).get("text_config") or {}
    return {"hidden_size": int(tc["hidden_size"])} if "hidden_size" in tc else {}


# -- fusion ---------------------------------------------------------------------------
class _RopeIndex:
    """transformers' own ``get_rope_index`` bound to a config: it reads ``config`` and
    ``get_vision_position_ids`` of the model and nothing else, so no model is built."""

    def __init__(self, base_cls, config):
        self.config = config
        self.get_vision_position_ids = types.MethodType(base_cls.get_vision_position_ids, self)
        self.get_rope_index = types.MethodType(base_cls.get_rope_index, self)


class HFVLMFusion(LlavaSplice):
    """The LLaVA splice with the family's image wrapping and position scheme.

    Qwen (``mrope``): ``position_ids (3, B, L)`` from ``get_rope_index`` over the fused
    sequence (image columns typed 1, grids ``extra["image_grid_thw"]`` in the order the
    images were spliced); a generated token's positions are one past the prompt's largest
    position, on all three axes (what transformers' ``generate`` does with ``rope_deltas``)."""

    def __init__(self, config, family: Family, image_start: str | None, image_end: str | None):
        super().__init__(use_im_start_end=False)
        self.config = config
        self.family = family
        self.image_start, self.image_end = image_start, image_end
        self._rope = _RopeIndex(_transformers(family.base_class), config) if family.mrope else None

    def image_tokens(self) -> list[str]:
        return [t for t in (self.image_start, self.image_end) if t]

    def wrap_image(self, tokenizer) -> list[int]:
        ids = [self.IMAGE_SLOT]
        if self.image_start:
            ids.insert(0, tokenizer.token_id(self.image_start))
        if self.image_end:
            ids.append(tokenizer.token_id(self.image_end))
        return ids

    def fuse(self, input_ids, attention_mask, labels, image_features, row_images, embed,
             padding_side: str = "right") -> FusedBatch:
        """As :meth:`LlavaSplice.fuse`; ``position_ids (3, B, L)`` for M-RoPE families
        (``image_features`` must then be :class:`VisionFeatures` with ``image_grid_thw``)."""
        if self._rope is None:
            return super().fuse(input_ids, attention_mask, labels, image_features, row_images, embed, padding_side)
        sp = self.splice(input_ids, attention_mask, labels, image_features, row_images, embed, padding_side)
        grids = image_features.extra.get("image_grid_thw") if isinstance(image_features, VisionFeatures) else None
        if sp.images and grids is None:
            raise ValueError("M-RoPE positions need the images' grids: image_features must be VisionFeatures with "
                             "extra['image_grid_thw'] (from the hf_vlm_vision tower)")
        types_ = sp.visual.long()  # 1 on image columns, 0 on text (transformers' mm_token_type_ids)
        order = torch.stack([grids[img] for _, _, img in sp.images]) if sp.images else None
        # The fused ids as the processor would have written them (image columns: the image
        # token): transformers releases that find images by their token ids read these.
        ids = sp.input_ids.masked_fill(sp.visual, int(self.config.image_token_id))
        position_ids, _ = self._rope.get_rope_index(ids, mm_token_type_ids=types_, image_grid_thw=order,
                                                    attention_mask=sp.attention_mask.long())
        llm_inputs = self._deepstack(sp, image_features) if self.family.deepstack else {}
        return FusedBatch(inputs_embeds=sp.inputs_embeds, attention_mask=sp.attention_mask, labels=sp.labels,
                          position_ids=position_ids, token_positions=sp.token_positions, llm_inputs=llm_inputs)

    @staticmethod
    def _deepstack(sp, image_features: VisionFeatures) -> dict[str, torch.Tensor]:
        """``visual_pos_masks (B, L)`` and ``deepstack_embeds (B, L, K, D)``: each image's
        ``K`` layer features at the columns its tokens were spliced to (zeros elsewhere)."""
        layers = image_features.extra.get("deepstack")
        if layers is None:
            raise ValueError("this VLM adds deepstack features inside its LM: image_features must carry "
                             "extra['deepstack'] (from the hf_vlm_vision tower)")
        B, L, D = sp.inputs_embeds.shape
        deep = sp.inputs_embeds.new_zeros(B, L, len(layers), D)
        for b, s, img in sp.images:
            for k, layer in enumerate(layers):
                deep[b, s:s + layer[img].shape[0], k] = layer[img].to(deep.dtype)
        return {"visual_pos_masks": sp.visual, "deepstack_embeds": deep}

    def example_features(self, n_images: int, n_tokens: int, dim: int):
        """M-RoPE families: :class:`VisionFeatures` with the grid of a one-patch-row image
        ``(1, merge, n_tokens * merge)`` (``n_tokens`` after the merge)."""
        if self._rope is None:
            return super().example_features(n_images, n_tokens, dim)
        m = int(self.config.vision_config.spatial_merge_size)
        extra = {"image_grid_thw": torch.tensor([[1, m, n_tokens * m]] * n_images)}
        feats = list(torch.randn(n_images, n_tokens, dim).unbind(0))
        if self.family.deepstack:
            k = len(self.config.vision_config.deepstack_visual_indexes)
            extra["deepstack"] = [list(torch.randn(n_images, n_tokens, dim).unbind(0)) for _ in range(k)]
        return VisionFeatures(feats, extra)

    def decode_positions(self, fused: FusedBatch, step: int) -> torch.Tensor:
        """``(A, B, 1)``: one past the row's largest prompt position, plus ``step``."""
        if self._rope is None:
            return super().decode_positions(fused, step)
        pos = fused.position_ids.masked_fill(~fused.attention_mask.bool()[None], 0)
        return pos.amax(dim=(0, 2))[None, :, None].expand(pos.shape[0], -1, 1) + 1 + step

    def export_config(self) -> dict:
        return {"config": hf_config_dict(self.config), "image_start": self.image_start, "image_end": self.image_end}


_UNSET = object()


def build_hf_vlm_fusion(pretrained: str | None = None, config: dict | None = None, image_start=_UNSET,
                        image_end=_UNSET) -> HFVLMFusion:
    """``pretrained``: the VLM directory (only its ``config.json`` is read) or ``config``;
    ``image_start``/``image_end``: the tokens around an image (default: the family's,
    e.g. Qwen's ``<|vision_start|>``/``<|vision_end|>``)."""
    component = "fusion:hf_vlm_fusion"
    cfg = _config(pretrained, config, component)
    fam = _family(cfg, component)
    return HFVLMFusion(cfg, fam, fam.image_start if image_start is _UNSET else image_start,
                       fam.image_end if image_end is _UNSET else image_end)


# Tiny random Qwen2.5-VL (the conformance tests build it from this config; lisa_kit.testing
# saves it as a directory with a tokenizer and processor for the tiny recipe). The vision
# tower's out_hidden_size equals the LM's hidden_size, as in the real models.
TINY_QWEN2_5_VL = {
    "model_type": "qwen2_5_vl",
    "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "max_position_embeddings": 1024, "vocab_size": 400,
                    "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                    "tie_word_embeddings": False},
    "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                      "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
                      "fullatt_block_indexes": [1]},
    "tie_word_embeddings": False,
}
# 56x56 to 112x112 pixels: 4 to 16 visual tokens per image.
TINY_QWEN2_5_VL_PROCESSOR = {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 14, "merge_size": 2,
                             "temporal_patch_size": 2, "size": {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}}
# Qwen3-VL: 16-px patches, learned position grid of 8x8, deepstack from both vision blocks.
TINY_QWEN3_VL = {
    "model_type": "qwen3_vl",
    "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 1024, "vocab_size": 400,
                    "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True,
                                        "rope_theta": 10000.0},
                    "tie_word_embeddings": False},
    "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                      "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                      "num_position_embeddings": 64, "deepstack_visual_indexes": [0, 1]},
    "tie_word_embeddings": False,
}
# InternVL: 64-px tiles of 16-px patches, pixel-shuffled by 0.5: 4 tokens per tile.
TINY_INTERNVL = {
    "model_type": "internvl",
    "text_config": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
                    "vocab_size": 400, "tie_word_embeddings": False},
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "image_size": [64, 64], "patch_size": [16, 16]},
    "image_seq_length": 4, "downsample_ratio": 0.5, "tie_word_embeddings": False,
}
# 1 to 4 tiles (and a thumbnail when there are several) per image.
TINY_INTERNVL_PROCESSOR = {"image_processor_type": "GotOcr2ImageProcessor", "size": {"height": 64, "width": 64},
                           "crop_to_patches": True, "min_patches": 1, "max_patches": 4}
# LLaVA-OneVision: SigLIP 32 px / 8 px patches (16 tokens per crop), crops on a grid of up to 2x2.
TINY_LLAVA_ONEVISION = {
    "model_type": "llava_onevision",
    "text_config": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
                    "vocab_size": 400, "tie_word_embeddings": False},
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                      "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
    "image_grid_pinpoints": [[32, 32], [32, 64], [64, 32], [64, 64]], "vision_feature_layer": -1,
    "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9", "tie_word_embeddings": False,
}
TINY_LLAVA_ONEVISION_PROCESSOR = {"image_processor_type": "LlavaOnevisionImageProcessor",
                                  "size": {"height": 32, "width": 32}, "crop_size": {"height": 32, "width": 32},
                                  "image_grid_pinpoints": [[32, 32], [32, 64], [64, 32], [64, 64]]}
# 64x64 to 128x128 pixels: 4 to 16 visual tokens per image.
TINY_QWEN3_VL_PROCESSOR = {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 16, "merge_size": 2,
                           "temporal_patch_size": 2, "size": {"shortest_edge": 64 * 64, "longest_edge": 128 * 128}}


@lisa_kit.hookimpl
def lisa_kit_components():
    tiny = {"config": TINY_QWEN2_5_VL}
    return [
        ComponentSpec("vision_encoder", "hf_vlm_vision", build_hf_vlm_vision,
                      tiny={**tiny, "image_processor": TINY_QWEN2_5_VL_PROCESSOR},
                      description="a transformers VLM's vision model + merger and image processor (Qwen2.5-VL)",
                      sizes=sizes_hf_vlm_vision, component_class=HFVLMVision),
        ComponentSpec("projector", "identity", build_identity, tiny={"in_dim": 64, "out_dim": 64},
                      derived=("in_dim", "out_dim"), description="no projection (the tower gives the LLM's width)"),
        ComponentSpec("llm", "hf_vlm_lm", build_hf_vlm_lm, tiny={**tiny, "tokenizer": "@tiny_hf_tokenizer"},
                      description="a transformers VLM's language model + lm_head and tokenizer (Qwen2.5-VL)",
                      sizes=sizes_hf_vlm_lm, component_class=HFVLMLanguageModel),
        ComponentSpec("fusion", "hf_vlm_fusion", build_hf_vlm_fusion, tiny=tiny,
                      description="image slot -> features between the VLM's own tokens; its positions (Qwen M-RoPE)"),
    ]
