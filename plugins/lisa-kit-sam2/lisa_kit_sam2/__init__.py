"""lisa-kit-sam2: SAM2 and transformers-SAM mask decoders for lisa_kit.

Installed, it registers ``mask_decoder:sam2`` (:mod:`lisa_kit_sam2.sam2`),
``mask_decoder:hf_sam`` (:mod:`lisa_kit_sam2.hf_sam`), ``mask_decoder:sam_hq``
(:mod:`lisa_kit_sam2.sam_hq`), ``mask_decoder:edgetam`` (:mod:`lisa_kit_sam2.edgetam`) and
``mask_decoder:sam3`` (:mod:`lisa_kit_sam2.sam3`) through the ``lisa_kit`` entry-point group,
like any third-party plugin.
"""
__version__ = "0.1.0"
