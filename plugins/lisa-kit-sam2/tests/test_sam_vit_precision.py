"""transformers' SAM, SAM-HQ, SAM2 and EdgeTAM keep only the prompt side fp32: in bf16 the
image encoder (nearly all the weights) is stored and run in bf16, as the built-in ``sam``
and the original LISA do, and its embeddings are decoded in fp32."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lisa_kit.checkpoint.io import cast_component, param_dtype
from lisa_kit.registry import get_registry


@pytest.mark.parametrize("name", ["hf_sam", "sam_hq", "sam2", "edgetam"])
def test_bf16_vit_fp32_decoder_and_masks_close_to_fp32(name):
    torch.manual_seed(0)
    spec = get_registry().get("mask_decoder", name)
    full = spec.build(**spec.tiny).eval()
    half = copy.deepcopy(full)
    cast_component(half, torch.bfloat16)
    vit = [p.dtype for k, p in half.named_parameters() if k.startswith("model.vision_encoder.")]
    rest = {k: p.dtype for k, p in half.named_parameters() if not k.startswith("model.vision_encoder.")}
    assert vit and set(vit) == {torch.bfloat16}
    assert rest and set(rest.values()) == {torch.float32}
    # the one rule (None: kept as built, fp32) says the same
    assert all((param_dtype(half, k, torch.bfloat16) or torch.float32) == p.dtype for k, p in half.named_parameters())
    vit_bytes = sum(p.numel() * p.element_size() for k, p in half.named_parameters() if k.startswith("model.vision"))
    assert vit_bytes * 2 == sum(p.numel() * 4 for k, p in full.named_parameters() if k.startswith("model.vision"))

    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    prompts = torch.randn(3, full.prompt_dim)
    emb, low = {}, {}
    for label, comp in (("fp32", full), ("bf16", half)):
        pixels, meta = comp.preprocess(image)
        with torch.no_grad():
            feats = comp.encode_image(pixels[None])
            # bf16 embeddings into the fp32 decoder (before: a dtype mismatch there)
            low[label], _ = comp.decode(feats, prompts)
        emb[label] = feats["image_embeddings"]
        assert low[label].dtype == torch.float32 and torch.isfinite(low[label]).all()
        assert comp.postprocess(low[label], meta).shape == (3, 48, 64)
    assert emb["bf16"].dtype == torch.bfloat16 and emb["fp32"].dtype == torch.float32
    # The ViT really ran in bf16: close to the fp32 run, not equal.
    a, b = emb["fp32"], emb["bf16"].float()
    assert not torch.equal(a, b)
    assert (a - b).norm() <= 0.05 * a.norm()
    assert (low["fp32"] - low["bf16"]).norm() <= 0.05 * low["fp32"].norm() + 1e-6
