"""LISA's training loss: token cross-entropy + per-mask BCE + Dice.

``total = ce_weight * CE + bce_weight * BCE + dice_weight * Dice`` with LISA's
normalisation: CE is the mean over supervised next-token positions; BCE is each mask's
pixel mean, Dice uses ``sigmoid(x)/1000`` and ``target/1000`` with ``eps = 1e-6``; both
are averaged over all masks of the batch. Defaults are LISA's (1.0, 2.0, 0.5).

Masks pair with ``[SEG]`` tokens by order: the model decodes image ``i``'s ``[SEG]``
tokens row by row, left to right (several in one answer included), and ``gt_masks[i]``
holds one target per ``[SEG]`` in that same order (:func:`lisa_kit.data.collate`). A
reject token (``[REJ]``) has no mask: it is a supervised label like any answer token, so
CE alone trains it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lisa_kit.conversation import IGNORE


@dataclass
class LossWeights:
    ce_weight: float = 1.0
    bce_weight: float = 2.0
    dice_weight: float = 0.5


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token CE, ``logits (B,L,V)`` and ``labels (B,L)`` aligned (label at p is the
    token at p): mean over positions whose next label is not ``IGNORE``."""
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, scale: float = 1000.0, eps: float = 1e-6) -> torch.Tensor:
    """Per-mask Dice loss, summed: ``logits``/``targets`` ``(M, H, W)``."""
    p = logits.sigmoid().flatten(1)
    t = targets.flatten(1)
    num = 2 * (p / scale * t).sum(-1)
    den = (p / scale).sum(-1) + (t / scale).sum(-1)
    return (1 - (num + eps) / (den + eps)).sum()


def bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-mask mean pixel BCE, summed over masks: ``(M, H, W)``."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(1).mean(1).sum()


def lisa_loss(logits: torch.Tensor, labels: torch.Tensor, pred_masks: list[torch.Tensor],
              gt_masks: list[torch.Tensor], weights: LossWeights = LossWeights()) -> dict[str, torch.Tensor]:
    """Returns ``loss``, ``ce_loss``, ``mask_bce_loss``, ``mask_dice_loss``, ``mask_loss``
    (weights applied, as LISA reports them). ``pred_masks[i]`` and ``gt_masks[i]`` are the
    ``(M_i, H_i, W_i)`` logits and targets of image ``i``."""
    if len(pred_masks) != len(gt_masks):
        raise ValueError(f"{len(pred_masks)} images of predictions but {len(gt_masks)} of targets")
    ce = token_ce(logits, labels) * weights.ce_weight
    bce = logits.new_zeros((), dtype=torch.float32)
    dice = logits.new_zeros((), dtype=torch.float32)
    n = 0
    for i, (p, g) in enumerate(zip(pred_masks, gt_masks)):
        if p.shape != g.shape:
            raise ValueError(f"image {i}: predicted masks {tuple(p.shape)} vs targets {tuple(g.shape)} "
                             "(one target per [SEG])")
        if p.shape[0] == 0:
            continue
        g = g.to(p.dtype)
        bce = bce + bce_loss(p, g)
        dice = dice + dice_loss(p, g)
        n += p.shape[0]
    bce = weights.bce_weight * bce / (n + 1e-8)
    dice = weights.dice_weight * dice / (n + 1e-8)
    mask = bce + dice
    return {"loss": ce + mask, "ce_loss": ce, "mask_bce_loss": bce, "mask_dice_loss": dice, "mask_loss": mask}
