"""Helpers shared by the transformers-backed decoders: checked ``from_pretrained``,
config dicts, and the pixel arithmetic of transformers' torchvision image processors."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lisa_kit.errors import CheckpointError

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


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``; nested dicts merge key by key (a copy is returned)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_pretrained(model_cls, path: str, component: str):
    """``model_cls.from_pretrained(path)`` from a local directory, refusing anything that
    does not fit exactly: a missing directory or file, or weights with missing, unexpected
    or mis-shaped keys raise :class:`CheckpointError` naming the path (transformers would
    only warn and leave those tensors randomly initialised)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise CheckpointError(f"pretrained directory not found: {p}", component=component, file=p)
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{p} has no config.json (expected a directory written by "
                              f"{model_cls.__name__}.save_pretrained)", component=component, file=p / "config.json")
    if not any((p / f).is_file() for f in WEIGHT_FILES):
        raise CheckpointError(f"no weights in {p} (looked for {', '.join(WEIGHT_FILES)})",
                              component=component, file=p)
    from lisa_kit.checkpoint.safe import hf_load

    # Mis-shaped tensors are reported below, by key, rather than as transformers' error.
    model, info = hf_load(model_cls.from_pretrained, p, component=component, what=model_cls.__name__,
                          output_loading_info=True, ignore_mismatched_sizes=True)
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
    return model


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
