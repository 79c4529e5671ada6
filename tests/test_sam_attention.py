"""SAM's image-encoder attention through scaled_dot_product_attention equals Meta's
forward (fp32, 1e-5): single blocks at real ViT-B/H widths and a whole tiny encoder."""
from __future__ import annotations

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention

from lisa_kit.components import _sam_attention as sa
from lisa_kit.components.sam import TINY_SAM, build_sam

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _randomised(m: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Unit-normal relative-position tables (Meta initialises them to zero, which would
    hide a wrong bias); the other weights keep their default (seeded) initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.rsplit(".", 1)[-1] in ("rel_pos_h", "rel_pos_w"):
                p.copy_(torch.randn(p.shape, generator=g))
    return m


def _both(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Meta's forward, the SDPA forward) of the same module on ``x``."""
    with torch.no_grad():
        sa.use_sdpa_attention(attn, "eager")
        ref = attn(x)
        sa.use_sdpa_attention(attn, "sdpa")
        new = attn(x)
    return ref, new


@pytest.mark.parametrize("dim, heads", [(768, 12), (1280, 16)], ids=["vit_b", "vit_h"])
def test_global_block_at_real_width_matches(dim, heads):
    """A global-attention block at 1024 px: 64 x 64 tokens, ViT-B/H widths and heads,
    several query blocks (so the row blocking is exercised at the real size)."""
    torch.manual_seed(0)
    attn = _randomised(Attention(dim, heads, use_rel_pos=True, input_size=(64, 64)), 0)
    assert sa.block_rows(heads, (64, 64), 4) < 64
    x = torch.randn(1, 64, 64, dim, generator=torch.Generator().manual_seed(1))
    ref, new = _both(attn, x)
    torch.testing.assert_close(new, ref, **TOL)


@pytest.mark.parametrize("rows", [1, 2, 5])
def test_block_boundaries_and_windows(rows):
    """Windowed blocks (batch of windows, 14 x 14, odd rows per block) and no-rel-pos."""
    torch.manual_seed(2)
    attn = _randomised(Attention(64, 4, use_rel_pos=True, input_size=(14, 14)), 2)
    x = torch.randn(3, 14, 14, 64, generator=torch.Generator().manual_seed(3))
    q, k, v = attn.qkv(x).reshape(3, 196, 3, 4, 16).permute(2, 0, 3, 1, 4).unbind(0)
    budget = rows * 3 * 4 * 14 * 196 * 4  # exactly `rows` grid rows per kernel call
    assert sa.block_rows(12, (14, 14), 4, budget) == rows
    with torch.no_grad():
        sa.use_sdpa_attention(attn, "eager")
        ref = attn(x)
        out = sa.sdpa_rel_pos(q, k, v, attn.rel_pos_h, attn.rel_pos_w, (14, 14), attn.scale, budget)
        new = attn.proj(out.permute(0, 2, 1, 3).reshape(3, 14, 14, -1))
    torch.testing.assert_close(new, ref, **TOL)
    with torch.no_grad():  # the bias is far above the tolerance: a wrong bias cannot pass
        without = sa.sdpa_rel_pos(q, k, v, None, None, (14, 14), attn.scale)
    assert (attn.proj(without.permute(0, 2, 1, 3).reshape(3, 14, 14, -1)) - ref).abs().max() > 0.1
    plain = Attention(64, 4, use_rel_pos=False)
    torch.testing.assert_close(*reversed(_both(plain, x)), **TOL)


def test_built_sam_uses_sdpa_and_whole_encoder_matches():
    cfg = dict(TINY_SAM, image_size=128, encoder_depth=2, encoder_global_attn_indexes=[1], encoder_window_size=3)
    torch.manual_seed(4)
    sam = build_sam("custom", config=cfg).eval()
    _randomised(sam.image_encoder, 5)
    attns = [m for m in sam.image_encoder.modules() if isinstance(m, Attention)]
    assert len(attns) == 2 and all(type(m) is sa.SdpaRelPosAttention for m in attns)
    keys = set(sam.state_dict())
    px = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        new = sam.encode_image(px)["image_embeddings"]
        sam.set_attention("eager")
        assert all(type(m) is Attention for m in attns) and set(sam.state_dict()) == keys
        ref = sam.encode_image(px)["image_embeddings"]
    torch.testing.assert_close(new, ref, **TOL)
    with pytest.raises(ValueError, match="unknown SAM attention 'flash'"):
        sam.set_attention("flash")


def test_gradients_match_meta_attention():
    """With autograd (``train_image_encoder``) the blocked path gives Meta's gradients."""
    torch.manual_seed(7)
    attn = _randomised(Attention(32, 2, use_rel_pos=True, input_size=(6, 6)), 7)
    x = torch.randn(2, 6, 6, 32, generator=torch.Generator().manual_seed(8))
    grads = []
    for impl, budget in (("eager", None), ("sdpa", 2 * 2 * 6 * 36 * 4)):  # two grid rows per block
        attn.zero_grad()
        sa.use_sdpa_attention(attn, impl)
        if budget:
            q, k, v = attn.qkv(x).reshape(2, 36, 3, 2, 16).permute(2, 0, 3, 1, 4).unbind(0)
            o = sa.sdpa_rel_pos(q, k, v, attn.rel_pos_h, attn.rel_pos_w, (6, 6), attn.scale, budget)
            y = attn.proj(o.permute(0, 2, 1, 3).reshape(2, 6, 6, -1))
        else:
            y = attn(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in attn.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], **TOL, msg=n)
