"""Samples and batching.

A :class:`Sample` is one image with one or more conversations about it (LISA's
several questions per image) and, for training, one target mask per ``[SEG]``.
:func:`collate` turns samples into a :class:`~lisa_kit.model.Batch`: every conversation
is a row, ``row_images`` records which image each row's slot refers to (LISA's
``offset``), and each image is preprocessed by each component's own processor.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from lisa_kit.conversation import IGNORE, Conversation, encode
from lisa_kit.model import Batch


@dataclass
class Sample:
    """``image``: RGB ``uint8 (H, W, 3)``; ``conversations``: each with one image slot;
    ``masks``: ``(M, H, W)`` targets (0/1), one per ``[SEG]`` over the conversations in
    order (several ``[SEG]`` in one answer each have theirs; a reject token ``[REJ]`` has
    none), or ``None`` at inference."""

    image: np.ndarray
    conversations: list[Conversation]
    masks: np.ndarray | torch.Tensor | None = None


def encode_rows(samples: list[Sample], model) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """Token ids and labels of every conversation, and the image index of each row."""
    tok = model.tokenizer
    image_ids = model.fusion.wrap_image(tok)
    ids, labels, owner = [], [], []
    for i, s in enumerate(samples):
        for conv in s.conversations:
            x, y = encode(conv, tok, image_ids)
            ids.append(x)
            labels.append(y)
            owner.append(i)
    return ids, labels, owner


def truncate(ids: list[int], labels: list[int], max_len: int) -> tuple[list[int], list[int], bool]:
    """Keep the first ``max_len`` tokens (LISA's rule; the answer may lose its end)."""
    if len(ids) <= max_len:
        return ids, labels, False
    return ids[:max_len], labels[:max_len], True


def collate(samples: list[Sample], model, max_length: int | None = None, padding_side: str = "right") -> Batch:
    """Samples -> a padded :class:`Batch`.

    ``max_length`` caps the text tokens of each row (image slots count as one). Longer
    rows keep their first ``max_length`` tokens; a ``[SEG]`` cut off takes its target
    mask with it, so masks and ``[SEG]`` tokens stay paired; one warning counts the rows
    and masks affected.
    """
    tok = model.tokenizer
    seg_id = model.seg_token_id
    ids, labels, owner = encode_rows(samples, model)
    keep_masks: list[list[int]] = [[] for _ in samples]  # surviving [SEG] indices per sample
    seen = [0] * len(samples)
    cut = dropped = 0
    for k in range(len(ids)):
        n_before = ids[k].count(seg_id)
        if max_length is not None:
            ids[k], labels[k], was = truncate(ids[k], labels[k], max_length)
            cut += was
        n_after = ids[k].count(seg_id)
        s = owner[k]
        keep_masks[s].extend(range(seen[s], seen[s] + n_after))
        seen[s] += n_before
        dropped += n_before - n_after
    if cut:
        warnings.warn(f"{cut} of {len(ids)} conversations truncated to {max_length} tokens"
                      + (f"; {dropped} [SEG] target(s) cut off with them" if dropped else ""), stacklevel=2)
    T = max(len(x) for x in ids)
    B = len(ids)
    input_ids = torch.full((B, T), tok.pad_id, dtype=torch.long)
    lab = torch.full((B, T), IGNORE, dtype=torch.long)
    am = torch.zeros(B, T, dtype=torch.bool)
    for b, (x, y) in enumerate(zip(ids, labels)):
        sl = slice(0, len(x)) if padding_side == "right" else slice(T - len(x), T)
        input_ids[b, sl] = torch.tensor(x)
        lab[b, sl] = torch.tensor(y)
        am[b, sl] = True
    slot = model.fusion.IMAGE_SLOT
    row_images = [[owner[b]] * int((input_ids[b] == slot).sum()) for b in range(B)]
    vision = model.vision_encoder.collate([model.vision_encoder.preprocess(s.image) for s in samples])
    mask_in = [model.mask_decoder.preprocess(s.image) for s in samples]
    gt = None
    if all(s.masks is not None for s in samples):
        gt = []
        for s, n, keep in zip(samples, seen, keep_masks):
            m = torch.as_tensor(np.asarray(s.masks)).float()
            if m.shape[0] != n:
                raise ValueError(f"a sample has {m.shape[0]} masks for {n} [SEG] tokens in its conversations")
            gt.append(m[keep] if len(keep) != n else m)
    return Batch(input_ids=input_ids, attention_mask=am, row_images=row_images, vision_pixels=vision,
                 mask_pixels=torch.stack([m[0] for m in mask_in]), metas=[m[1] for m in mask_in], labels=lab,
                 gt_masks=gt, padding_side=padding_side)
