"""The plugin module named in this distribution's ``lisa_kit`` entry point: it registers
``mask_decoder:sam2``, ``hf_sam``, ``sam_hq``, ``edgetam`` and ``sam3`` with their ``tiny``
configurations (the main suite's conformance tests build every registered component that way)."""
from __future__ import annotations

import lisa_kit
from lisa_kit.interfaces import ComponentSpec
from lisa_kit_sam2.edgetam import TINY_EDGETAM, build_edgetam, sizes_edgetam
from lisa_kit_sam2.hf_sam import TINY_HF_SAM, build_hf_sam, sizes_hf_sam
from lisa_kit_sam2.sam2 import TINY_SAM2, build_sam2, sizes_sam2
from lisa_kit_sam2.sam3 import TINY_SAM3, Sam3MaskDecoder, build_sam3, sizes_sam3
from lisa_kit_sam2.sam_hq import TINY_SAM_HQ, build_sam_hq, sizes_sam_hq


@lisa_kit.hookimpl
def lisa_kit_components():
    return [
        ComponentSpec("mask_decoder", "sam2", build_sam2, tiny={"config": TINY_SAM2},
                      description="SAM2 / SAM2.1 Hiera through transformers' Sam2Model (high-res features, "
                                  "text prompt as the sparse token)", sizes=sizes_sam2),
        ComponentSpec("mask_decoder", "hf_sam", build_hf_sam, tiny={"config": TINY_HF_SAM},
                      description="SAM ViT-B/L/H through transformers' SamModel (HF dirs or Meta .pth)",
                      sizes=sizes_hf_sam),
        ComponentSpec("mask_decoder", "sam3", build_sam3, tiny={"config": TINY_SAM3},
                      description="SAM 3 through transformers' Sam3Model ([SEG] as the text phrase; the query with "
                                  "the highest presence-weighted score, or all above a threshold)",
                      sizes=sizes_sam3, component_class=Sam3MaskDecoder),
        ComponentSpec("mask_decoder", "sam_hq", build_sam_hq, tiny={"config": TINY_SAM_HQ},
                      description="SAM-HQ (HQ output token, early+late ViT features) through transformers' "
                                  "SamHQModel", sizes=sizes_sam_hq),
        ComponentSpec("mask_decoder", "edgetam", build_edgetam, tiny={"config": TINY_EDGETAM},
                      description="EdgeTAM (SAM2 with a RepViT trunk from timm) through transformers' EdgeTamModel",
                      sizes=sizes_edgetam),
    ]
