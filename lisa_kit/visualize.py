"""Pictures to look at: masks blended over their image.

``overlay`` follows LISA's ``vis_output`` (image * 0.5 + colour * 0.5 on mask pixels)
with one colour per mask, and shows ignored pixels (value 255) in grey so a user sees
what training and evaluation leave out.
"""
from __future__ import annotations

import numpy as np

PALETTE = np.array([(255, 0, 0), (0, 200, 0), (0, 90, 255), (255, 200, 0), (200, 0, 255), (0, 220, 220),
                    (255, 120, 0), (120, 60, 0)], dtype=np.float32)
IGNORE_GREY = np.array((128, 128, 128), dtype=np.float32)


def overlay(image: np.ndarray, masks, alpha: float = 0.5) -> np.ndarray:
    """``image`` RGB ``uint8 (H, W, 3)``, ``masks`` ``(M, H, W)`` (bool, 0/1 or 0/1/255) ->
    RGB ``uint8 (H, W, 3)``. Later masks are drawn over earlier ones."""
    out = image.astype(np.float32).copy()
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    for k, m in enumerate(masks):
        if m.shape != image.shape[:2]:
            raise ValueError(f"mask {k} has shape {m.shape}, image {image.shape[:2]}")
        ignore = m == 255
        fg = (m > 0) & ~ignore
        out[ignore] = out[ignore] * (1 - alpha) + IGNORE_GREY * alpha
        out[fg] = out[fg] * (1 - alpha) + PALETTE[k % len(PALETTE)] * alpha
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
