"""SAM (Kirillov et al., 2023) through transformers' ``SamModel``: a second implementation
of lisa_kit's built-in ``sam`` mask decoder (which uses Meta's ``segment_anything``).

Weights: a ``facebook/sam-vit-{base,large,huge}`` directory in transformers' format
(``pretrained:``), or a Meta ``sam_vit_*.pth`` (``checkpoint:``), whose keys
:func:`meta_to_hf` renames into ``SamModel``'s layout. Given the same weights this
decoder and the built-in ``sam`` give the same mask logits (tested to 1e-4).

Preprocessing is ``SamImageProcessor``'s (torchvision backend): longest side to ``S``
(1024; sizes rounded half up), bilinear with antialiasing on the ``uint8`` image, ImageNet
mean/std, zero padding bottom/right to ``S x S``. Meta's (and the built-in ``sam``'s)
resize goes through PIL instead, so pixels can differ by a grey level here and there; to
reproduce LISA's numbers exactly, use ``sam``.

Shapes (``P`` = prompt size, 256 at full size): ``preprocess(uint8 (H, W, 3)) -> (3, S, S)``;
``encode_image((I, 3, S, S)) -> {"image_embeddings": (I, P, S/16, S/16)}``;
``decode(features, prompts (M, P)) -> low_res (M, 1, S/4, S/4), scores (M, 1)``;
``decode_geometry(features, boxes (M, 4), points (M, K, 2), point_labels (M, K))`` -> the same
(box/point prompts in the input frame, through ``SamModel``'s prompt encoder);
``postprocess(low_res, meta) -> (M, H, W)`` fp32 logits at the original size.
"""
from __future__ import annotations

import re
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from lisa_kit.interfaces import ImageMeta, MaskDecoder
from lisa_kit_sam2._hf import (
    DEFAULT_WIDTH,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DecoderConfigError,
    GeometryPrompts,
    ModelParts,
    build_decoder,
    decoder_width,
    deep_merge,
    make_config,
    normalize,
    resize_bilinear,
    to_uint8_chw,
)

COMPONENT = "mask_decoder:hf_sam"

# Meta's released ViT sizes (segment_anything/build_sam.py) as SamConfig dicts; the
# prompt encoder and mask decoder are transformers' defaults, which are SAM's.
VARIANTS = {
    "vit_b": {"vision_config": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                                "global_attn_indexes": [2, 5, 8, 11]}},
    "vit_l": {"vision_config": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                                "global_attn_indexes": [5, 11, 17, 23]}},
    "vit_h": {"vision_config": {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 16,
                                "global_attn_indexes": [7, 15, 23, 31]}},
}

# The sizes of the built-in `sam` component's tiny configuration (lisa_kit.components.sam.TINY_SAM).
TINY_HF_SAM = {
    "vision_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 64,
                      "patch_size": 16, "global_attn_indexes": [0], "window_size": 2},
    "prompt_encoder_config": {"hidden_size": 32, "image_size": 64, "patch_size": 16},
    "mask_decoder_config": {"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 2, "iou_head_hidden_dim": 32},
}


def sam_config(config: dict, config_cls=None, component: str = COMPONENT):
    """A ``SamConfig`` (or ``config_cls``: ``SamHQConfig``, same layout) from a plain dict.
    Where the vision config leaves them out, its ``output_channels`` (the embedding width)
    and ``num_pos_feats`` (half of it) follow the prompt encoder's ``hidden_size``, which
    they must equal."""
    if config_cls is None:
        from transformers import SamConfig as config_cls

    cfg = deep_merge({}, config)
    width = cfg.setdefault("prompt_encoder_config", {}).get("hidden_size", DEFAULT_WIDTH)
    vision = cfg.setdefault("vision_config", {})
    vision.setdefault("output_channels", width)
    vision.setdefault("num_pos_feats", width // 2)
    return make_config(config_cls, cfg, component)


# -- Meta's key layout -> SamModel's --------------------------------------------------
_RENAMES = [  # (pattern, replacement), first match wins; keys that match none keep their name
    (r"^image_encoder\.patch_embed\.proj\.", "vision_encoder.patch_embed.projection."),
    (r"^image_encoder\.blocks\.(\d+)\.norm(\d)\.", r"vision_encoder.layers.\1.layer_norm\2."),
    (r"^image_encoder\.blocks\.(\d+)\.", r"vision_encoder.layers.\1."),
    (r"^image_encoder\.neck\.0\.", "vision_encoder.neck.conv1."),
    (r"^image_encoder\.neck\.1\.", "vision_encoder.neck.layer_norm1."),
    (r"^image_encoder\.neck\.2\.", "vision_encoder.neck.conv2."),
    (r"^image_encoder\.neck\.3\.", "vision_encoder.neck.layer_norm2."),
    (r"^image_encoder\.", "vision_encoder."),
    (r"^prompt_encoder\.point_embeddings\.", "prompt_encoder.point_embed."),
    (r"^prompt_encoder\.mask_downscaling\.0\.", "prompt_encoder.mask_embed.conv1."),
    (r"^prompt_encoder\.mask_downscaling\.1\.", "prompt_encoder.mask_embed.layer_norm1."),
    (r"^prompt_encoder\.mask_downscaling\.3\.", "prompt_encoder.mask_embed.conv2."),
    (r"^prompt_encoder\.mask_downscaling\.4\.", "prompt_encoder.mask_embed.layer_norm2."),
    (r"^prompt_encoder\.mask_downscaling\.6\.", "prompt_encoder.mask_embed.conv3."),
    (r"^mask_decoder\.transformer\.layers\.(\d+)\.norm(\d)\.", r"mask_decoder.transformer.layers.\1.layer_norm\2."),
    (r"^mask_decoder\.transformer\.norm_final_attn\.", "mask_decoder.transformer.layer_norm_final_attn."),
    (r"^mask_decoder\.output_upscaling\.0\.", "mask_decoder.upscale_conv1."),
    (r"^mask_decoder\.output_upscaling\.1\.", "mask_decoder.upscale_layer_norm."),
    (r"^mask_decoder\.output_upscaling\.3\.", "mask_decoder.upscale_conv2."),
]
# Meta's MLP(layers.0 .. layers.{n-1}) is transformers' SamFeedForward(proj_in, layers.0 .. layers.{n-3}, proj_out).
_MLP = re.compile(r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.layers\.(\d+)\.(.*)$")
_META_PE = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
_HF_PE = ("shared_image_embedding.positional_embedding", "prompt_encoder.shared_embedding.positional_embedding")
_META_ONLY = ("pixel_mean", "pixel_std")  # constants, not weights (non-persistent in segment_anything)


def is_meta_layout(state: dict) -> bool:
    """SAM weights in Meta's layout (a released LISA checkpoint's decoder, a ``sam_vit_*.pth``)."""
    return any(k.startswith("image_encoder.") or k == _META_PE for k in state)


def meta_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A SAM state dict in Meta's layout (``image_encoder.*``, ``prompt_encoder.*``,
    ``mask_decoder.*``) renamed into ``SamModel``'s. The random-Fourier matrix becomes both
    of ``SamModel``'s (tied) positional embeddings."""
    depth: dict[str, int] = {}
    for k in state:
        m = _MLP.match(k)
        if m:
            depth[m.group(1)] = max(depth.get(m.group(1), 0), int(m.group(2)) + 1)
    out = {}
    for k, v in state.items():
        if k in _META_ONLY:
            continue
        if k == _META_PE:
            out.update({name: v for name in _HF_PE})
            continue
        m = _MLP.match(k)
        if m:
            mlp, i, rest = m.group(1), int(m.group(2)), m.group(3)
            part = "proj_in" if i == 0 else "proj_out" if i == depth[mlp] - 1 else f"layers.{i - 1}"
            out[f"{mlp}.{part}.{rest}"] = v
            continue
        for pattern, repl in _RENAMES:
            new, n = re.subn(pattern, repl, k)
            if n:
                k = new
                break
        out[k] = v
    return out


class HFSamMaskDecoder(GeometryPrompts, ModelParts, MaskDecoder):
    """``model``: a transformers ``SamModel``. ``mean``/``std``: the processor's (ImageNet)."""

    component = COMPONENT
    #: What keeps fp32 in any precision: the prompt encoder and the mask decoder, whose
    #: positional encoding transformers computes in fp32, and the positional matrix they
    #: share. The ViT, nearly all the weights, takes the precision asked for, as the
    #: original LISA runs SAM's image encoder in bf16 (and as the built-in ``sam`` does).
    fp32_prefixes = ("model.prompt_encoder.", "model.mask_decoder.", "model.shared_image_embedding.")

    def __init__(self, model, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.model = model
        cfg = model.config
        pe, md, vc = cfg.prompt_encoder_config, cfg.mask_decoder_config, cfg.vision_config
        self.image_size = int(pe.image_size)
        self.prompt_dim = int(md.hidden_size)
        if not (vc.output_channels == pe.hidden_size == md.hidden_size):
            raise DecoderConfigError(f"{self.component}: the image embedding ({vc.output_channels}), prompt encoder "
                                     f"({pe.hidden_size}) and mask decoder ({md.hidden_size}) widths must be equal")
        if int(vc.image_size) != self.image_size:
            raise DecoderConfigError(f"{self.component}: the image encoder's image_size ({vc.image_size}) differs "
                                     f"from the prompt encoder's ({self.image_size})")
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    # -- preprocessing ------------------------------------------------------------
    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, ImageMeta]:
        """``uint8 (H, W, 3) -> float32 (3, S, S)``: ``SamImageProcessor``'s longest-side
        resize, normalisation and zero padding (bottom/right)."""
        chw = to_uint8_chw(image)
        h, w = image.shape[:2]
        scale = self.image_size * 1.0 / max(h, w)
        nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
        x = normalize(resize_bilinear(chw, (nh, nw)), self.mean, self.std)
        x = F.pad(x, (0, self.image_size - nw, 0, self.image_size - nh))
        return x, ImageMeta(original_size=(h, w), input_size=(nh, nw))

    # -- model --------------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(I, 3, S, S)`` -> ``{"image_embeddings": (I, P, S/16, S/16)}``."""
        return {"image_embeddings": torch.cat([out.last_hidden_state for out in self._encode_each(pixels)], 0)}

    def _encode_each(self, pixels: torch.Tensor) -> list:
        # One image at a time, as the built-in `sam`: ViT activations at 1024 px dominate memory.
        dtype = self.encoder_dtype()
        return [self.model.vision_encoder(pixels[i:i + 1].to(dtype)) for i in range(pixels.shape[0])]

    def decode(self, features: dict[str, torch.Tensor], prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``features`` of one image, ``prompts (M, P)`` (each the only sparse token of its
        mask) -> ``(M, 1, S/4, S/4)`` logits and ``(M, 1)`` predicted IoU."""
        return self.decode_tokens(features, prompts[:, None, :])

    def decode_tokens(self, features: dict[str, torch.Tensor],
                      tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens (M, T, P)``: ``T`` sparse prompt tokens per mask (``decode`` uses one;
        ``decode_geometry`` the prompt encoder's point/box tokens)."""
        emb = features["image_embeddings"].to(self.decoder_dtype())  # (1, P, h, w)
        sparse = tokens.to(emb.dtype)[None]  # one image, M prompt sets
        h, w = emb.shape[-2:]
        dense = self.model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, h, w).to(emb.dtype)
        pos = self.model.get_image_wide_positional_embeddings().to(emb.dtype)
        masks, iou = self.model.mask_decoder(image_embeddings=emb, image_positional_embeddings=pos,
                                             sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                             multimask_output=False, **self._decoder_extras(features))
        return masks[0], iou[0]  # (M, 1, 4h, 4w), (M, 1)

    def _decoder_extras(self, features: dict[str, torch.Tensor]) -> dict:
        """More arguments of the transformers mask decoder (SAM's takes none)."""
        return {}

    def postprocess(self, low_res: torch.Tensor, meta: ImageMeta) -> torch.Tensor:
        """Upsample to the padded square, crop the resized image, resize to the original
        size (``post_process_masks``; bilinear, fp32)."""
        x = F.interpolate(low_res.float(), (self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = x[..., : meta.input_size[0], : meta.input_size[1]]
        x = F.interpolate(x, tuple(meta.original_size), mode="bilinear", align_corners=False)
        return x[:, 0]

    def normalize_keys(self, state: dict) -> dict:
        """Checkpoint keys in Meta's layout (as in released LISA checkpoints) or bare
        ``SamModel`` keys -> this component's (``model.<SamModel key>``)."""
        if is_meta_layout(state):
            state = meta_to_hf(state)
        return {k if k.startswith("model.") else f"model.{k}": v for k, v in state.items()}

    def export_config(self) -> dict:
        from lisa_kit.components._util import hf_config_dict

        return {"config": hf_config_dict(self.model.config), "mean": list(self.mean), "std": list(self.std)}


def build_hf_sam(variant: Literal["vit_b", "vit_l", "vit_h"] | None = None, pretrained: str | None = None,
                 config: dict | None = None, checkpoint: str | None = None,
                 mean: list[float] | None = None, std: list[float] | None = None,
                 dtype: str | torch.dtype | None = None) -> HFSamMaskDecoder:
    """``pretrained``: a ``SamModel`` directory (``facebook/sam-vit-*``: ``config.json`` +
    ``model.safetensors``). Otherwise the architecture comes from ``variant`` and/or
    ``config`` (a ``SamConfig`` dict over the variant's), random weights, and
    ``checkpoint`` may load a Meta ``sam_vit_*.pth`` (or safetensors, either layout) into it.
    ``dtype``: the precision ``pretrained``'s (or ``checkpoint``'s) weights are read into,
    each tensor once, by the component's rule (:func:`~lisa_kit_sam2._hf.load_pretrained`;
    the ViT takes ``dtype``, :attr:`HFSamMaskDecoder.fp32_prefixes` stay fp32); random
    weights stay fp32 (the builder casts them)."""
    from transformers import SamModel

    from lisa_kit.components._util import resolve_dtype

    if pretrained is not None and checkpoint is not None:
        raise DecoderConfigError("hf_sam: give either `pretrained` or `variant`/`config`/`checkpoint`, not both")
    dtype = resolve_dtype(dtype)
    comp = build_decoder(HFSamMaskDecoder, SamModel, sam_config, VARIANTS, variant, pretrained, config, ("sam",),
                         dtype, mean, std)
    if checkpoint is not None:
        from lisa_kit.checkpoint.io import load_into, load_state_dict

        load_into(comp, comp.normalize_keys(load_state_dict(checkpoint)), component=COMPONENT, strict=True,
                  dtype=dtype)
    return comp


def sizes_hf_sam(variant: str | None = None, pretrained: str | None = None, config: dict | None = None, **_) -> dict:
    """``prompt_dim`` from the configs (no weights read, nothing built)."""
    return decoder_width(VARIANTS, variant, pretrained, config)
