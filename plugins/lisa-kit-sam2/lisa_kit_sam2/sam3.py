"""SAM 3 (Carion et al., 2025) as lisa_kit's mask decoder, through transformers' ``Sam3Model``.

SAM 3 is a text-promptable segmenter: a phrase, encoded by its CLIP text encoder and
projected to the detector's width, conditions a DETR-style encoder/decoder whose ``Q``
object queries (200 at full size) each predict a mask, a box and a score, plus one
*presence* score per prompt ("is the phrase in the image at all"). LISA's ``[SEG]``
embedding, projected by the seg head to that width ``P``, stands in for the phrase: it
goes in as ``text_embeds`` (a one-token phrase), exactly where ``Sam3Model.forward`` puts
the text encoder's output, so the path from there on is transformers' own.

* ``preprocess``: ``Sam3ImageProcessor``'s: resize to the square ``S x S`` (1008) without
  keeping the aspect ratio (bilinear with antialiasing on the ``uint8`` image), rescale,
  normalise with mean = std = 0.5. No padding: ``ImageMeta.input_size = (S, S)``.
* ``encode_image``: the ViT backbone and its FPN neck, once per image: four levels at
  strides 14/4, 14/2, 14 and 28 (``fpn_0`` .. ``fpn_3``, batch dimension first). The sine
  position encodings depend on the shapes only and are recomputed in ``decode`` (they
  would double what is kept per image).
* ``decode``: ``Sam3Model.forward`` from precomputed vision embeddings, with the ``M``
  prompts as ``M`` one-token phrases (batch ``M``: the prompts never see each other), then
  one query per prompt is chosen (:data:`SELECT_RULES`):

  - ``select: best`` (default): the query with the highest presence-weighted score
    ``sigmoid(pred_logits) * sigmoid(presence_logits)`` (how ``Sam3ImageProcessor``
    scores instances); its mask logits and that score are returned.
  - ``select: threshold``: every query whose presence-weighted score is above
    ``threshold`` (0.3 by default, ``post_process_instance_segmentation``'s), merged into
    one mask per prompt as the element-wise maximum of their logits (the union of their
    masks at logit 0); the score is the best query's. When no query passes, the best query
    alone is used, so every prompt still gets a mask and its score says it is weak.

  Training supervises the chosen query (gradients reach the seg head through it).
* ``decode_geometry``: boxes through ``Sam3Model``'s geometry encoder with the phrase
  ``"visual"`` as text, what ``Sam3Processor`` does for a box without text. Its token ids
  come from the tokenizer in the ``pretrained`` directory (or ``tokenizer:``); SAM 3 takes
  no point prompts.
* ``postprocess``: bilinear to the original size (``post_process_masks``).

Shapes (``S`` = image size, ``P`` = prompt size = detector width, 256 at full size;
``g = S/14``): ``preprocess(uint8 (H, W, 3)) -> (3, S, S)``;
``encode_image((I, 3, S, S)) -> {"fpn_0": (I, P, 4g, 4g), "fpn_1": (I, P, 2g, 2g),
"fpn_2": (I, P, g, g), "fpn_3": (I, P, g/2, g/2)}``;
``decode(features (batch 1), prompts (M, P)) -> low_res (M, 1, 4g, 4g), scores (M, 1)``;
``postprocess(low_res, meta) -> (M, H, W)`` fp32 logits at the original size.

The transformers model is ``self.model`` (state-dict keys ``model.<Sam3Model key>``).
Parts by LISA's names: ``image_encoder`` is the vision backbone (frozen, as SAM's);
``prompt_encoder`` the text encoder, its projection and the geometry encoder (frozen: the
seg head replaces the text encoder); ``mask_decoder`` everything the prompt passes through
(DETR encoder and decoder, mask decoder, dot-product scoring), which LISA's rule trains.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lisa_kit.errors import CheckpointError, InputError
from lisa_kit.interfaces import ImageMeta, MaskDecoder
from lisa_kit_sam2._hf import (
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    deep_merge,
    load_pretrained,
    read_preprocessor,
    square_preprocess,
)

COMPONENT = "mask_decoder:sam3"
VIT_MODEL_TYPE = "sam3_vit_model"
SELECT_RULES = ("best", "threshold")
# Sam3ImageProcessor.post_process_instance_segmentation's default score threshold.
DEFAULT_THRESHOLD = 0.3
# What Sam3Processor._resolve_text_prompts sends as text with a box that has none.
GEOMETRY_TEXT = "visual"
# Files that mark a tokenizer saved in a directory (Sam3Processor/CLIPTokenizer.save_pretrained).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
DEFAULT_WIDTH = 256  # Sam3DETREncoderConfig.hidden_size: the width the text is projected to
# The modules every prompt passes through after the image encoder (trained by LISA's rule).
DECODER_PARTS = ("detr_encoder", "detr_decoder", "mask_decoder", "dot_product_scoring")
PROMPT_PARTS = ("text_encoder", "text_projection", "geometry_encoder")

# The smallest SAM 3 that keeps every structural feature: a two-layer ViT (one windowed,
# one global block) at 56 px (a 4 x 4 patch grid, so four FPN levels 16/8/4/2), a
# one-layer CLIP text encoder, one layer of geometry encoder, DETR encoder and decoder,
# 8 queries, everything 32 wide.
TINY_SAM3 = {
    "vision_config": {
        "backbone_config": {"model_type": VIT_MODEL_TYPE, "hidden_size": 32, "intermediate_size": 64,
                            "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 56, "patch_size": 14,
                            "window_size": 2, "global_attn_indexes": [1], "pretrain_image_size": 28},
        "fpn_hidden_size": 32, "backbone_feature_sizes": [[16, 16], [8, 8], [4, 4]]},
    "text_config": {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32,
                    "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 32,
                    "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
    "geometry_encoder_config": {"hidden_size": 32, "num_layers": 1, "num_attention_heads": 2,
                                "intermediate_size": 64, "roi_size": 2},
    "detr_encoder_config": {"hidden_size": 32, "num_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
    "detr_decoder_config": {"hidden_size": 32, "num_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                            "num_queries": 8},
    "mask_decoder_config": {"hidden_size": 32, "num_attention_heads": 2},
}


class Sam3Warning(UserWarning):
    """Weights a checkpoint holds for another decoder were left out."""


def sam3_config(config: dict):
    """A ``Sam3Config`` from a plain dict (the ``config:`` recipe value, or what
    :meth:`Sam3MaskDecoder.export_config` wrote); the ViT sub-config's ``model_type`` is
    filled in when left out (transformers needs it to pick the backbone class)."""
    from transformers import Sam3Config

    cfg = deep_merge({}, config)
    cfg.pop("model_type", None)
    backbone = cfg.setdefault("vision_config", {}).setdefault("backbone_config", {})
    if isinstance(backbone, dict):
        backbone.setdefault("model_type", VIT_MODEL_TYPE)
    try:
        return Sam3Config(**cfg)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"invalid Sam3Config for mask_decoder 'sam3': {type(e).__name__}: {e}") from e


def _detector_config(cfg: dict) -> dict:
    """The image detector's part of a ``config.json``: a ``sam3_video`` directory (the
    official ``facebook/sam3`` one) nests it under ``detector_config``."""
    return cfg.get("detector_config") or cfg


def sizes_sam3(pretrained: str | None = None, config: dict | None = None, **_) -> dict:
    """``{"prompt_dim": ...}``: the DETR encoder's width (what the text is projected to),
    read from ``config.json`` or ``config`` (no weights read, nothing built); ``{}`` when it
    cannot be told yet (the build reports why)."""
    if pretrained is not None:
        f = Path(pretrained).expanduser() / "config.json"
        if not f.is_file():
            return {}
        try:
            cfg = _detector_config(json.loads(f.read_text()))
        except ValueError:
            return {}
    elif config is not None:
        cfg = config
    else:
        return {}
    return {"prompt_dim": int((cfg.get("detr_encoder_config") or {}).get("hidden_size", DEFAULT_WIDTH))}


def geometry_tokens(tokenizer_dir: str | Path, text_length: int, text: str = GEOMETRY_TEXT) -> tuple[list, list]:
    """``(input_ids, attention_mask)`` of ``text`` as ``Sam3Processor`` makes them: the
    directory's tokenizer, padded to ``text_length`` (the text encoder's
    ``max_position_embeddings``; 32 at full size, the processor's ``max_length``)."""
    from transformers import AutoTokenizer

    from lisa_kit.checkpoint.safe import hf_load

    tok = hf_load(AutoTokenizer.from_pretrained, tokenizer_dir, component=COMPONENT, what="a tokenizer")
    enc = tok(text, padding="max_length", max_length=text_length)
    return list(enc["input_ids"]), list(enc["attention_mask"])


def _has_tokenizer(path: str | Path | None) -> bool:
    return path is not None and any((Path(path).expanduser() / f).is_file() for f in TOKENIZER_FILES)


class Sam3MaskDecoder(MaskDecoder):
    """``model``: a transformers ``Sam3Model``; ``select``/``threshold``: the query rule
    (module docstring); ``geometry_ids``/``geometry_mask``: the token ids and attention mask
    of the box-only phrase (``None``: :meth:`decode_geometry` is unavailable)."""

    accepts_geometry: ClassVar[bool] = True
    accepts_points: ClassVar[bool] = False  # SAM 3's geometry encoder embeds boxes only
    # The detector runs in fp32 in any precision (it is small; its box and score arithmetic
    # and the geometry encoder's roi_align want it); the ViT and the text encoder, most of
    # the weights, take the requested precision.
    fp32_prefixes: ClassVar[tuple[str, ...]] = tuple(f"model.{p}." for p in DECODER_PARTS + ("geometry_encoder",))

    def __init__(self, model, select: str = "best", threshold: float = DEFAULT_THRESHOLD,
                 mean=IMAGENET_STANDARD_MEAN, std=IMAGENET_STANDARD_STD,
                 geometry_ids: list[int] | None = None, geometry_mask: list[int] | None = None):
        super().__init__()
        if select not in SELECT_RULES:
            raise ValueError(f"sam3: select must be one of {', '.join(SELECT_RULES)}, got {select!r}")
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"sam3: threshold is a score in [0, 1], got {threshold}")
        self.model = model
        cfg = model.config
        widths = {"fpn": cfg.vision_config.fpn_hidden_size, "detr_encoder": cfg.detr_encoder_config.hidden_size,
                  "detr_decoder": cfg.detr_decoder_config.hidden_size,
                  "mask_decoder": cfg.mask_decoder_config.hidden_size,
                  "geometry_encoder": cfg.geometry_encoder_config.hidden_size}
        if len(set(widths.values())) != 1:
            raise ValueError(f"sam3: the hidden sizes must be equal, got {widths}")
        self.prompt_dim = int(cfg.detr_encoder_config.hidden_size)
        size = cfg.vision_config.backbone_config.image_size
        self.image_size = int(size[0] if isinstance(size, (list, tuple)) else size)
        self.select = select
        self.threshold = float(threshold)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        if (geometry_ids is None) != (geometry_mask is None) or (
                geometry_ids is not None and len(geometry_ids) != len(geometry_mask)):
            raise ValueError("sam3: geometry_ids and geometry_mask go together, of the same length")
        # Not weights: rebuilt from export_config, so not in the state dict.
        self.register_buffer("geometry_ids", None if geometry_ids is None else torch.tensor([geometry_ids]),
                             persistent=False)
        self.register_buffer("geometry_mask", None if geometry_mask is None else torch.tensor([geometry_mask]),
                             persistent=False)
        # Boxes go in with the tokenised phrase "visual": a decoder built without a tokenizer
        # (config: alone) cannot take them, and says so to callers and the conformance check.
        self.accepts_geometry = geometry_ids is not None

    # -- parts, by LISA's names ---------------------------------------------------------
    @property
    def image_encoder(self) -> nn.Module:
        return self.model.vision_encoder

    @property
    def prompt_encoder(self) -> nn.Module:
        return nn.ModuleList([getattr(self.model, p) for p in PROMPT_PARTS])

    @property
    def mask_decoder(self) -> nn.Module:
        return nn.ModuleList([getattr(self.model, p) for p in DECODER_PARTS])

    # -- preprocessing ------------------------------------------------------------------
    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, ImageMeta]:
        """``uint8 (H, W, 3) -> float32 (3, S, S)``: ``Sam3ImageProcessor``'s square resize
        (aspect ratio not kept) and normalisation."""
        return square_preprocess(image, self.image_size, self.mean, self.std)

    # -- model ----------------------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(I, 3, S, S)`` -> the four FPN levels ``fpn_0`` .. ``fpn_3``, ``(I, P, h_l, w_l)``."""
        dtype = next(self.model.vision_encoder.parameters()).dtype  # bf16 when cast (not under fp32_prefixes)
        out = self.model.vision_encoder(pixels.to(dtype), return_dict=True)
        return {f"fpn_{i}": x for i, x in enumerate(out.fpn_hidden_states)}

    def _vision_embeds(self, features: dict[str, torch.Tensor], m: int):
        """``features`` of one image as ``Sam3Model``'s ``vision_embeds`` for a batch of ``m``
        prompts, in the detector's precision, with the neck's position encodings."""
        from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

        dtype = next(self.model.detr_encoder.parameters()).dtype  # fp32 (fp32_prefixes) in any precision
        levels = [features[f"fpn_{i}"] for i in range(len(features))]
        if any(x.shape[0] != 1 for x in levels):
            raise InputError(f"sam3: decode takes the features of one image (batch 1), got "
                             f"{[tuple(x.shape) for x in levels]}")
        levels = [x.to(dtype).expand(m, -1, -1, -1) for x in levels]
        pos = self.model.vision_encoder.neck.position_encoding
        return Sam3VisionEncoderOutput(fpn_hidden_states=tuple(levels),
                                       fpn_position_encoding=tuple(pos(x.shape, x.device, x.dtype) for x in levels))

    def decode_all(self, features: dict[str, torch.Tensor], prompts: torch.Tensor):
        """Every query: ``Sam3Model.forward`` with the ``M`` prompts ``(M, P)`` as one-token
        phrases. Returns its output (``pred_masks (M, Q, h', w')``, ``pred_logits (M, Q)``,
        ``presence_logits (M, 1)``, ...)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if prompts.dim() != 2 or prompts.shape[1] != self.prompt_dim:
            raise InputError(f"sam3: prompts must be (M, {self.prompt_dim}), got {tuple(prompts.shape)}")
        m = prompts.shape[0]
        vision = self._vision_embeds(features, m)
        text = prompts.to(vision.fpn_hidden_states[0].dtype)[:, None, :]  # (M, 1, P): a one-token phrase
        mask = torch.ones(m, 1, dtype=torch.long, device=prompts.device)
        return self.model(vision_embeds=vision, text_embeds=BaseModelOutputWithPooling(pooler_output=text),
                          attention_mask=mask)

    def choose(self, out) -> tuple[torch.Tensor, torch.Tensor]:
        """The query rule (``select``) on a ``Sam3Model`` output of batch ``M``:
        ``(M, 1, h', w')`` mask logits and ``(M, 1)`` presence-weighted scores."""
        scores = out.pred_logits.sigmoid() * out.presence_logits.sigmoid()  # (M, Q)
        best, idx = scores.max(dim=1, keepdim=True)  # (M, 1)
        masks = out.pred_masks
        if self.select == "best":
            low = masks.gather(1, idx[:, :, None, None].expand(-1, -1, *masks.shape[-2:]))
        else:
            keep = scores > self.threshold
            keep = keep | (scores == best) & ~keep.any(dim=1, keepdim=True)  # none passes: the best alone
            low = masks.masked_fill(~keep[:, :, None, None], float("-inf")).amax(dim=1, keepdim=True)
        return low, best

    def decode(self, features: dict[str, torch.Tensor], prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``features`` of one image, ``prompts (M, P)`` (each a one-token phrase) ->
        ``(M, 1, h', w')`` logits of the chosen query and ``(M, 1)`` its presence-weighted score."""
        return self.choose(self.decode_all(features, prompts))

    def decode_geometry(self, features: dict[str, torch.Tensor], boxes: torch.Tensor | None,
                        points: torch.Tensor | None, point_labels: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """``boxes (M, 4)`` xyxy in input-frame pixels (``S x S``), one box per mask, with
        the phrase ``"visual"`` (``Sam3Processor``'s text for a box alone) -> ``(M, 1, h', w')``
        logits and ``(M, 1)`` scores, chosen like :meth:`decode`. SAM 3 takes no points."""
        return self.choose(self.decode_geometry_all(features, boxes, points, point_labels))

    def decode_geometry_all(self, features, boxes, points=None, point_labels=None):
        """Every query of :meth:`decode_geometry` (the ``Sam3Model`` output, batch ``M``)."""
        if points is not None or point_labels is not None:
            raise InputError("sam3 takes box prompts only (Sam3Model has no point encoder); give boxes")
        if boxes is None:
            raise InputError("sam3: decode_geometry needs boxes (M, 4)")
        if boxes.dim() != 2 or boxes.shape[1] != 4 or not torch.is_floating_point(boxes):
            raise InputError(f"sam3: boxes must be float (M, 4) xyxy, got {boxes.dtype} {tuple(boxes.shape)}")
        if self.geometry_ids is None:
            raise InputError("sam3: box prompts need the tokenizer of the SAM 3 checkpoint (for the phrase "
                             f"{GEOMETRY_TEXT!r}): give `tokenizer:` a directory with it, or a `pretrained` "
                             "directory that holds one")
        from transformers.models.sam3.processing_sam3 import box_xyxy_to_cxcywh

        m = boxes.shape[0]
        vision = self._vision_embeds(features, m)
        # Sam3Processor's conversion: xyxy pixels of the (S x S) input -> normalised cx, cy, w, h.
        norm = box_xyxy_to_cxcywh(boxes.to(vision.fpn_hidden_states[0].dtype) / self.image_size)[:, None, :]
        labels = torch.ones(m, 1, dtype=torch.long, device=boxes.device)  # positive boxes
        return self.model(vision_embeds=vision, input_ids=self.geometry_ids.expand(m, -1),
                          attention_mask=self.geometry_mask.expand(m, -1), input_boxes=norm,
                          input_boxes_labels=labels)

    def postprocess(self, low_res: torch.Tensor, meta: ImageMeta) -> torch.Tensor:
        """Bilinear to the original size (fp32: mask logits stay fp32 in any precision)."""
        x = F.interpolate(low_res.float(), tuple(meta.original_size), mode="bilinear", align_corners=False)
        return x[:, 0]

    def normalize_keys(self, state: dict) -> dict | None:
        """Checkpoint keys -> this component's. A released LISA checkpoint holds SAM (ViT)
        weights, which do not fit SAM 3: ``None`` leaves this decoder as built (weights from
        ``pretrained``); bare ``Sam3Model`` keys get the ``model.`` prefix."""
        if any(k.startswith(("image_encoder.", "prompt_encoder.pe_layer.")) for k in state):
            warnings.warn("sam3: the checkpoint's SAM (ViT) mask-decoder weights do not apply to SAM 3 and are not "
                          "loaded; SAM 3 keeps the weights of model.mask_decoder.pretrained, and the checkpoint's "
                          "seg head was trained for SAM, so train before use", Sam3Warning, stacklevel=2)
            return None
        return {k if k.startswith("model.") else f"model.{k}": v for k, v in state.items()}

    def export_config(self) -> dict:
        from lisa_kit.components._util import hf_config_dict

        out = {"config": hf_config_dict(self.model.config), "select": self.select, "threshold": self.threshold,
               "mean": list(self.mean), "std": list(self.std)}
        if self.geometry_ids is not None:
            out.update(geometry_ids=self.geometry_ids[0].tolist(), geometry_mask=self.geometry_mask[0].tolist())
        return out


def build_sam3(pretrained: str | None = None, config: dict | None = None,
               select: Literal["best", "threshold"] = "best", threshold: float = DEFAULT_THRESHOLD,
               tokenizer: str | None = None, mean: list[float] | None = None, std: list[float] | None = None,
               geometry_ids: list[int] | None = None, geometry_mask: list[int] | None = None,
               dtype: str | torch.dtype | None = None) -> Sam3MaskDecoder:
    """``pretrained``: a directory written by ``Sam3Model.save_pretrained`` (or the official
    ``facebook/sam3``: ``config.json`` + ``model.safetensors``; its tracker weights are
    skipped); every detector weight must be there. ``config``: a ``Sam3Config`` dict, random
    weights. ``select``/``threshold``: the query rule (module docstring). ``tokenizer``: a
    directory with SAM 3's CLIP tokenizer, for box prompts (default: ``pretrained``, when it
    holds one); ``geometry_ids``/``geometry_mask`` give the tokenised phrase directly (what
    :meth:`Sam3MaskDecoder.export_config` writes). ``mean``/``std`` default to the
    directory's ``preprocessor_config.json``, else 0.5. ``dtype``: the precision
    ``pretrained``'s weights are read into, each tensor once: the ViT and the text encoder
    in ``dtype``, the detector (``fp32_prefixes``) in fp32, never an fp32 copy of the ViT
    first (:func:`~lisa_kit_sam2._hf.load_pretrained`); random weights stay fp32 (the
    builder casts them)."""
    from transformers import Sam3Model

    from lisa_kit.components._util import resolve_dtype

    dtype = resolve_dtype(dtype)
    if pretrained is not None:
        if config is not None:
            raise ValueError("sam3: give either `pretrained` or `config`, not both")
        model = load_pretrained(Sam3Model, pretrained, COMPONENT, dtype=dtype, owner=Sam3MaskDecoder)
    elif config is not None:
        model = Sam3Model(sam3_config(config))
    else:
        raise ValueError("sam3 needs `pretrained` (a Sam3Model directory) or `config` (a Sam3Config dict)")
    source = tokenizer if tokenizer is not None else (pretrained if _has_tokenizer(pretrained) else None)
    if source is not None:
        if geometry_ids is not None:
            raise ValueError("sam3: give either `tokenizer` or `geometry_ids`, not both")
        if not _has_tokenizer(source):
            raise CheckpointError(f"no tokenizer in {source} (looked for {', '.join(TOKENIZER_FILES)})",
                                  component=COMPONENT, file=source)
        geometry_ids, geometry_mask = geometry_tokens(source, model.config.text_config.max_position_embeddings)
    pre = read_preprocessor(pretrained)
    return Sam3MaskDecoder(model, select=select, threshold=threshold,
                           mean=mean or pre.get("image_mean", IMAGENET_STANDARD_MEAN),
                           std=std or pre.get("image_std", IMAGENET_STANDARD_STD),
                           geometry_ids=geometry_ids, geometry_mask=geometry_mask)
