"""SAM-HQ (Ke et al., NeurIPS 2023, "Segment Anything in High Quality") through
transformers' ``SamHQModel``.

SAM-HQ is SAM plus a learned "HQ output token" and a fusion of early and late ViT
features; everything else (ViT image encoder, prompt encoder, two-way transformer, the
processor) is SAM's, so this component is :class:`~lisa_kit_sam2.hf_sam.HFSamMaskDecoder`
with two changes:

* ``encode_image`` also returns the output of the ViT's first global-attention block
  (``vit_features``, ``(I, S/16, S/16, Dvit)`` channels last, as transformers keeps it), the
  early features SAM-HQ's decoder fuses with the image embedding;
* ``decode`` passes them to ``SamHQMaskDecoder``, whose mask is SAM's mask token's plus the
  HQ token's (``hq_token_only: false``, transformers' and SAM-HQ's default), or the HQ
  token's alone (``hq_token_only: true``). The score is SAM's IoU prediction for the single
  mask (``multimask_output=False``), as in SAM-HQ's predictor.

Weights: a ``SamHQModel`` directory (``pretrained:``; e.g. ``syscv-community/sam-hq-vit-*``,
``config.json`` + ``model.safetensors``), or ``variant``/``config`` for random weights. A
released LISA checkpoint holds plain SAM weights: they are not loaded into SAM-HQ (warning),
which keeps its ``pretrained`` weights.

Shapes (``P`` = prompt size, 256 at full size): as ``hf_sam``, plus
``encode_image`` -> ``{"image_embeddings": (I, P, S/16, S/16), "vit_features": (I, S/16, S/16, Dvit)}``.
"""
from __future__ import annotations

from typing import Literal

import torch

from lisa_kit_sam2._hf import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ForeignWeightsWarning,
    build_decoder,
    decoder_width,
    deep_merge,
    sam_weights_or_none,
)
from lisa_kit_sam2.hf_sam import (
    TINY_HF_SAM,
    HFSamMaskDecoder,
    is_meta_layout,
    sam_config,
)
from lisa_kit_sam2.hf_sam import VARIANTS as SAM_VARIANTS

COMPONENT = "mask_decoder:sam_hq"
# The early-feature key of `encode_image`: the first global-attention block's output.
VIT_FEATURES = "vit_features"

# SAM's released ViT sizes (SAM-HQ was trained on top of them); the decoder's `vit_dim`
# follows the ViT width (see `sam_hq_config`).
VARIANTS = SAM_VARIANTS
# hf_sam's tiny SAM (one ViT block, which is global: its output is the early feature).
TINY_SAM_HQ = TINY_HF_SAM


class SamHQWarning(ForeignWeightsWarning):
    """A released LISA checkpoint's SAM weights were not loaded into SAM-HQ."""


def sam_hq_config(config: dict):
    """A ``SamHQConfig`` from a plain dict: ``hf_sam``'s defaults, and the mask decoder's
    ``vit_dim`` (the width of the early ViT features it fuses) set to the ViT's
    ``hidden_size`` where left out (they must be equal)."""
    from transformers import SamHQConfig

    cfg = deep_merge({}, config)
    width = cfg.get("vision_config", {}).get("hidden_size", SamHQConfig().vision_config.hidden_size)
    cfg.setdefault("mask_decoder_config", {}).setdefault("vit_dim", width)
    return sam_config(cfg, SamHQConfig, COMPONENT)


class SamHQMaskDecoder(HFSamMaskDecoder):
    """``model``: a transformers ``SamHQModel``; ``hq_token_only``: the HQ token's mask alone
    instead of SAM's plus HQ's."""

    component = COMPONENT

    def __init__(self, model, hq_token_only: bool = False, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__(model, mean=mean, std=std)
        self.hq_token_only = bool(hq_token_only)

    def encode_image(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(I, 3, S, S)`` -> the image embedding ``(I, P, S/16, S/16)`` and the first
        global-attention block's output ``(I, S/16, S/16, Dvit)`` (absent when the ViT has
        no global block: SAM-HQ's decoder then uses the embedding alone, as transformers')."""
        outs = self._encode_each(pixels)
        feats = {"image_embeddings": torch.cat([o.last_hidden_state for o in outs], 0)}
        if outs and outs[0].intermediate_embeddings:
            feats[VIT_FEATURES] = torch.cat([o.intermediate_embeddings[0] for o in outs], 0)
        return feats

    def _decoder_extras(self, features: dict[str, torch.Tensor]) -> dict:
        early = features.get(VIT_FEATURES)
        return {"hq_token_only": self.hq_token_only,
                "intermediate_embeddings": None if early is None else [early.to(self.decoder_dtype())]}

    def normalize_keys(self, state: dict) -> dict | None:
        """Bare ``SamHQModel`` keys get the ``model.`` prefix; SAM weights in Meta's layout (a
        released LISA checkpoint) lack SAM-HQ's own parts: ``None`` (not loaded, warned)."""
        return sam_weights_or_none(state, self.component, "SAM-HQ", SamHQWarning, is_meta_layout)

    def export_config(self) -> dict:
        return {**super().export_config(), "hq_token_only": self.hq_token_only}


def build_sam_hq(variant: Literal["vit_b", "vit_l", "vit_h"] | None = None, pretrained: str | None = None,
                 config: dict | None = None, hq_token_only: bool = False,
                 mean: list[float] | None = None, std: list[float] | None = None,
                 dtype: str | torch.dtype | None = None) -> SamHQMaskDecoder:
    """``pretrained``: a ``SamHQModel`` directory (as ``SamHQModel.save_pretrained`` writes
    it). Otherwise ``variant`` and/or ``config`` (a ``SamHQConfig`` dict over the variant's),
    random weights. ``mean``/``std`` default to the directory's ``preprocessor_config.json``,
    else ImageNet's. ``dtype``: as ``hf_sam``'s (``pretrained`` read by the component's rule;
    random weights stay fp32)."""
    from transformers import SamHQModel

    return build_decoder(SamHQMaskDecoder, SamHQModel, sam_hq_config, VARIANTS, variant, pretrained, config,
                         ("sam_hq",), dtype, mean, std, hq_token_only=hq_token_only)


def sizes_sam_hq(variant: str | None = None, pretrained: str | None = None, config: dict | None = None,
                 **_) -> dict:
    """``prompt_dim`` from the configs (no weights read, nothing built)."""
    return decoder_width(VARIANTS, variant, pretrained, config)
