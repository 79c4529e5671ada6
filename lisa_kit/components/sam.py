"""SAM (segment-anything) as the mask decoder, prompted by the seg head's output.

Submodules are named ``image_encoder``, ``prompt_encoder``, ``mask_decoder`` so the
state dict is Meta's key layout and ``sam_vit_*.pth`` files load as they are.

Shapes: ``preprocess(uint8 (H, W, 3)) -> (3, S, S)`` with ``S = image_size`` (1024);
``encode_image((I, 3, S, S)) -> {"image_embeddings": (I, P, S/16, S/16)}``;
``decode(features, prompts (M, P)) -> low_res (M, 1, S/4, S/4), scores (M, 1)``;
``decode_geometry(features, boxes (M, 4), points (M, K, 2), point_labels (M, K))`` -> the same,
from box/point prompts through SAM's own prompt encoder (input-frame pixels);
image embeddings of any dtype are decoded in the decoder's (fp32: see ``fp32_prefixes``);
``postprocess(low_res, meta) -> (M, H, W)`` logits at the original size.
"""
from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import lisa_kit
from lisa_kit.interfaces import ComponentSpec, ImageMeta, MaskDecoder

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

# Meta's three released sizes (segment_anything/build_sam.py).
VARIANTS = {
    "vit_h": {"encoder_embed_dim": 1280, "encoder_depth": 32, "encoder_num_heads": 16,
              "encoder_global_attn_indexes": [7, 15, 23, 31]},
    "vit_l": {"encoder_embed_dim": 1024, "encoder_depth": 24, "encoder_num_heads": 16,
              "encoder_global_attn_indexes": [5, 11, 17, 23]},
    "vit_b": {"encoder_embed_dim": 768, "encoder_depth": 12, "encoder_num_heads": 12,
              "encoder_global_attn_indexes": [2, 5, 8, 11]},
}
DEFAULTS = {
    "image_size": 1024, "vit_patch_size": 16, "encoder_mlp_ratio": 4.0, "encoder_window_size": 14,
    "encoder_use_rel_pos": True, "encoder_qkv_bias": True, "encoder_layernorm_eps": 1e-6,
    "prompt_embed_dim": 256, "mask_in_chans": 16, "num_multimask_outputs": 3, "transformer_depth": 2,
    "transformer_mlp_dim": 2048, "transformer_num_heads": 8, "transformer_attention_downsample_rate": 2,
    "iou_head_depth": 3, "iou_head_hidden_dim": 256,
    "pixel_mean": list(SAM_PIXEL_MEAN), "pixel_std": list(SAM_PIXEL_STD),
}


def resize_longest_side(h: int, w: int, long_side: int) -> tuple[int, int]:
    """segment-anything's ``ResizeLongestSide.get_preprocess_shape`` (rounds half up)."""
    scale = long_side * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


class SamMaskDecoder(MaskDecoder):
    # At bf16/fp16 the image encoder (ViT-H: 632M of SAM's 641M parameters) is stored and run
    # in that precision, as LISA's `model.bfloat16()`; the prompt encoder stays fp32 because
    # segment-anything builds its positional encoding grid in fp32 (a matmul against bf16
    # weights fails), and the mask decoder (4M) with it, so mask logits are computed in fp32.
    fp32_prefixes = ("prompt_encoder.", "mask_decoder.")
    accepts_geometry = True

    def __init__(self, cfg: dict):
        super().__init__()
        from segment_anything.modeling import ImageEncoderViT, MaskDecoder as MetaMaskDecoder, PromptEncoder
        from segment_anything.modeling import TwoWayTransformer

        self.cfg = dict(cfg)
        c = self.cfg
        self.image_size = int(c["image_size"])
        self.prompt_dim = int(c["prompt_embed_dim"])
        emb = self.image_size // c["vit_patch_size"]
        self.image_encoder = ImageEncoderViT(
            depth=c["encoder_depth"], embed_dim=c["encoder_embed_dim"], img_size=self.image_size,
            mlp_ratio=c["encoder_mlp_ratio"], norm_layer=partial(nn.LayerNorm, eps=c["encoder_layernorm_eps"]),
            num_heads=c["encoder_num_heads"], patch_size=c["vit_patch_size"], qkv_bias=c["encoder_qkv_bias"],
            use_rel_pos=c["encoder_use_rel_pos"], global_attn_indexes=tuple(c["encoder_global_attn_indexes"]),
            window_size=c["encoder_window_size"], out_chans=self.prompt_dim)
        self.prompt_encoder = PromptEncoder(
            embed_dim=self.prompt_dim, image_embedding_size=(emb, emb),
            input_image_size=(self.image_size, self.image_size), mask_in_chans=c["mask_in_chans"])
        self.mask_decoder = MetaMaskDecoder(
            num_multimask_outputs=c["num_multimask_outputs"],
            transformer=TwoWayTransformer(depth=c["transformer_depth"], embedding_dim=self.prompt_dim,
                                          mlp_dim=c["transformer_mlp_dim"], num_heads=c["transformer_num_heads"],
                                          attention_downsample_rate=c["transformer_attention_downsample_rate"]),
            transformer_dim=self.prompt_dim, iou_head_depth=c["iou_head_depth"],
            iou_head_hidden_dim=c["iou_head_hidden_dim"])
        self.set_attention("sdpa")
        # Not in the state dict (Meta keeps them non-persistent too).
        self.register_buffer("pixel_mean", torch.tensor(c["pixel_mean"], dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(c["pixel_std"], dtype=torch.float32).view(-1, 1, 1), False)

    # -- preprocessing ------------------------------------------------------------
    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, ImageMeta]:
        """Longest side to ``image_size`` (PIL bilinear, as ``ResizeLongestSide``),
        normalise, zero-pad bottom/right to a square."""
        h, w = image.shape[:2]
        nh, nw = resize_longest_side(h, w, self.image_size)
        x = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
        t = torch.from_numpy(np.array(x, copy=True)).permute(2, 0, 1).contiguous()
        t = (t - self.pixel_mean.cpu()) / self.pixel_std.cpu()
        t = F.pad(t, (0, self.image_size - nw, 0, self.image_size - nh))
        return t, ImageMeta(original_size=(h, w), input_size=(nh, nw))

    # -- model --------------------------------------------------------------------
    def set_attention(self, impl: str = "sdpa") -> None:
        """The image encoder's attention forward: ``"sdpa"`` (default; fused
        ``scaled_dot_product_attention``, the relative-position bias passed a block of
        query rows at a time, so no ``(heads, N, N)`` map is ever stored; see
        :mod:`lisa_kit.components._sam_attention`) or ``"eager"`` (Meta's forward, which
        materialises the maps). Same parameters and state-dict keys either way; outputs
        agree to float rounding (``tests/test_sam_attention.py``)."""
        from lisa_kit.components._sam_attention import use_sdpa_attention

        use_sdpa_attention(self.image_encoder, impl)

    def encode_image(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        # One image at a time: SAM's encoder activations dominate memory at 1024 px.
        dtype = self.image_encoder.patch_embed.proj.weight.dtype
        embs = [self.image_encoder(pixels[i:i + 1].to(dtype)) for i in range(pixels.shape[0])]
        return {"image_embeddings": torch.cat(embs, 0)}

    def decode(self, features: dict[str, torch.Tensor], prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``features`` of one image, ``prompts (M, P)`` -> ``(M, 1, S/4, S/4)`` logits and
        ``(M, 1)`` predicted IoU; every prompt is decoded independently of the others.

        Meta's ``predict_masks`` gives each prompt its own copy of the image embedding
        (``repeat_interleave``, ``M x (P, S/16, S/16)``). That copy is needed, not waste: each
        two-way transformer layer adds prompt-dependent attention output to the image
        tokens (``keys = keys + attn(image -> prompt tokens)``), so after the first layer
        every prompt has different image tokens anyway. At 1024 px it is 4 MiB per prompt
        (fp32), small next to the image encoder, so the call stays Meta's own code."""
        # Embeddings of any dtype (a bf16 image encoder) are decoded in the decoder's own (fp32).
        emb = features["image_embeddings"].to(self.mask_decoder.iou_token.weight.dtype)
        m = prompts.shape[0]
        sparse = prompts.unsqueeze(1).to(emb.dtype)  # (M, 1, P): the text prompt is the only sparse token
        h, w = emb.shape[-2:]
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(m, -1, h, w).to(emb.dtype)
        low_res, scores = self.mask_decoder(image_embeddings=emb, image_pe=self.prompt_encoder.get_dense_pe(),
                                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                            multimask_output=False)
        return low_res, scores

    def decode_geometry(self, features: dict[str, torch.Tensor], boxes: torch.Tensor | None,
                        points: torch.Tensor | None, point_labels: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Box/point prompts of one image -> ``(M, 1, S/4, S/4)`` logits, ``(M, 1)`` IoU.

        ``boxes (M, 4)`` xyxy and ``points (M, K, 2)`` xy in input-frame pixels (the
        ``S x S`` square after :meth:`preprocess`), ``point_labels (M, K)`` (1 fg, 0 bg,
        -1 padding). Meta's prompt encoder embeds them (sparse tokens: the box corners and
        the points; a pad point when no box is given, as ``SamPredictor`` does) and its
        ``no_mask`` dense embedding is used; one mask per prompt (``multimask_output``
        off, as LISA decodes)."""
        if boxes is None and points is None:
            raise ValueError("decode_geometry needs boxes, points or both")
        emb = features["image_embeddings"].to(self.mask_decoder.iou_token.weight.dtype)
        pe_dtype = self.prompt_encoder.point_embeddings[0].weight.dtype
        pts = None
        if points is not None:
            if point_labels is None:
                point_labels = torch.ones(points.shape[:2], dtype=torch.long, device=points.device)
            pts = (points.to(pe_dtype), point_labels.to(points.device, torch.long))
        box = boxes.to(pe_dtype) if boxes is not None else None
        sparse, dense = self.prompt_encoder(points=pts, boxes=box, masks=None)
        low_res, scores = self.mask_decoder(image_embeddings=emb, image_pe=self.prompt_encoder.get_dense_pe(),
                                            sparse_prompt_embeddings=sparse.to(emb.dtype),
                                            dense_prompt_embeddings=dense.to(emb.dtype), multimask_output=False)
        return low_res, scores

    def postprocess(self, low_res: torch.Tensor, meta: ImageMeta) -> torch.Tensor:
        """Upsample to the padded square, crop the resized image, resize to the original
        size (bilinear, fp32: mask logits stay fp32 in any precision)."""
        x = F.interpolate(low_res.float(), (self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = x[..., : meta.input_size[0], : meta.input_size[1]]
        x = F.interpolate(x, tuple(meta.original_size), mode="bilinear", align_corners=False)
        return x[:, 0]

    def export_config(self) -> dict:
        return {"variant": "custom", "config": self.cfg}


def sam_config(variant: str = "vit_h", config: dict | None = None) -> dict:
    """The full size config of a ``variant`` with ``config`` entries over it (see :func:`build_sam`)."""
    if variant not in VARIANTS and variant != "custom":
        raise ValueError(f"unknown SAM variant {variant!r}; available: {', '.join([*VARIANTS, 'custom'])}")
    cfg = dict(DEFAULTS)
    cfg.update(VARIANTS.get(variant, {}))
    if config:
        unknown = set(config) - set(DEFAULTS) - set(VARIANTS["vit_b"]) - {"image_embedding_size"}
        if unknown:
            raise ValueError(f"unknown SAM config keys: {sorted(unknown)}")
        cfg.update({k: v for k, v in config.items() if k != "image_embedding_size"})
    missing = [k for k in VARIANTS["vit_b"] if k not in cfg]
    if missing:
        raise ValueError(f"SAM variant 'custom' needs config keys {missing}")
    return cfg


def build_sam(variant: str = "vit_h", checkpoint: str | None = None, config: dict | None = None,
              dtype: str | torch.dtype | None = None) -> SamMaskDecoder:
    """``variant``: ``vit_h``/``vit_l``/``vit_b`` (Meta's sizes) or ``custom`` (all sizes from
    ``config``, keys as in ``DEFAULTS``); ``config`` entries override the variant's.
    ``checkpoint``: a Meta ``sam_vit_*.pth`` (or safetensors) to load, its tensors read
    straight into ``dtype`` (``bf16``/``fp16``; default fp32) but for what
    :attr:`SamMaskDecoder.fp32_prefixes` keeps fp32."""
    from lisa_kit.components._util import resolve_dtype

    from contextlib import nullcontext

    from lisa_kit.checkpoint.io import empty_weights, load_file_into

    dtype = resolve_dtype(dtype)
    # Weights named: built without memory (buffers stay real), never initialised only to be overwritten.
    with empty_weights() if checkpoint is not None else nullcontext():
        model = SamMaskDecoder(sam_config(variant, config))
    if checkpoint is not None:
        # streamed, tensor by tensor, each cast once by the module's precision rule
        load_file_into(model, checkpoint, component="mask_decoder", strict=True, dtype=dtype)
    return model


def sizes_sam(variant: str = "vit_h", config: dict | None = None, **_) -> dict:
    """``prompt_dim`` (``prompt_embed_dim``) of the variant and config, without building."""
    return {"prompt_dim": int(sam_config(variant, config)["prompt_embed_dim"])}


TINY_SAM = {"image_size": 64, "vit_patch_size": 16, "encoder_embed_dim": 32, "encoder_depth": 1,
            "encoder_num_heads": 2, "encoder_global_attn_indexes": [0], "encoder_window_size": 2,
            "prompt_embed_dim": 32, "transformer_mlp_dim": 64, "transformer_num_heads": 2,
            "iou_head_hidden_dim": 32}


@lisa_kit.hookimpl
def lisa_kit_components():
    return [ComponentSpec("mask_decoder", "sam", build_sam, tiny={"variant": "custom", "config": TINY_SAM},
                          description="segment-anything SAM ViT-B/L/H (Meta .pth layout)", sizes=sizes_sam,
                          component_class=SamMaskDecoder)]
