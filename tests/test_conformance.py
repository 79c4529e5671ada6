"""Conformance tests generated from the registry: every registered component, tiny, on CPU.

For each ``ComponentSpec`` the tiny instance is built, run through its kind's contract
(shapes and dtypes of the interface), saved with safetensors and loaded back into a
second, differently initialised instance, which must then give identical outputs.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lisa_kit.builder import build_component
from lisa_kit.checkpoint.io import load_into, save_safetensors
from lisa_kit.registry import get_registry
from lisa_kit.testing import resolve_tiny, tiny_tokenizer_dir

SPECS = sorted(get_registry().specs(), key=lambda s: (s.kind, s.name))


def _build(spec, seed):
    torch.manual_seed(seed)
    return build_component(spec.kind, {"name": spec.name, **resolve_tiny(spec.tiny)}).eval()


def _image(h=37, w=53, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _run(kind, comp):
    """Run the kind's contract; returns the tensors the save/load check compares."""
    if kind == "vision_encoder":
        px = comp.preprocess(_image())
        assert px.dtype == torch.float32 and px.dim() == 3 and px.shape[0] == 3
        out = comp(torch.stack([px, comp.preprocess(_image(60, 40, 1))]))
        assert out.shape == (2, comp.num_tokens, comp.feature_dim) and out.dtype == torch.float32
        return [out]
    if kind == "projector":
        x = torch.randn(2, 5, comp.in_dim, generator=torch.Generator().manual_seed(0))
        out = comp(x)
        assert out.shape == (2, 5, comp.out_dim)
        return [out]
    if kind == "seg_head":
        out = comp(torch.randn(4, comp.in_dim, generator=torch.Generator().manual_seed(0)))
        assert out.shape == (4, comp.out_dim)
        return [out]
    if kind == "llm":
        tok = comp.tokenizer
        ids = torch.tensor([tok.encode_text("Can you segment the red circle in this image?")[:9]])
        emb = comp.embed(ids)
        assert emb.shape == (1, ids.shape[1], comp.hidden_size)
        am = torch.ones_like(ids)
        full = comp(emb, attention_mask=am)
        assert full.hidden.shape == emb.shape and full.logits.shape[:2] == ids.shape
        # The cached path must agree with the full pass (generation relies on it).
        pre = comp(emb[:, :-1], attention_mask=am[:, :-1], use_cache=True)
        step = comp(emb[:, -1:], attention_mask=am, position_ids=torch.tensor([[ids.shape[1] - 1]]),
                    cache=pre.cache, use_cache=True, logits="last")
        torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=1e-5, rtol=1e-5)
        return [full.logits]
    if kind == "mask_decoder":
        px, meta = comp.preprocess(_image())
        assert px.shape == (3, comp.image_size, comp.image_size) and meta.original_size == (37, 53)
        feats = comp.encode_image(px[None])
        assert all(v.shape[0] == 1 for v in feats.values())
        prompts = torch.randn(3, comp.prompt_dim, generator=torch.Generator().manual_seed(0))
        low, scores = comp.decode(feats, prompts)
        assert low.shape[:2] == (3, 1) and scores.shape == (3, 1)
        masks = comp.postprocess(low, meta)
        assert masks.shape == (3, 37, 53) and masks.dtype == torch.float32
        return [low, scores, masks]
    if kind == "fusion":
        from lisa_kit.tokenizer import SentencePieceTokenizer

        tok = SentencePieceTokenizer.from_dir(tiny_tokenizer_dir())
        tok.add_special_tokens(comp.image_tokens())
        wrap = comp.wrap_image(tok)
        assert wrap.count(comp.IMAGE_SLOT) == 1
        torch.manual_seed(0)  # the fusion has no weights: same inputs, same outputs
        embed = torch.nn.Embedding(len(tok), 8)
        n_feat = 5
        feats = torch.randn(3, n_feat, 8)
        rows = [[7, *wrap, 9, 10], [7, *wrap, 11, *wrap, 12]]
        outs = []
        for side in ("right", "left"):
            T = max(map(len, rows))
            ids = torch.full((2, T), tok.pad_id)
            am = torch.zeros(2, T, dtype=torch.bool)
            for b, r in enumerate(rows):
                sl = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
                ids[b, sl], am[b, sl] = torch.tensor(r), True
            fb = comp.fuse(ids, am, None, feats, [[0], [1, 2]], embed, padding_side=side)
            for b in range(2):
                for t in range(T):
                    p = int(fb.token_positions[b, t])
                    if p >= 0:  # every text token sits where the fusion says it does
                        torch.testing.assert_close(fb.inputs_embeds[b, p], embed(ids[b, t]))
            assert int(fb.attention_mask.sum()) == sum(len(r) - r.count(comp.IMAGE_SLOT) for r in rows) + 3 * n_feat
            outs.append(fb.inputs_embeds)
        return outs
    raise AssertionError(f"no conformance contract for kind {kind!r}")


@pytest.mark.parametrize("spec", SPECS, ids=[f"{s.kind}:{s.name}" for s in SPECS])
def test_component_conformance(spec, tmp_path):
    comp = _build(spec, seed=0)
    with torch.no_grad():
        before = _run(spec.kind, comp)
    assert all(p.dtype == torch.float32 for p in comp.parameters())
    assert hasattr(comp, "export_config"), "components must export a self-contained config"
    f = tmp_path / "c.safetensors"
    state = {k: v for k, v in comp.state_dict().items()}
    save_safetensors(state, f)
    other = _build(spec, seed=1)
    from safetensors.torch import load_file

    load_into(other, load_file(str(f)), spec.kind, strict=True)
    with torch.no_grad():
        after = _run(spec.kind, other)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_every_kind_has_a_component():
    from lisa_kit.interfaces import KINDS

    reg = get_registry()
    for kind in KINDS:
        assert reg.names(kind), kind
