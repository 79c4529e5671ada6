"""LLaVA-style fusion: each image slot in the token ids is replaced by the image's
projected features, optionally between ``<im_start>`` and ``<im_end>`` tokens.

``fuse`` returns, for every text token, the index it landed on in the fused
sequence, so nothing downstream assumes a number of visual tokens (LISA hard-codes
255 = 256 CLIP patches - 1), a number of images per row, or a padding side.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

import lisa_kit
from lisa_kit.conversation import IGNORE
from lisa_kit.interfaces import ComponentSpec, FusedBatch, FusionStrategy

IM_START, IM_END = "<im_start>", "<im_end>"


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
             image_features: torch.Tensor, row_images: list[list[int]], embed: Callable[[torch.Tensor], torch.Tensor],
             padding_side: str = "right") -> FusedBatch:
        """``input_ids``/``attention_mask``/``labels``: ``(B, T)``; ``image_features``:
        ``(I, N, D)``; ``row_images[b]``: the image index of each slot of row ``b``, in order.
        Returns a :class:`FusedBatch` of length ``L = max_b (T_b + slots_b * (N - 1))``."""
        B, T = input_ids.shape
        n_feat = image_features.shape[1]
        attention_mask = attention_mask.bool()
        slot = (input_ids == self.IMAGE_SLOT) & attention_mask
        counts = slot.sum(1).tolist()
        for b in range(B):
            if counts[b] != len(row_images[b]):
                raise ValueError(f"row {b} has {counts[b]} image slots but {len(row_images[b])} images were given")
        width = torch.where(slot, n_feat, 1)
        start = torch.cumsum(width, 1) - width  # fused index of each token (before left-shift)
        lengths = width.sum(1)
        L = int(lengths.max())
        shift = (L - lengths) if padding_side == "left" else torch.zeros_like(lengths)
        start = start + shift[:, None]

        text_embeds = embed(input_ids.masked_fill(input_ids < 0, 0))  # (B, T, D); slot rows are dropped below
        D = text_embeds.shape[-1]
        fused = text_embeds.new_zeros(B, L, D)
        fused_mask = torch.zeros(B, L, dtype=torch.bool, device=input_ids.device)
        fused_labels = torch.full((B, L), IGNORE, dtype=torch.long, device=input_ids.device)

        keep = ~(input_ids == self.IMAGE_SLOT)
        b_idx, t_idx = keep.nonzero(as_tuple=True)
        pos = start[b_idx, t_idx]
        fused[b_idx, pos] = text_embeds[b_idx, t_idx]
        fused_mask[b_idx, pos] = attention_mask[b_idx, t_idx]
        if labels is not None:
            fused_labels[b_idx, pos] = labels[b_idx, t_idx]
        token_positions = torch.where(keep & attention_mask, start, torch.full_like(start, -1))

        feats = image_features.to(fused.dtype)
        for b in range(B):
            for k, t in enumerate(slot[b].nonzero(as_tuple=True)[0].tolist()):
                s = int(start[b, t])
                fused[b, s:s + n_feat] = feats[row_images[b][k]]
                fused_mask[b, s:s + n_feat] = True

        position_ids = (fused_mask.long().cumsum(1) - 1).clamp(min=0)
        return FusedBatch(inputs_embeds=fused, attention_mask=fused_mask,
                          labels=fused_labels if labels is not None else None, position_ids=position_ids,
                          token_positions=token_positions)

    def export_config(self) -> dict:
        return {"use_im_start_end": self.use_im_start_end}


def build_llava_splice(use_im_start_end: bool = True) -> LlavaSplice:
    return LlavaSplice(use_im_start_end)


@lisa_kit.hookimpl
def lisa_kit_components():
    return [ComponentSpec("fusion", "llava_splice", build_llava_splice, tiny={"use_im_start_end": True},
                          description="replace each image slot by its features (LLaVA/LISA), optional <im_start>/<im_end>")]
