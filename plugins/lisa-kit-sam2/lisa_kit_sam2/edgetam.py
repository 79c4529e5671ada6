"""EdgeTAM (Zhou et al., CVPR 2025, "EdgeTAM: On-Device Track Anything Model") through
transformers' ``EdgeTamModel``, image mode.

EdgeTAM is SAM2 with the Hiera trunk replaced by a small convolutional one (timm's RepViT
M1, through transformers' ``TimmWrapperModel``); its FPN neck, prompt encoder, mask decoder
(with the stride-4/8 high-resolution path), ``no_memory_embedding`` and processor
(``Sam2ImageProcessor``: square resize) are SAM2's, and ``EdgeTamModel`` subclasses
``Sam2Model``. So this component is :class:`~lisa_kit_sam2.sam2.Sam2MaskDecoder` (the
same ``preprocess``/``encode_image``/``decode``/``postprocess`` and shapes, the [SEG]
prompt as the only sparse token) over an ``EdgeTamModel``; only the configuration differs.

The trunk is a timm model named by ``vision_config.backbone_config.architecture`` and built
by timm with ``pretrained=False`` (no download: its weights come from ``pretrained:``, an
``EdgeTamModel`` directory, or stay random). transformers' own default backbone config
misspells that key (``archirecture``) and so silently builds a resnet50; here the
architecture must be named (the ``repvit_m1`` variant and the tiny config do).

Shapes: as ``sam2`` (``S`` = 1024 at full size; the trunk's strides 4..32, the three finest
FPN levels used).
"""
from __future__ import annotations

from typing import Literal

import torch

from lisa_kit_sam2._hf import (
    DecoderConfigError,
    ForeignWeightsWarning,
    build_decoder,
    decoder_width,
    deep_merge,
    make_config,
)
from lisa_kit_sam2.sam2 import Sam2MaskDecoder

COMPONENT = "mask_decoder:edgetam"
VISION_MODEL_TYPE = "edgetam_vision_model"
# What EdgeTAM's trunk must give: a timm feature extractor (a list of maps, one per stage).
TIMM_FEATURES = {"in_chans": 3, "features_only": True}
# Keys transformers' TimmWrapperConfig.to_dict writes for a classifier head; the wrapped
# model is built without a head (num_classes=0), and the constructor refuses num_classes=None.
_TIMM_HEAD_KEYS = ("model_type", "num_classes", "label_names", "id2label", "label2id")

# EdgeTAM as released (EdgeTAM's `edgetam.yaml`, transformers' EdgeTamConfig defaults with the
# trunk's name spelled right): RepViT-M1 (48..384 wide, strides 4..32), 256-wide FPN, 1024 px.
VARIANTS = {
    "repvit_m1": {"vision_config": {
        "backbone_config": {"architecture": "repvit_m1",
                            "model_args": {**TIMM_FEATURES, "out_indices": [0, 1, 2, 3]}},
        "backbone_channel_list": [384, 192, 96, 48],
        "backbone_feature_sizes": [[256, 256], [128, 128], [64, 64]]}},
}

# RepViT with one block per stage, 8..64 wide, at 64 px (FPN levels 16, 8, 4 px wide),
# 32-wide FPN, prompt encoder and decoder: every structural part of EdgeTAM, tiny.
TINY_EDGETAM = {
    "vision_config": {
        "backbone_config": {"architecture": "repvit_m1",
                            "model_args": {**TIMM_FEATURES, "out_indices": [0, 1, 2, 3],
                                           "embed_dim": [8, 16, 32, 64], "depth": [1, 1, 1, 1]}},
        "backbone_channel_list": [64, 32, 16, 8], "backbone_feature_sizes": [[16, 16], [8, 8], [4, 4]],
        "fpn_hidden_size": 32},
    "prompt_encoder_config": {"hidden_size": 32, "image_size": 64, "patch_size": 16},
    "mask_decoder_config": {"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 2, "iou_head_hidden_dim": 32},
}


class EdgeTamWarning(ForeignWeightsWarning):
    """A released LISA checkpoint's SAM weights were not loaded into EdgeTAM."""


def edgetam_config(config: dict):
    """An ``EdgeTamConfig`` from a plain dict (the ``config:`` recipe value, or what
    ``export_config`` wrote). The trunk's ``backbone_config`` becomes a ``TimmWrapperConfig``
    (transformers fails on a dict without ``num_classes``), built as a feature extractor;
    its ``architecture`` must be given and be a timm model."""
    import timm
    from transformers import EdgeTamConfig, TimmWrapperConfig

    cfg = deep_merge({}, config)
    vision = cfg.setdefault("vision_config", {})
    vision.setdefault("model_type", VISION_MODEL_TYPE)
    backbone = vision.get("backbone_config")
    if isinstance(backbone, dict):
        arch = backbone.get("architecture")
        if not arch:
            raise DecoderConfigError(
                f"{COMPONENT}: vision_config.backbone_config.architecture must name the timm trunk (e.g. repvit_m1); "
                "transformers' default config misspells the key and would silently build a resnet50")
        if not timm.is_model(arch):
            raise DecoderConfigError(f"{COMPONENT}: vision_config.backbone_config.architecture {arch!r} is not a "
                                     "timm model")
        backbone = {k: v for k, v in backbone.items() if k not in _TIMM_HEAD_KEYS}
        backbone["model_args"] = {**TIMM_FEATURES, **(backbone.get("model_args") or {})}
        vision["backbone_config"] = make_config(TimmWrapperConfig, backbone, COMPONENT)
    elif backbone is None:
        raise DecoderConfigError(f"{COMPONENT}: vision_config.backbone_config is missing (give `variant: repvit_m1` "
                                 "or a backbone_config naming a timm architecture)")
    return make_config(EdgeTamConfig, cfg, COMPONENT)


class EdgeTamMaskDecoder(Sam2MaskDecoder):
    """``model``: a transformers ``EdgeTamModel`` (everything else as :class:`Sam2MaskDecoder`)."""

    component = COMPONENT
    label = "EdgeTAM"
    warning = EdgeTamWarning

    def _check_image_size(self, vision_config) -> None:
        """A convolutional trunk takes any size, but the stride-16 FPN level (the image
        embedding) must be the prompt encoder's grid (``image_size / patch_size``)."""
        pe = self.model.config.prompt_encoder_config
        grid = [self.image_size // int(pe.patch_size)] * 2
        finest_last = [int(v) for v in vision_config.backbone_feature_sizes[-1]]
        if finest_last != grid:
            raise DecoderConfigError(f"{self.component}: the image embedding's size {finest_last} "
                                     f"(vision_config.backbone_feature_sizes[-1]) must be the prompt encoder's grid "
                                     f"{grid} (image_size / patch_size)")


def build_edgetam(variant: Literal["repvit_m1"] | None = None, pretrained: str | None = None,
                  config: dict | None = None, dynamic_multimask: bool = False,
                  mean: list[float] | None = None, std: list[float] | None = None,
                  dtype: str | torch.dtype | None = None) -> EdgeTamMaskDecoder:
    """``pretrained``: a directory written by ``EdgeTamModel.save_pretrained`` (an
    ``EdgeTamVideoModel`` directory's memory weights are skipped). ``variant: repvit_m1``
    (EdgeTAM's shapes) and/or ``config`` (an ``EdgeTamConfig`` dict over the variant's):
    random weights. ``dynamic_multimask``, ``mean``/``std``, ``dtype``: as ``sam2``."""
    from transformers import EdgeTamModel

    return build_decoder(EdgeTamMaskDecoder, EdgeTamModel, edgetam_config, VARIANTS, variant, pretrained, config,
                         ("edgetam", "edgetam_video"), dtype, mean, std, dynamic_multimask=dynamic_multimask)


def sizes_edgetam(variant: str | None = None, pretrained: str | None = None, config: dict | None = None,
                  **_) -> dict:
    """``prompt_dim`` from the configs (no weights read, nothing built)."""
    return decoder_width(VARIANTS, variant, pretrained, config)
