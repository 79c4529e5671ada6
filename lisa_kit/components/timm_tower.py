"""Any timm image model as a vision tower: ViTs (CLIP/SigLIP/DINOv2/EVA …) and CNNs (ConvNeXt …).

``forward(pixels (I, 3, h, w)) -> (I, N, Dv)``, from timm's ``forward_intermediates``:

* token models (``model.num_prefix_tokens`` exists: ViT, DeiT, EVA …): the output of
  the block ``select_layer`` names (default ``-2``, LLaVA's choice), prefix tokens (CLS,
  registers: ``num_prefix_tokens`` of them) dropped: ``N = (h / patch) * (w / patch)``,
  ``Dv`` the embedding width;
* feature-map models (ConvNeXt, ResNet …): the stage ``select_layer`` names (default
  ``-1``, the last stage) flattened row-major: ``(C, H', W') -> (H' * W', C)``,
  ``N = (h / reduction) * (w / reduction)``.

``select_layer`` counts blocks (stages) like LLaVA's ``hidden_states``: ``-1`` the last,
``k >= 1`` the k-th. Built with ``timm.create_model(model_name, pretrained=False,
num_classes=0, **model_kwargs)`` (the classifier is not needed); ``pretrained`` is a local
timm-layout weights file (``model.safetensors`` of a timm hub repo, or a torch file read
with ``weights_only=True``), loaded strictly apart from the classifier. Nothing is
downloaded: ``hf-hub:`` names are refused.

Preprocessing reproduces timm's eval transform (``resolve_data_config`` +
``create_transform``): resize to ``input_size / crop_pct`` (``center``: shortest side,
``squash``: both sides, ``border``: longest side + pad with the mean colour), centre
crop to ``input_size``, ``ToTensor``, ``Normalize``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

import lisa_kit
from lisa_kit.components._image_ops import (
    block_index,
    center_crop_or_pad,
    resample_of,
    resize_keep_ratio,
    resize_shortest,
    resize_to,
    to_pixels,
)
from lisa_kit.errors import CheckpointError, RecipeError
from lisa_kit.interfaces import ComponentSpec, VisionEncoder

DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
DEFAULT_CROP_PCT = 0.875  # timm's default when a config has none


class TimmVisionEncoder(VisionEncoder):
    def __init__(self, model, model_name: str, model_kwargs: dict, data_config: dict, select_layer: int | None = None,
                 norm: bool = False):
        super().__init__()
        self.model = model
        self.model_name = model_name
        self.model_kwargs = dict(model_kwargs)
        self.tokens, self.select_layer, self.block, info = _selected(model, select_layer)
        self.norm = norm
        self.feature_dim = int(info[self.block]["num_chs"])
        self.data_config = data_config
        _, h, w = data_config["input_size"]
        self.input_size = (int(h), int(w))
        if self.tokens:
            grid = model.patch_embed.dynamic_feat_size(self.input_size) if getattr(
                model, "dynamic_img_size", False) else model.patch_embed.grid_size
            self.num_tokens = int(grid[0] * grid[1])
        else:
            red = int(info[self.block]["reduction"])
            if h % red or w % red:
                raise RecipeError(f"input size {h}x{w} is not a multiple of stage {self.select_layer}'s stride {red}",
                                  key="model.vision_encoder.image_size")
            self.num_tokens = (h // red) * (w // red)
        self.resample = resample_of(data_config.get("interpolation", "bilinear"),
                                    "model.vision_encoder.data_config.interpolation")

    # -- preprocessing ------------------------------------------------------------
    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """RGB ``uint8 (H, W, 3)`` -> ``float32 (3, h, w)`` (``data_config['input_size']``)."""
        cfg = self.data_config
        crop_pct = cfg.get("crop_pct") or DEFAULT_CROP_PCT
        scale = tuple(math.floor(s / crop_pct) for s in self.input_size)
        img = Image.fromarray(image)
        mode = cfg.get("crop_mode") or "center"
        if mode == "squash":
            x = center_crop_or_pad(np.asarray(resize_to(img, scale, self.resample)), self.input_size)
        elif mode == "border":
            fill = [round(255 * v) for v in cfg["mean"]]
            x = center_crop_or_pad(np.asarray(resize_keep_ratio(img, scale, 1.0, self.resample)), self.input_size,
                                   fill)
        else:
            img = (resize_shortest(img, scale[0], self.resample) if scale[0] == scale[1]
                   else resize_keep_ratio(img, scale, 0.0, self.resample))
            x = center_crop_or_pad(np.asarray(img), self.input_size)
        return to_pixels(x, cfg["mean"], cfg["std"])

    # -- forward ------------------------------------------------------------------
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        x = pixels.to(dtype)
        if self.tokens:
            feats = self.model.forward_intermediates(x, indices=[self.block], norm=self.norm, stop_early=True,
                                                     output_fmt="NLC", intermediates_only=True)[0]
        else:
            fmap = self.model.forward_intermediates(x, indices=[self.block], norm=self.norm, stop_early=True,
                                                    intermediates_only=True)[0]
            feats = fmap.flatten(2).transpose(1, 2)  # (I, C, H', W') -> (I, H'*W', C)
        return feats.to(pixels.dtype)

    def export_config(self) -> dict:
        return {"model_name": self.model_name, "model_kwargs": dict(self.model_kwargs),
                "select_layer": self.select_layer, "norm": self.norm,
                "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()}}


def _selected(model, select_layer: int | None) -> tuple[bool, int, int, list[dict]]:
    """``(tokens, select_layer, block, feature_info)``: whether ``model`` is a token model
    (a ViT: prefix tokens and a patch embedding), the layer taken (default ``-2`` for
    token models, LLaVA's choice, ``-1``, the last stage, for feature-map models), its
    0-based block/stage index and timm's per-block ``feature_info`` dicts (``num_chs``,
    ``reduction``)."""
    tokens = getattr(model, "num_prefix_tokens", None) is not None and hasattr(model, "patch_embed")
    info = model.feature_info
    info = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
    layer = select_layer if select_layer is not None else (-2 if tokens else -1)
    return tokens, layer, block_index(layer, len(info), "model.vision_encoder.select_layer"), info


def _create(model_name: str, model_kwargs: dict | None):
    """``timm.create_model`` without a classifier and without any download (on the current
    default device: ``meta`` for :func:`sizes_timm`)."""
    import timm

    if model_name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        raise RecipeError(f"model_name {model_name!r}: give a timm architecture name and the weights file as "
                          "`pretrained`; lisa_kit never downloads", key="model.vision_encoder.model_name")
    try:
        return timm.create_model(model_name, pretrained=False, num_classes=0, **dict(model_kwargs or {}))
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise RecipeError(f"timm cannot create {model_name!r}: {e}", key="model.vision_encoder.model_name") from e


def _classifier_prefixes(model) -> tuple[str, ...]:
    cls = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    return tuple(f"{c}." for c in ((cls,) if isinstance(cls, str) else cls))


def build_timm(model_name: str, pretrained: str | None = None, model_kwargs: dict | None = None,
               select_layer: int | None = None, norm: bool = False, image_size: int | list[int] | None = None,
               data_config: dict | None = None, dtype: str | torch.dtype | None = None) -> TimmVisionEncoder:
    """``model_name``: a timm architecture, optionally with its pretrained tag
    (``vit_large_patch14_clip_336.openai``: the tag picks the preprocessing, nothing is
    downloaded); ``model_kwargs``: constructor arguments (``img_size``, ``embed_dim``,
    ``depth``, ``dims`` …); ``image_size``: input size (default: a ViT's own, otherwise
    the pretrained config's); ``data_config``: overrides of timm's data config
    (``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``); ``norm``: apply
    the model's final norm to the selected features; ``dtype``: the precision
    ``pretrained``'s weights are read into (built without memory, each tensor cast once;
    default: as built, fp32)."""
    from contextlib import nullcontext

    from timm.data import resolve_data_config

    from lisa_kit.checkpoint.io import empty_weights, load_file_into
    from lisa_kit.components._util import resolve_dtype

    for k in data_config or {}:
        if k not in DATA_CONFIG_KEYS:
            raise RecipeError(f"unknown data_config key {k!r}; timm's are {', '.join(DATA_CONFIG_KEYS)}",
                              key=f"model.vision_encoder.data_config.{k}")
    kwargs = dict(model_kwargs or {})
    if pretrained is not None:
        import os

        if not os.path.isfile(pretrained):
            raise CheckpointError(f"timm weights file not found: {pretrained} (lisa_kit never downloads; fetch the "
                                  "model.safetensors of the timm model first)", component="vision_encoder:timm",
                                  key="model.vision_encoder.pretrained", file=pretrained)
    # With weights to read: built without memory, each tensor read straight into `dtype`.
    with empty_weights() if pretrained is not None else nullcontext():
        model = _create(model_name, kwargs)
    if pretrained is not None:
        drop = _classifier_prefixes(model)  # built without a classifier: its weights are not loaded
        load_file_into(model, pretrained, "vision_encoder:timm", dtype=resolve_dtype(dtype),
                       keys=lambda k: None if k.startswith(drop) else k)
    args: dict = {k: tuple(v) if isinstance(v, list) else v for k, v in (data_config or {}).items()}
    size = image_size
    if size is None and "input_size" not in args and hasattr(model, "patch_embed"):
        size = list(model.patch_embed.img_size)  # a ViT's input size is fixed by its position table
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else size
        args["input_size"] = (3, int(h), int(w))
    cfg = resolve_data_config(args, model=model)
    cfg = {k: cfg[k] for k in DATA_CONFIG_KEYS if k in cfg}
    fixed = getattr(model, "patch_embed", None) is not None and not getattr(model, "dynamic_img_size", False)
    if fixed and tuple(cfg["input_size"][1:]) != tuple(model.patch_embed.img_size):
        raise RecipeError(f"{model_name} takes {tuple(model.patch_embed.img_size)} inputs, not "
                          f"{tuple(cfg['input_size'][1:])}; set model_kwargs.img_size to change it",
                          key="model.vision_encoder.image_size")
    model.requires_grad_(False)
    return TimmVisionEncoder(model.eval(), model_name, kwargs, cfg, select_layer=select_layer, norm=norm)


def sizes_timm(model_name: str | None = None, model_kwargs: dict | None = None, select_layer: int | None = None,
               **_) -> dict:
    """``feature_dim`` (the channels of the block or stage ``select_layer`` takes: a ViT's
    width, a CNN stage's channels) from the architecture built on the ``meta`` device,
    which allocates no memory and reads nothing: ``pretrained`` (a weights file) is not
    opened. ``{}`` for a hub/local-dir name (the build refuses it)."""
    if not isinstance(model_name, str) or model_name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        return {}
    with torch.device("meta"):
        model = _create(model_name, model_kwargs)
    _, _, block, info = _selected(model, select_layer)
    return {"feature_dim": int(info[block]["num_chs"])}


TINY_TIMM_VIT = {"model_name": "vit_base_patch16_clip_224",
                 "model_kwargs": {"img_size": 48, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}}
TINY_TIMM_CONVNEXT = {"model_name": "convnext_atto", "image_size": 64,
                      "model_kwargs": {"dims": [8, 16, 24, 32], "depths": [1, 1, 1, 1]}}


@lisa_kit.hookimpl
def lisa_kit_components():
    return [ComponentSpec("vision_encoder", "timm", build_timm, tiny=TINY_TIMM_VIT,
                          description="timm image model: ViT tokens (prefix tokens dropped) or a CNN stage's map",
                          sizes=sizes_timm)]
