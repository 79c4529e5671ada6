"""Vision towers from open_clip: CLIP ViTs (ViT-L/14, ViT-L/14-336 …) and SigLIP ViTs.

``forward(pixels (I, 3, S, S)) -> (I, N, Dv)``: the patch tokens after the block
``select_layer`` names (counted like LLaVA's ``hidden_states``: ``-2`` is the
second-to-last block, LLaVA/LISA's choice), never a pooled or class token: open_clip's
own ViT always has a CLS token, which is dropped; SigLIP's tower (a timm ViT inside
open_clip) has none. ``N = (S / patch)^2`` and ``Dv`` the tower's width.

Two ways to build one:

* ``model_name`` (an open_clip config name: ``ViT-L-14``, ``ViT-L-14-336``,
  ``ViT-SO400M-14-SigLIP``…) + ``pretrained``: a local weights file of that model (the
  ``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin`` of its hub repo): the
  vision tower ``open_clip.create_model`` would build, built without memory and given the
  file's ``visual.*`` tensors one at a time (the text tower is never built or read; with
  ``dtype``, each tensor is cast once into it). Nothing is downloaded: a hub tag
  such as ``openai`` is refused. ``tag`` names the tag the file was released under, so
  its preprocessing (mean/std, resize mode) and QuickGELU setting apply — open_clip
  cannot know them from a bare file.
* ``config``: an open_clip model config (``embed_dim``, ``vision_cfg``, optional
  ``quick_gelu`` and ``preprocess_cfg``); only the vision tower is built (random
  weights, or ``pretrained``'s ``visual.*`` tensors). A timm-trunk ``vision_cfg``
  (SigLIP) may add ``timm_model_kwargs`` (e.g. ``{embed_dim: 32, depth: 2}``) to shrink
  the named timm architecture, for tiny test instances.

Preprocessing reproduces open_clip's eval transform (``image_transform_v2``): resize
(``shortest`` side + centre crop, ``squash`` or ``longest`` + pad), ``ToTensor``,
``Normalize``, from the model's preprocess config; ``preprocess`` overrides its keys.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

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
    size_hw,
    to_pixels,
)
from lisa_kit.errors import CheckpointError, RecipeError
from lisa_kit.interfaces import ComponentSpec, VisionEncoder

PREPROCESS_KEYS = ("size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color")
# SigLIP's published preprocessing (open_clip's `webli` tag): squash to size, mean = std = 0.5.
SIGLIP_PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                     "resize_mode": "squash"}


class OpenClipVisionEncoder(VisionEncoder):
    """``visual``: an open_clip ``VisionTransformer`` or a ``TimmModel`` with a ViT trunk."""

    def __init__(self, visual, model_cfg: dict, preprocess_cfg: dict, select_layer: int = -2, norm: bool = False):
        super().__init__()
        self.visual = visual
        trunk = getattr(visual, "trunk", None)
        if _is_timm_vit(trunk):
            n_blocks, self.feature_dim = len(trunk.blocks), int(trunk.embed_dim)
            grid = trunk.patch_embed.grid_size
        elif hasattr(visual, "transformer") and hasattr(visual, "grid_size"):
            n_blocks, self.feature_dim = len(visual.transformer.resblocks), int(visual.transformer.width)
            grid = visual.grid_size
        else:
            raise RecipeError(f"open_clip tower {type(visual).__name__} (trunk {type(trunk).__name__}) is not a ViT: "
                              "no patch tokens to take; use the `timm` vision encoder for CNN towers",
                              key="model.vision_encoder")
        self.num_tokens = int(grid[0] * grid[1])
        self.select_layer = select_layer
        self.block = block_index(select_layer, n_blocks, "model.vision_encoder.select_layer")
        self.norm = norm
        self.model_cfg = model_cfg
        self.preprocess_cfg = preprocess_cfg
        self.size = size_hw(preprocess_cfg["size"])
        self.resize_mode = preprocess_cfg.get("resize_mode", "shortest")
        if self.resize_mode not in ("shortest", "squash", "longest"):
            raise RecipeError(f"unknown resize_mode {self.resize_mode!r}; use shortest, squash or longest",
                              key="model.vision_encoder.preprocess.resize_mode")
        self.resample = resample_of(preprocess_cfg.get("interpolation", "bicubic"),
                                    "model.vision_encoder.preprocess.interpolation")
        self.mean, self.std = _channels(preprocess_cfg["mean"]), _channels(preprocess_cfg["std"])
        self.fill = int(preprocess_cfg.get("fill_color", 0))

    # -- preprocessing ------------------------------------------------------------
    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """RGB ``uint8 (H, W, 3)`` -> ``float32 (3, h, w)`` (``preprocess_cfg['size']``)."""
        img = Image.fromarray(image)
        if self.resize_mode == "squash":
            x = np.asarray(resize_to(img, self.size, self.resample))
        elif self.resize_mode == "longest":
            x = center_crop_or_pad(np.asarray(resize_keep_ratio(img, self.size, 1.0, self.resample)), self.size,
                                   self.fill)
        else:  # shortest side to size, centre crop (a non-square size keeps the aspect ratio)
            img = (resize_shortest(img, self.size[0], self.resample) if self.size[0] == self.size[1]
                   else resize_keep_ratio(img, self.size, 0.0, self.resample))
            x = center_crop_or_pad(np.asarray(img), self.size)
        return to_pixels(x, self.mean, self.std)

    # -- forward ------------------------------------------------------------------
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = next(self.visual.parameters()).dtype
        out = self.visual.forward_intermediates(pixels.to(dtype), indices=[self.block], stop_early=True,
                                                normalize_intermediates=self.norm, intermediates_only=True,
                                                output_fmt="NLC")
        return out["image_intermediates"][0].to(pixels.dtype)  # patch tokens only: prefix tokens are split off

    def export_config(self) -> dict:
        return {"config": copy.deepcopy(self.model_cfg), "select_layer": self.select_layer, "norm": self.norm,
                "preprocess": _plain(self.preprocess_cfg)}


def _is_timm_vit(trunk) -> bool:
    """A timm trunk with patch tokens (a ViT), the kind of timm tower this encoder takes."""
    return trunk is not None and hasattr(trunk, "blocks") and hasattr(trunk, "patch_embed")


def _channels(v) -> list[float]:
    return [float(v)] * 3 if isinstance(v, (int, float)) else [float(x) for x in v]


def _plain(d: dict) -> dict:
    """Tuples -> lists (YAML/JSON data)."""
    return json.loads(json.dumps(d))


def _tower_cfg(cfg: dict) -> dict:
    """The parts of an open_clip model config the vision tower depends on."""
    out = {"embed_dim": cfg["embed_dim"], "vision_cfg": copy.deepcopy(cfg["vision_cfg"])}
    if cfg.get("quick_gelu"):
        out["quick_gelu"] = True
    return out


def _build_tower(cfg: dict):
    """The vision tower alone from a model config (random weights). A timm trunk with
    ``timm_model_kwargs`` is created through timm's ``local-dir:`` source (a config.json
    naming the architecture and its arguments), the one way open_clip's ``TimmModel``
    passes arguments on to timm."""
    from open_clip.model import _build_vision_tower  # the builder open_clip's CLIP classes use

    vision_cfg = copy.deepcopy(cfg["vision_cfg"])
    timm_kwargs = vision_cfg.pop("timm_model_kwargs", None)
    if timm_kwargs is None:
        return _build_vision_tower(cfg["embed_dim"], vision_cfg, quick_gelu=bool(cfg.get("quick_gelu", False)))
    if not vision_cfg.get("timm_model_name"):
        raise RecipeError("vision_cfg.timm_model_kwargs needs vision_cfg.timm_model_name",
                          key="model.vision_encoder.config.vision_cfg")
    args = dict(timm_kwargs)
    args.setdefault("img_size", vision_cfg.get("image_size", 224))
    with tempfile.TemporaryDirectory(prefix="lisa_kit_timm_cfg_") as d:
        (Path(d) / "config.json").write_text(json.dumps(
            {"architecture": vision_cfg["timm_model_name"], "model_args": args, "pretrained_cfg": {}}))
        vision_cfg["timm_model_name"] = f"local-dir:{d}"
        return _build_vision_tower(cfg["embed_dim"], vision_cfg, quick_gelu=bool(cfg.get("quick_gelu", False)))


def _check_file(pretrained: str, model_name: str | None) -> str:
    if os.path.isfile(pretrained):
        return pretrained
    tags = []
    if model_name:
        import open_clip

        tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained in tags or pretrained.startswith(("hf-hub:", "http://", "https://")):
        raise CheckpointError(
            f"pretrained {pretrained!r} is an open_clip hub tag/address; lisa_kit never downloads weights. Fetch "
            f"the weights file first and give its path (with `tag: {pretrained}` for its preprocessing)",
            component="vision_encoder:open_clip", key="model.vision_encoder.pretrained")
    raise CheckpointError(f"open_clip weights file not found: {pretrained}", component="vision_encoder:open_clip",
                          key="model.vision_encoder.pretrained", file=pretrained)


def build_open_clip(model_name: str | None = None, pretrained: str | None = None, config: dict | None = None,
                    tag: str | None = None, select_layer: int = -2, norm: bool = False,
                    preprocess: dict | None = None, dtype: str | torch.dtype | None = None) -> OpenClipVisionEncoder:
    """``model_name`` + ``pretrained`` (a local file) or ``config`` (+ optional
    ``pretrained``); see the module docstring. ``norm``: apply the tower's final norm to
    the selected tokens (LLaVA does not). ``preprocess``: overrides of open_clip's
    preprocess config (``mean``, ``std``, ``interpolation``, ``resize_mode``,
    ``fill_color``; ``size`` is the tower's). ``dtype``: the precision ``pretrained``'s
    weights are read into (default: as built, fp32)."""
    return _build(model_name, pretrained, config, tag, select_layer, norm, preprocess, default_preprocess=None,
                  dtype=dtype)


def _load_visual(pretrained: str, cfg: dict, dtype):
    """The vision tower of ``cfg`` built without memory, with the ``visual.*`` tensors of the
    weights file ``pretrained`` (a whole open_clip model) -- or all of them (a tower alone)
    -- read one at a time straight into ``dtype``; the text tower's are never loaded."""
    from lisa_kit.checkpoint.io import checkpoint_keys, empty_weights, load_file_into
    from lisa_kit.components._util import resolve_dtype

    with empty_weights():
        visual = _build_tower(cfg)
    whole = any(k.startswith("visual.") for k in checkpoint_keys(pretrained))
    load_file_into(visual, pretrained, "vision_encoder:open_clip", dtype=resolve_dtype(dtype),
                   keys=(lambda k: k[len("visual."):] if k.startswith("visual.") else None) if whole else None)
    return visual


def _build(model_name, pretrained, config, tag, select_layer, norm, preprocess, default_preprocess, dtype=None):
    import open_clip
    from open_clip.transform import PreprocessCfg

    if (model_name is None) == (config is None):
        raise RecipeError("open_clip needs exactly one of `model_name` (an open_clip config name) and `config`",
                          key="model.vision_encoder")
    if model_name is not None and model_name.startswith(("hf-hub:", "local-dir:")):
        raise RecipeError(f"model_name {model_name!r}: give an open_clip config name (ViT-L-14, "
                          "ViT-SO400M-14-SigLIP-384 …) and the weights file as `pretrained`; lisa_kit never downloads",
                          key="model.vision_encoder.model_name")
    for k in preprocess or {}:
        if k not in PREPROCESS_KEYS:
            raise RecipeError(f"unknown preprocess key {k!r}; open_clip's are {', '.join(PREPROCESS_KEYS)}",
                              key=f"model.vision_encoder.preprocess.{k}")
    pre = {**vars(PreprocessCfg()), **(default_preprocess or {})}
    tag_cfg: dict = {}
    if tag is not None:
        if model_name is None:
            raise RecipeError("`tag` looks up open_clip's table for `model_name`; with `config` give `preprocess`",
                              key="model.vision_encoder.tag")
        tag_cfg = open_clip.get_pretrained_cfg(model_name, tag)
        if not tag_cfg:
            known = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "(none)"
            raise RecipeError(f"open_clip has no tag {tag!r} for {model_name}; its tags: {known}",
                              key="model.vision_encoder.tag")
        pre.update({k: v for k, v in tag_cfg.items() if k in PREPROCESS_KEYS})

    if model_name is not None:
        cfg = open_clip.get_model_config(model_name)
        if cfg is None:
            raise RecipeError(f"unknown open_clip model {model_name!r} (see open_clip.list_models())",
                              key="model.vision_encoder.model_name")
        cfg = copy.deepcopy(cfg)
        if tag_cfg.get("quick_gelu"):
            cfg["quick_gelu"] = True
        if pretrained is not None:  # the tower open_clip.create_model builds, without the text tower
            visual = _load_visual(_check_file(pretrained, model_name), cfg, dtype)
        else:  # random weights, e.g. for benchmarks of the full-size shapes
            visual = _build_tower(cfg)
    else:
        cfg = copy.deepcopy(dict(config))
        pre.update(cfg.pop("preprocess_cfg", None) or {})
        if pretrained is not None:
            visual = _load_visual(_check_file(pretrained, None), cfg, dtype)
        else:
            visual = _build_tower(cfg)
    size = size_hw(visual.image_size)
    given = (preprocess or {}).get("size")
    if given is not None and size_hw(given) != size:
        raise RecipeError(f"preprocess size {given} differs from the tower's input size {list(size)}",
                          key="model.vision_encoder.preprocess.size")
    pre.update(preprocess or {})
    pre["size"] = size[0] if size[0] == size[1] else list(size)
    visual.requires_grad_(False)
    return OpenClipVisionEncoder(visual.eval(), _tower_cfg(cfg), pre, select_layer=select_layer, norm=norm)


def build_open_clip_siglip(model_name: str | None = None, pretrained: str | None = None, config: dict | None = None,
                           tag: str | None = None, select_layer: int = -2, norm: bool = False,
                           preprocess: dict | None = None,
                           dtype: str | torch.dtype | None = None) -> OpenClipVisionEncoder:
    """:func:`build_open_clip` with SigLIP's preprocessing as the default (squash to the
    tower's size, mean = std = 0.5), which a bare weights file cannot tell open_clip."""
    return _build(model_name, pretrained, config, tag, select_layer, norm, preprocess,
                  default_preprocess=SIGLIP_PREPROCESS, dtype=dtype)


def sizes_open_clip(model_name: str | None = None, config: dict | None = None, **_) -> dict:
    """``feature_dim`` (the tower's width) from the open_clip model config (``model_name``'s,
    or ``config``), without building the tower or reading ``pretrained``: a native ViT's
    ``vision_cfg.width`` (open_clip's default where not written); a timm trunk's
    ``embed_dim``, from the timm architecture (with ``timm_model_kwargs``) built on the
    ``meta`` device, which allocates and reads nothing. ``{}`` where the build would refuse
    the arguments or the tower (not exactly one of ``model_name``/``config``, an unknown or
    hub name, a CNN tower), which it then reports."""
    import open_clip
    from open_clip.model import CLIPVisionCfg

    if (model_name is None) == (config is None):
        return {}
    if model_name is not None:
        if model_name.startswith(("hf-hub:", "local-dir:")):
            return {}
        cfg = open_clip.get_model_config(model_name)
        if cfg is None:
            return {}
    else:
        cfg = config
    vision_cfg = dict(cfg.get("vision_cfg") or {})
    timm_name = vision_cfg.get("timm_model_name")
    if not timm_name:
        if isinstance(vision_cfg.get("layers"), (list, tuple)):
            return {}  # a ModifiedResNet (RN50 …): not a ViT
        return {"feature_dim": int(vision_cfg.get("width", CLIPVisionCfg().width))}
    if timm_name.startswith(("hf-hub:", "hf_hub:")):
        return {}  # timm would fetch the architecture's config from the hub
    import timm

    # The trunk alone, as open_clip's TimmModel creates it (its pooling and projection sit
    # on top of the trunk and do not change the tokens' width); never pretrained here.
    with torch.device("meta"):
        trunk = timm.create_model(timm_name, pretrained=False, **dict(vision_cfg.get("timm_model_kwargs") or {}))
    return {"feature_dim": int(trunk.embed_dim)} if _is_timm_vit(trunk) else {}


# Tiny random towers: a CLIP-like open_clip ViT (CLS token, QuickGELU) and a SigLIP-like
# one (the SO400M SigLIP timm architecture shrunk: no CLS, attention-pool head).
TINY_OPEN_CLIP = {"embed_dim": 32, "quick_gelu": True,
                  "vision_cfg": {"image_size": 56, "patch_size": 14, "width": 32, "layers": 2, "head_width": 16,
                                 "mlp_ratio": 2.0}}
TINY_SIGLIP = {"embed_dim": 32,
               "vision_cfg": {"image_size": 56, "timm_model_name": "vit_so400m_patch14_siglip_224",
                              "timm_model_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0},
                              "timm_pool": "map", "timm_proj": "none"}}


@lisa_kit.hookimpl
def lisa_kit_components():
    return [
        ComponentSpec("vision_encoder", "open_clip", build_open_clip, tiny={"config": TINY_OPEN_CLIP},
                      description="open_clip ViT tower (CLIP, SigLIP …), patch tokens of select_layer -2",
                      sizes=sizes_open_clip),
        ComponentSpec("vision_encoder", "open_clip_siglip", build_open_clip_siglip, tiny={"config": TINY_SIGLIP},
                      description="open_clip tower with SigLIP's preprocessing by default (squash, mean/std 0.5)",
                      sizes=sizes_open_clip),
    ]
