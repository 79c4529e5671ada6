"""SAM's image-encoder attention without materialising whole attention maps.

segment-anything's ``Attention.forward`` computes the full map ``(B*heads, N, N)`` with
``N = h*w`` tokens, adds the decomposed relative-position bias and softmaxes it: at
1024 px a global block of ViT-H holds 16 maps of 4096 x 4096 floats (1 GiB), and a copy
of them for each of those three steps. :class:`SdpaRelPosAttention` computes the same
function with :func:`torch.nn.functional.scaled_dot_product_attention` (a fused kernel
that never stores the map), passing the relative-position bias as ``attn_mask``.

The bias of query ``(y, x)`` and key ``(ky, kx)`` is ``rel_h[y, x, ky] + rel_w[y, x, kx]``
(``rel_h = q . Rh``, ``rel_w = q . Rw``, see ``add_decomposed_rel_pos``). The kernel needs
it as one additive ``(q_len, k_len)`` mask, and no broadcastable factored form of it
exists, so the full bias would again be ``N x N`` per head. Instead the queries are taken
a block of grid rows at a time: only ``(B*heads, rows*w, N)`` of bias exists at once,
bounded by :data:`BIAS_BLOCK_BYTES`. The query scaling is applied to ``q`` before the
kernel (``scale=1``) exactly as the original multiplies ``q * scale`` before ``q @ k^T``,
and the bias is computed from the unscaled ``q`` as there.

Also exact, and mask-free: append ``rel_h, rel_w`` to each query and one-hot key rows /
columns to each key (``q' . k' = q.k*scale + bias``). On CPU, torch's fused kernel needs
the value head size to equal the query's, else it falls back to the math path, which
materialises the maps again (measured: +1.7 GiB for 12 heads at 4096 tokens); padding the
values to match triples the ``attn @ v`` work. Blocked masks cost neither.

Shapes: ``x (B, h, w, C)`` -> ``(B, h, w, C)``; ``q, k, v (B, heads, N, C/heads)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos

#: Upper bound on the relative-position bias one kernel call receives (bytes): 3-5 grid
#: rows of queries at ViT-B/H widths, a whole 14 x 14 windowed block at once. Measured
#: (CPU time of one ViT-B/H global block at 1024 px, 2 threads): one row per call costs
#: about 1.5x as much, and blocks of 128 MiB and more cost more again.
BIAS_BLOCK_BYTES = 64 * 2**20


def rel_pos_bias_terms(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                       hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``q (B, heads, h*w, c)`` -> ``rel_h (B, heads, h, w, h)``, ``rel_w (B, heads, h, w, w)``:
    the two terms of the decomposed bias (keys of the same size as the queries)."""
    h, w = hw
    rh = get_rel_pos(h, h, rel_pos_h)  # (h, h, c): query row x key row
    rw = get_rel_pos(w, w, rel_pos_w)  # (w, w, c)
    r_q = q.reshape(*q.shape[:2], h, w, q.shape[-1])
    rel_h = torch.einsum("bnyxc,ykc->bnyxk", r_q, rh.to(q.dtype))
    rel_w = torch.einsum("bnyxc,xkc->bnyxk", r_q, rw.to(q.dtype))
    return rel_h, rel_w


def block_rows(batch_heads: int, hw: tuple[int, int], element_size: int, budget: int = BIAS_BLOCK_BYTES) -> int:
    """How many grid rows of queries one kernel call takes so that its bias
    ``(batch_heads, rows*w, h*w)`` stays within ``budget`` bytes (at least one row)."""
    h, w = hw
    per_row = batch_heads * w * h * w * element_size
    return max(1, min(h, budget // per_row))


def sdpa_rel_pos(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_pos_h: torch.Tensor | None,
                 rel_pos_w: torch.Tensor | None, hw: tuple[int, int], scale: float,
                 budget: int = BIAS_BLOCK_BYTES) -> torch.Tensor:
    """``softmax(q*scale @ k^T + bias) @ v`` for ``q, k, v (B, heads, h*w, c)`` -> same shape,
    with the decomposed relative-position bias when ``rel_pos_h``/``rel_pos_w`` are given."""
    qs = q * scale
    if rel_pos_h is None:
        return F.scaled_dot_product_attention(qs, k, v, scale=1.0)
    h, w = hw
    rel_h, rel_w = rel_pos_bias_terms(q, rel_pos_h, rel_pos_w, hw)
    rows = block_rows(q.shape[0] * q.shape[1], hw, q.element_size(), budget)
    # Without autograd one bias buffer serves every block: allocated (and page-faulted in)
    # once per call instead of once per block. With autograd each block is its own tensor.
    reuse = not (torch.is_grad_enabled() and rel_h.requires_grad)
    buf = rel_h.new_empty(q.shape[0] * q.shape[1] * rows * w * h * w) if reuse else None
    out = []
    for y0 in range(0, h, rows):
        y1 = min(h, y0 + rows)
        # (B, heads, rows, w, h, 1) + (B, heads, rows, w, 1, w) -> (B, heads, rows*w, h*w)
        a, b = rel_h[:, :, y0:y1, :, :, None], rel_w[:, :, y0:y1, :, None, :]
        if reuse:
            blk = buf[: q.shape[0] * q.shape[1] * (y1 - y0) * w * h * w].view(*q.shape[:2], y1 - y0, w, h, w)
            bias = torch.add(a, b, out=blk)
        else:
            bias = a + b
        bias = bias.reshape(*q.shape[:2], (y1 - y0) * w, h * w)  # a view of `blk`; `a + b` may come out permuted
        out.append(F.scaled_dot_product_attention(qs[:, :, y0 * w:y1 * w], k, v, attn_mask=bias, scale=1.0))
    return out[0] if len(out) == 1 else torch.cat(out, 2)


class SdpaRelPosAttention(Attention):
    """segment-anything's ``Attention`` (same parameters, same state-dict keys) whose
    forward never materialises the whole attention map; see the module docstring.

    Installed on a built encoder by re-classing its attention modules
    (:func:`use_sdpa_attention`); ``isinstance(m, Attention)`` still holds."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        # (B, H*W, 3, heads, c) -> 3 x (B, heads, H*W, c), contiguous once (as Meta's reshape
        # does): every block of queries reads all of k and v again.
        q, k, v = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).contiguous().unbind(0)
        rel = (self.rel_pos_h, self.rel_pos_w) if self.use_rel_pos else (None, None)
        x = sdpa_rel_pos(q, k, v, *rel, (H, W), self.scale)
        x = x.permute(0, 2, 1, 3).reshape(B, H, W, -1)  # heads next to channels, as the original
        return self.proj(x)


ATTENTION_CLASSES = {"sdpa": SdpaRelPosAttention, "eager": Attention}


def use_sdpa_attention(encoder: torch.nn.Module, impl: str = "sdpa") -> int:
    """Switch every segment-anything ``Attention`` inside ``encoder`` to ``impl``
    (``"sdpa"``: :class:`SdpaRelPosAttention`; ``"eager"``: Meta's own forward).
    Parameters and buffers are untouched. Returns the number of modules switched."""
    if impl not in ATTENTION_CLASSES:
        raise ValueError(f"unknown SAM attention {impl!r}; available: {', '.join(ATTENTION_CLASSES)}")
    n = 0
    for m in encoder.modules():
        if isinstance(m, Attention):
            m.__class__ = ATTENTION_CLASSES[impl]
            n += 1
    return n
