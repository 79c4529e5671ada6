"""SAM2 (Ravi et al., 2024) as lisa_kit's mask decoder, through transformers' ``Sam2Model``.

Why transformers and not Meta's ``sam2`` package: ``Sam2Model`` ships with transformers,
which lisa_kit already depends on (no extra dependency, and Meta's package is not
installed here); Meta publishes the official weights in transformers' format
(``facebook/sam2.1-hiera-{tiny,small,base-plus,large}``: ``config.json`` +
``model.safetensors``), so they load through ``from_pretrained`` like the CLIP tower and
the LLM do; and a random instance is built from a ``Sam2Config`` dict, which is how the
tests build everything else.

How LISA's recipe maps onto SAM2 (image mode, one frame, no memory):

* ``preprocess``: what ``Sam2ImageProcessor`` does: resize to the square ``S x S`` (1024)
  **without** keeping the aspect ratio (bilinear with antialiasing on the ``uint8`` image),
  rescale to [0, 1], ImageNet mean/std. No padding, so ``ImageMeta.input_size = (S, S)``.
* ``encode_image``: the Hiera trunk and FPN neck give three levels (strides 4, 8, 16).
  The stride-16 level plus SAM2's ``no_memory_embedding`` (``directly_add_no_mem_embed``)
  is the image embedding; the stride-4 and stride-8 levels are returned too, raw. The
  mask decoder's own ``conv_s0``/``conv_s1`` project them in ``decode`` (transformers
  precomputes them in ``get_image_features``; doing it in ``decode`` lets them train with
  the decoder, as they belong to it, while the image encoder runs without a graph).
* ``decode``: the seg head's prompt is the only sparse token (``(M, 1, P)``, LISA's text
  embedding as a prompt; no points, boxes or mask input, so the dense prompt is
  ``no_mask_embed``); the decoder's upsampling adds the high-resolution maps; single mask
  (``multimask_output=False``). SAM2's "dynamic multimask via stability" (in eval mode,
  swap an unstable single mask for the best of the three multimask outputs) is off by
  default: LISA trains the single-mask token, and training and evaluation should decode
  the same way (``dynamic_multimask: true`` restores SAM2's click behaviour). The
  object-score head is computed by the decoder but not applied (SAM2's image predictor
  does not apply it either).
* ``decode_geometry(features, boxes (M, 4), points (M, K, 2), point_labels (M, K))``: box
  and point prompts in the input frame, embedded by the model's own prompt encoder as
  ``Sam2Model.forward`` embeds ``input_boxes``/``input_points``, then decoded as above.
* ``postprocess``: bilinear to the original size (what ``post_process_masks`` and SAM2's
  own predictor do; there is no padding to crop).

Shapes (``S`` = image size, ``P`` = prompt size = FPN width, 256 at full size):
``preprocess(uint8 (H, W, 3)) -> (3, S, S)``;
``encode_image((I, 3, S, S)) -> {"image_embeddings": (I, P, S/16, S/16),
"high_res_feats_0": (I, P, S/4, S/4), "high_res_feats_1": (I, P, S/8, S/8)}``;
``decode(features (batch 1), prompts (M, P)) -> low_res (M, 1, S/4, S/4), scores (M, 1)``;
``postprocess(low_res, meta) -> (M, H, W)`` fp32 logits at the original size.

The transformers model is ``self.model`` (state-dict keys ``model.<Sam2Model key>``);
``image_encoder``, ``prompt_encoder`` and ``mask_decoder`` name its parts, so LISA's
training rule (train the mask decoder, freeze the rest) and the benchmark's parameter
split work unchanged.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from lisa_kit.interfaces import ImageMeta, MaskDecoder
from lisa_kit_sam2._hf import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DecoderConfigError,
    ForeignWeightsWarning,
    GeometryPrompts,
    ModelParts,
    build_decoder,
    decoder_width,
    deep_merge,
    make_config,
    sam_weights_or_none,
    square_preprocess,
)
from lisa_kit_sam2.hf_sam import is_meta_layout

COMPONENT = "mask_decoder:sam2"
HIERA_MODEL_TYPE = "sam2_hiera_det_model"


class Sam2Warning(ForeignWeightsWarning):
    """Weights a checkpoint holds for another decoder were left out."""


def _hiera(embed_dim: int, heads: int, blocks: list[int], global_blocks: list[int], bkg: list[int],
           windows: list[int]) -> dict:
    """A ``Sam2Config`` dict for one released trunk (Meta's ``sam2.1_hiera_*.yaml``: the
    Hiera doubles width and heads at each of its four stages)."""
    dims = [embed_dim * 2 ** i for i in range(4)]
    return {"vision_config": {
        "backbone_config": {"model_type": HIERA_MODEL_TYPE, "hidden_size": embed_dim, "embed_dim_per_stage": dims,
                            "num_attention_heads_per_stage": [heads * 2 ** i for i in range(4)],
                            "blocks_per_stage": blocks, "global_attention_blocks": global_blocks,
                            "window_positional_embedding_background_size": bkg, "window_size_per_stage": windows},
        "backbone_channel_list": dims[::-1]}}


# Random-weight shapes of the released checkpoints (the prompt encoder and mask decoder
# are transformers' defaults, which are SAM2's: 256 wide, 1024 px).
VARIANTS = {
    "hiera_tiny": _hiera(96, 1, [1, 2, 7, 2], [5, 7, 9], [7, 7], [8, 4, 14, 7]),
    "hiera_small": _hiera(96, 1, [1, 2, 11, 2], [7, 10, 13], [7, 7], [8, 4, 14, 7]),
    "hiera_base_plus": _hiera(112, 2, [2, 3, 16, 3], [12, 16, 20], [14, 14], [8, 4, 14, 7]),
    "hiera_large": _hiera(144, 2, [2, 6, 36, 4], [23, 33, 43], [7, 7], [8, 4, 16, 8]),
}

# The smallest SAM2 that keeps every structural feature: four Hiera stages (one global-
# attention block, which may not open a pooled stage), three FPN levels with the top-down
# path, 64 px input (stride-16 embedding 4x4), 32-wide prompt encoder and decoder.
TINY_SAM2 = {
    "vision_config": {
        "backbone_config": {"model_type": HIERA_MODEL_TYPE, "hidden_size": 8, "embed_dim_per_stage": [8, 16, 32, 64],
                            "num_attention_heads_per_stage": [1, 1, 2, 2], "blocks_per_stage": [1, 1, 2, 1],
                            "global_attention_blocks": [3], "window_size_per_stage": [4, 4, 4, 2],
                            "window_positional_embedding_background_size": [4, 4], "image_size": [64, 64]},
        "backbone_channel_list": [64, 32, 16, 8], "backbone_feature_sizes": [[16, 16], [8, 8], [4, 4]],
        "fpn_hidden_size": 32},
    "prompt_encoder_config": {"hidden_size": 32, "image_size": 64, "patch_size": 16},
    "mask_decoder_config": {"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 2, "iou_head_hidden_dim": 32},
}


def sam2_config(config: dict):
    """A ``Sam2Config`` from a plain dict (the ``config:`` recipe value, or what
    :meth:`Sam2MaskDecoder.export_config` wrote). The Hiera sub-config's ``model_type`` is
    filled in when left out (transformers needs it to pick the backbone class)."""
    from transformers import Sam2Config

    cfg = deep_merge({}, config)
    backbone = cfg.setdefault("vision_config", {}).setdefault("backbone_config", {})
    if isinstance(backbone, dict):
        backbone.setdefault("model_type", HIERA_MODEL_TYPE)
    return make_config(Sam2Config, cfg, COMPONENT)


class Sam2MaskDecoder(GeometryPrompts, ModelParts, MaskDecoder):
    """``model``: a transformers ``Sam2Model``. ``mean``/``std``: the processor's (ImageNet)."""

    component = COMPONENT
    label = "SAM2"  # in messages
    warning = Sam2Warning
    #: What keeps fp32 in any precision: the prompt side -- the prompt encoder, the mask
    #: decoder (with its stride-4/8 projections), the positional matrix they share and the
    #: no-memory embedding -- as SAM's does. The image encoder (Hiera or EdgeTAM's RepViT
    #: trunk and the FPN neck), nearly all the weights, takes the precision asked for.
    fp32_prefixes = ("model.prompt_encoder.", "model.mask_decoder.", "model.shared_image_embedding.",
                     "model.no_memory_embedding")

    def __init__(self, model, dynamic_multimask: bool = False, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.model = model
        cfg = model.config
        pe, md, vc = cfg.prompt_encoder_config, cfg.mask_decoder_config, cfg.vision_config
        self.image_size = int(pe.image_size)
        self.prompt_dim = int(md.hidden_size)
        if not (vc.fpn_hidden_size == pe.hidden_size == md.hidden_size):
            raise DecoderConfigError(f"{self.component}: the FPN width ({vc.fpn_hidden_size}), prompt encoder "
                                     f"({pe.hidden_size}) and mask decoder ({md.hidden_size}) hidden sizes must be "
                                     "equal")
        self._check_image_size(vc)
        self.dynamic_multimask = bool(dynamic_multimask)
        model.mask_decoder.dynamic_multimask_via_stability = self.dynamic_multimask
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def _check_image_size(self, vision_config) -> None:
        """The Hiera trunk is built for one input size: the prompt encoder's."""
        backbone_size = vision_config.backbone_config.image_size
        backbone_size = backbone_size[0] if isinstance(backbone_size, (list, tuple)) else backbone_size
        if int(backbone_size) != self.image_size:
            raise DecoderConfigError(f"{self.component}: the image encoder's image_size ({backbone_size}) differs "
                                     f"from the prompt encoder's ({self.image_size})")

    # -- preprocessing ------------------------------------------------------------
    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, ImageMeta]:
        """``uint8 (H, W, 3) -> float32 (3, S, S)``: ``Sam2ImageProcessor``'s square resize
        (aspect ratio not kept) and normalisation."""
        return square_preprocess(image, self.image_size, self.mean, self.std)

    # -- model --------------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(I, 3, S, S)`` -> the stride-16 embedding (with ``no_memory_embedding``) and
        the raw stride-4/8 FPN maps, every value with batch dimension ``I``."""
        out = self.model.vision_encoder(pixels.to(self.encoder_dtype()), return_dict=True)
        s4, s8, s16 = out.fpn_hidden_states  # high to low resolution
        emb = s16 + self.model.no_memory_embedding.reshape(1, -1, 1, 1).to(s16.dtype)
        return {"image_embeddings": emb, "high_res_feats_0": s4, "high_res_feats_1": s8}

    def decode(self, features: dict[str, torch.Tensor], prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``features`` of one image, ``prompts (M, P)`` (each the only sparse token of its
        mask) -> ``(M, 1, S/4, S/4)`` logits and ``(M, 1)`` predicted IoU."""
        return self.decode_tokens(features, prompts[:, None, :])

    def decode_tokens(self, features: dict[str, torch.Tensor],
                      tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens (M, T, P)``: ``T`` sparse prompt tokens per mask (``decode`` uses one;
        ``decode_geometry`` the prompt encoder's point/box tokens)."""
        md = self.model.mask_decoder
        dtype = self.decoder_dtype()
        emb = features["image_embeddings"].to(dtype)  # (1, P, h, w)
        high_res = [md.conv_s0(features["high_res_feats_0"].to(dtype)),  # (1, P/8, 4h, 4w)
                    md.conv_s1(features["high_res_feats_1"].to(dtype))]  # (1, P/4, 2h, 2w)
        # transformers' decoder takes (images, prompt sets, tokens, P): one image, M sets.
        sparse = tokens.to(emb.dtype)[None]
        h, w = emb.shape[-2:]
        dense = self.model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, h, w).to(emb.dtype)
        pos = self.model.get_image_wide_positional_embeddings().to(emb.dtype)  # (1, P, h, w)
        masks, iou, _, _ = md(image_embeddings=emb, image_positional_embeddings=pos,
                              sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                              multimask_output=False, high_resolution_features=high_res)
        return masks[0], iou[0]  # (M, 1, 4h, 4w), (M, 1)

    def postprocess(self, low_res: torch.Tensor, meta: ImageMeta) -> torch.Tensor:
        """Bilinear to the original size (fp32: mask logits stay fp32 in any precision)."""
        x = F.interpolate(low_res.float(), tuple(meta.original_size), mode="bilinear", align_corners=False)
        return x[:, 0]

    def normalize_keys(self, state: dict) -> dict | None:
        """Checkpoint keys -> this component's. A released LISA checkpoint holds SAM (ViT)
        weights, which do not fit SAM2: ``None`` tells its importer to leave this decoder
        as built (weights from ``pretrained``); bare ``Sam2Model`` keys get the ``model.``
        prefix."""
        return sam_weights_or_none(state, self.component, self.label, self.warning, is_meta_layout)

    def export_config(self) -> dict:
        from lisa_kit.components._util import hf_config_dict

        return {"config": hf_config_dict(self.model.config), "dynamic_multimask": self.dynamic_multimask,
                "mean": list(self.mean), "std": list(self.std)}


def build_sam2(variant: Literal["hiera_tiny", "hiera_small", "hiera_base_plus", "hiera_large"] | None = None,
               pretrained: str | None = None, config: dict | None = None, dynamic_multimask: bool = False,
               mean: list[float] | None = None, std: list[float] | None = None,
               dtype: str | torch.dtype | None = None) -> Sam2MaskDecoder:
    """``pretrained``: a directory written by ``Sam2Model.save_pretrained`` (or an official
    ``facebook/sam2.1-hiera-*`` download: ``config.json`` + ``model.safetensors``; its video
    parts are skipped); every image-model weight must be there. ``variant``: a released
    size with random weights; ``config``: a ``Sam2Config`` dict (over the variant's, if
    both). ``mean``/``std`` default to the directory's ``preprocessor_config.json``, else
    ImageNet's. ``dtype``: the precision ``pretrained``'s weights are read into, each tensor
    once, by the component's rule (:func:`~lisa_kit_sam2._hf.load_pretrained`: the image
    encoder takes ``dtype``, :attr:`Sam2MaskDecoder.fp32_prefixes` stay fp32); random weights
    stay fp32 (the builder casts them)."""
    from transformers import Sam2Model

    return build_decoder(Sam2MaskDecoder, Sam2Model, sam2_config, VARIANTS, variant, pretrained, config,
                         ("sam2", "sam2_video"), dtype, mean, std, dynamic_multimask=dynamic_multimask)


def sizes_sam2(variant: str | None = None, pretrained: str | None = None, config: dict | None = None, **_) -> dict:
    """``prompt_dim`` from the configs (no weights read, nothing built)."""
    return decoder_width(VARIANTS, variant, pretrained, config)
