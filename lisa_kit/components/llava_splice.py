"""LLaVA-style fusion: each image slot in the token ids is replaced by the image's
projected features, optionally between ``<im_start>`` and ``<im_end>`` tokens.

``fuse`` returns, for every text token, the index it landed on in the fused
sequence, so nothing downstream assumes a number of visual tokens (LISA hard-codes
255 = 256 CLIP patches - 1), a number of images per row, or a padding side.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

import lisa_kit
from lisa_kit.conversation import IGNORE
from lisa_kit.interfaces import ComponentSpec, FusedBatch, FusionStrategy, VisionFeatures, per_image

IM_START, IM_END = "<im_start>", "<im_end>"


class Spliced(NamedTuple):
    """The spliced sequence before positions: ``inputs_embeds (B, L, D)``,
    ``attention_mask (B, L)`` bool, ``labels (B, L)`` or ``None``, ``token_positions
    (B, T)``, ``visual (B, L)`` bool (the columns that hold image features), ``images``:
    one ``(row, first fused column, image index)`` per spliced image, rows in order and
    each row's images left to right (the order Qwen's ``get_rope_index`` reads grids in),
    and ``input_ids (B, L)``: the text ids at their fused columns, ``IMAGE_SLOT`` on image
    columns, 0 on padding (for position schemes that read the fused token ids)."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    token_positions: torch.Tensor
    visual: torch.Tensor
    images: list[tuple[int, int, int]]
    input_ids: torch.Tensor


class LlavaSplice(FusionStrategy):
    def __init__(self, use_im_start_end: bool = True):
        super().__init__()
        self.use_im_start_end = use_im_start_end

    def image_tokens(self) -> list[str]:
        return [IM_START, IM_END] if self.use_im_start_end else []

    def wrap_image(self, tokenizer) -> list[int]:
        if self.use_im_start_end:
            return [tokenizer.token_id(IM_START), self.IMAGE_SLOT, tokenizer.token_id(IM_END)]
        return [self.IMAGE_SLOT]

    def fuse(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None,
             image_features: torch.Tensor | VisionFeatures, row_images: list[list[int]],
             embed: Callable[[torch.Tensor], torch.Tensor], padding_side: str = "right") -> FusedBatch:
        """``input_ids``/``attention_mask``/``labels``: ``(B, T)``; ``image_features``:
        ``(I, N, D)`` or :class:`VisionFeatures` (``N_i`` per image); ``row_images[b]``: the
        image index of each slot of row ``b``, in order. Returns a :class:`FusedBatch` of
        length ``L = max_b (T_b + sum over its slots of (N_i - 1))`` with 1-D positions
        ``(B, L)`` counting the row's real tokens."""
        sp = self.splice(input_ids, attention_mask, labels, image_features, row_images, embed, padding_side)
        position_ids = (sp.attention_mask.long().cumsum(1) - 1).clamp(min=0)
        return FusedBatch(inputs_embeds=sp.inputs_embeds, attention_mask=sp.attention_mask, labels=sp.labels,
                          position_ids=position_ids, token_positions=sp.token_positions)

    def splice(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None,
               image_features: torch.Tensor | VisionFeatures, row_images: list[list[int]],
               embed: Callable[[torch.Tensor], torch.Tensor], padding_side: str = "right") -> "Spliced":
        """The splice itself (shared by fusions with other position schemes): every image
        slot replaced by its image's ``N_i`` features. See :class:`Spliced`."""
        B, T = input_ids.shape
        feats = per_image(image_features)
        attention_mask = attention_mask.bool()
        slot = (input_ids == self.IMAGE_SLOT) & attention_mask
        counts = slot.sum(1).tolist()
        for b in range(B):
            if counts[b] != len(row_images[b]):
                raise ValueError(f"row {b} has {counts[b]} image slots but {len(row_images[b])} images were given")
            bad = [i for i in row_images[b] if not 0 <= i < len(feats)]
            if bad:
                raise ValueError(f"row {b} refers to image {bad[0]} but features of {len(feats)} images were given")
        # Width of every text column in the fused sequence: 1, or N_i for a slot of image i.
        width = torch.ones(B, T, dtype=torch.long, device=input_ids.device)
        for b in range(B):
            for k, t in enumerate(slot[b].nonzero(as_tuple=True)[0].tolist()):
                width[b, t] = feats[row_images[b][k]].shape[0]
        start = torch.cumsum(width, 1) - width  # fused index of each token (before left-shift)
        lengths = width.sum(1)
        L = int(lengths.max())
        shift = (L - lengths) if padding_side == "left" else torch.zeros_like(lengths)
        start = start + shift[:, None]

        text_embeds = embed(input_ids.masked_fill(input_ids < 0, 0))  # (B, T, D); slot rows are dropped below
        D = text_embeds.shape[-1]
        fused = text_embeds.new_zeros(B, L, D)
        fused_mask = torch.zeros(B, L, dtype=torch.bool, device=input_ids.device)
        visual = torch.zeros(B, L, dtype=torch.bool, device=input_ids.device)
        fused_labels = torch.full((B, L), IGNORE, dtype=torch.long, device=input_ids.device)
        fused_ids = torch.zeros(B, L, dtype=torch.long, device=input_ids.device)

        keep = ~(input_ids == self.IMAGE_SLOT)
        b_idx, t_idx = keep.nonzero(as_tuple=True)
        pos = start[b_idx, t_idx]
        fused[b_idx, pos] = text_embeds[b_idx, t_idx]
        fused_mask[b_idx, pos] = attention_mask[b_idx, t_idx]
        fused_ids[b_idx, pos] = torch.where(attention_mask[b_idx, t_idx], input_ids[b_idx, t_idx], 0)
        if labels is not None:
            fused_labels[b_idx, pos] = labels[b_idx, t_idx]
        token_positions = torch.where(keep & attention_mask, start, torch.full_like(start, -1))

        order: list[tuple[int, int, int]] = []
        for b in range(B):
            for k, t in enumerate(slot[b].nonzero(as_tuple=True)[0].tolist()):
                s, img = int(start[b, t]), row_images[b][k]
                n = feats[img].shape[0]
                fused[b, s:s + n] = feats[img].to(fused.dtype)
                fused_mask[b, s:s + n] = True
                visual[b, s:s + n] = True
                fused_ids[b, s:s + n] = self.IMAGE_SLOT
                order.append((b, s, img))
        return Spliced(fused, fused_mask, fused_labels if labels is not None else None, token_positions, visual,
                       order, fused_ids)

    def export_config(self) -> dict:
        return {"use_im_start_end": self.use_im_start_end}


def build_llava_splice(use_im_start_end: bool = True) -> LlavaSplice:
    return LlavaSplice(use_im_start_end)


@lisa_kit.hookimpl
def lisa_kit_components():
    return [ComponentSpec("fusion", "llava_splice", build_llava_splice, tiny={"use_im_start_end": True},
                          description="replace each image slot by its features (LLaVA/LISA), optional <im_start>/<im_end>")]
