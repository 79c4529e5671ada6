"""CLIP vision tower from a transformers ``CLIPVisionModel`` directory.

``forward(pixels (I, 3, S, S)) -> (I, N, Dv)``: the hidden states of layer
``select_layer`` (LLaVA/LISA: -2, the penultimate), CLS dropped for ``select_feature:
patch``. ``N = (S / patch)^2``: 256 at 224 px, 576 at 336 px; nothing downstream
assumes either.

Preprocessing reproduces the ``CLIPImageProcessor`` LISA used (PIL path): shortest
edge to ``size`` with bicubic resampling, centre crop, rescale to [0, 1] and
normalise, with the arithmetic in the same dtypes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

import lisa_kit
from lisa_kit.components._util import hf_config_dict, read_json, resolve_dtype
from lisa_kit.interfaces import ComponentSpec, VisionEncoder

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class HFClipVisionEncoder(VisionEncoder):
    def __init__(self, model, select_layer: int = -2, select_feature: str = "patch", image_size: int | None = None,
                 crop_size: int | None = None, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, resample: int = 3,
                 rescale_factor: float = 1 / 255):
        super().__init__()
        if select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"select_feature must be 'patch' or 'cls_patch', got {select_feature!r}")
        self.model = model
        cfg = model.config
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.feature_dim = cfg.hidden_size
        self.crop_size = int(crop_size or cfg.image_size)
        self.image_size = int(image_size or cfg.image_size)
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.resample = resample
        self.rescale_factor = rescale_factor
        self.num_tokens = (cfg.image_size // cfg.patch_size) ** 2 + (select_feature == "cls_patch")

    # -- preprocessing ------------------------------------------------------------
    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """RGB ``uint8 (H, W, 3)`` -> ``float32 (3, crop, crop)``."""
        h, w = image.shape[:2]
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.image_size, int(self.image_size * long / short)
        out_h, out_w = (new_long, new_short) if w <= h else (new_short, new_long)
        x = np.asarray(Image.fromarray(image).resize((out_w, out_h), resample=self.resample, reducing_gap=None))
        top, left = (out_h - self.crop_size) // 2, (out_w - self.crop_size) // 2
        x = x[top:top + self.crop_size, left:left + self.crop_size]
        x = (x * self.rescale_factor).astype(np.float32)  # uint8 * float64 scale, then float32
        x = (x - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))

    # -- forward ------------------------------------------------------------------
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=pixels.to(dtype), output_hidden_states=True)
        feats = out.hidden_states[self.select_layer]
        if self.select_feature == "patch":
            feats = feats[:, 1:]
        return feats.to(pixels.dtype)

    def normalize_keys(self, state: dict) -> dict:
        """Checkpoint keys ``model.vision_model.X`` (transformers 4.x ``CLIPVisionModel``)
        or ``model.X`` (5.x, which dropped the ``vision_model`` level) -> this model's."""
        nested = any(k.startswith("model.vision_model.") for k in self.state_dict())
        out = {}
        for k, v in state.items():
            if nested and k.startswith("model.") and not k.startswith("model.vision_model."):
                k = "model.vision_model." + k[len("model."):]
            elif not nested and k.startswith("model.vision_model."):
                k = "model." + k[len("model.vision_model."):]
            out[k] = v
        return out

    def export_config(self) -> dict:
        return {"config": hf_config_dict(self.model.config), "select_layer": self.select_layer,
                "select_feature": self.select_feature, "image_size": self.image_size, "crop_size": self.crop_size,
                "mean": self.mean.tolist(), "std": self.std.tolist()}


COMPONENT = "vision_encoder:hf_clip"


def _load_tower(path: Path, dtype: torch.dtype | None) -> torch.nn.Module:
    """A ``CLIPVisionModel`` from a ``CLIPVisionModel`` or whole ``CLIPModel`` directory,
    through lisa_kit's loader: built without memory, the vision tensors streamed in, each
    cast once to ``dtype`` (default: the dtype the config names, else float32, as
    transformers' ``from_pretrained``). Text-tower tensors and buffers of transformers 4.x
    (``position_ids``) are skipped; a missing vision tensor is an error."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from lisa_kit.checkpoint.io import Placer, empty_weights, iter_tensors
    from lisa_kit.checkpoint.safe import hf_load

    config = hf_load(CLIPVisionConfig.from_pretrained, path, component=COMPONENT)
    if dtype is None:
        named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype = resolve_dtype(named) if isinstance(named, str) and named != "auto" else named
    with empty_weights():
        model = CLIPVisionModel(config)
    placer = Placer(model, COMPONENT, dtype=dtype or torch.float32, file=path)
    for k, v, f in iter_tensors(path):
        # transformers 4.x names the tower `vision_model.X` (also inside a CLIPModel); 5.x `X`
        key = k if k in placer.expected else k.removeprefix("vision_model.")
        if k.startswith("vision_model.") or k in placer.expected:
            placer.put(key, v, f)
    placer.finish(strict=False)  # unexpected keys: text tower and old buffers, as transformers skips them
    missing = sorted(placer.expected - placer.seen)
    if missing:
        from lisa_kit.errors import CheckpointError

        raise CheckpointError(f"the CLIP tower in {path} lacks {len(missing)} weights (e.g. {', '.join(missing[:5])})",
                              component=COMPONENT, key=missing[0], file=path)
    return model


def build_hf_clip(pretrained: str | None = None, config: dict | None = None, select_layer: int = -2,
                  select_feature: str = "patch", image_size: int | None = None, crop_size: int | None = None,
                  mean: list | None = None, std: list | None = None, dtype: str | None = None) -> HFClipVisionEncoder:
    """``pretrained``: a local ``CLIPVisionModel``/``CLIPModel`` directory (weights loaded,
    in ``dtype`` when given, else as transformers loads them); ``config``: a ``CLIPVisionConfig`` dict (random
    weights; for tests and imports that load weights afterwards). Preprocessing values come
    from ``preprocessor_config.json`` when present."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    pre = {}
    if pretrained is not None:
        p = Path(pretrained)
        model = _load_tower(p, resolve_dtype(dtype))
        if (p / "preprocessor_config.json").exists():  # readable JSON: checked by hf_load
            pre = read_json(p / "preprocessor_config.json")
    elif config is not None:
        cfg = dict(config)
        cfg.pop("model_type", None)
        model = CLIPVisionModel(CLIPVisionConfig(**cfg))
    else:
        raise ValueError("hf_clip needs `pretrained` (a CLIP directory) or `config`")
    model.requires_grad_(False)
    size = pre.get("size", {})
    crop = pre.get("crop_size", {})
    return HFClipVisionEncoder(
        model, select_layer=select_layer, select_feature=select_feature,
        image_size=image_size or (size.get("shortest_edge") if isinstance(size, dict) else size),
        crop_size=crop_size or (crop.get("height") if isinstance(crop, dict) else crop),
        mean=mean or pre.get("image_mean", OPENAI_CLIP_MEAN), std=std or pre.get("image_std", OPENAI_CLIP_STD),
        resample=pre.get("resample", 3))


def sizes_hf_clip(pretrained: str | None = None, config: dict | None = None, **_) -> dict:
    """``feature_dim`` (the vision config's ``hidden_size``) from ``config`` or the
    ``config.json`` of ``pretrained`` (a ``CLIPModel`` directory's ``vision_config``),
    without building; ``{}`` when the directory is not there (the build reports it)."""
    if pretrained is not None:
        file = Path(pretrained) / "config.json"
        if not file.is_file():
            return {}
        cfg = read_json(file)
        if "vision_config" in cfg:  # a whole CLIPModel directory: its tower's config
            cfg = cfg["vision_config"] or {}
    elif config is not None:
        cfg = dict(config)
    else:
        return {}
    if "hidden_size" in cfg:
        return {"feature_dim": int(cfg["hidden_size"])}
    from transformers import CLIPVisionConfig  # not written: the library's default applies

    return {"feature_dim": int(CLIPVisionConfig().hidden_size)}


TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "image_size": 56, "patch_size": 14, "hidden_act": "quick_gelu", "projection_dim": 32}


@lisa_kit.hookimpl
def lisa_kit_components():
    return [ComponentSpec("vision_encoder", "hf_clip", build_hf_clip, tiny={"config": TINY_CLIP},
                          description="transformers CLIPVisionModel, select layer -2, patch tokens",
                          sizes=sizes_hf_clip)]
