"""SAM's image encoder in the requested precision (issue 12): at bf16 the image encoder is
stored and run in bf16 (as LISA's ``model.bfloat16()``) while the prompt encoder and mask
decoder SAM declares (``fp32_prefixes``) stay fp32; one rule for loading, casting and the
memory estimate; a decoder that declares nothing stays fp32 whole."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lisa_kit.api import Segmenter
from lisa_kit.builder import build_component, build_model
from lisa_kit.checkpoint import io
from lisa_kit.checkpoint.export import export_lisa_hf
from lisa_kit.checkpoint.lisa_hf import (
    ensure_lisa_memory,
    import_lisa_hf,
    lisa_bytes,
    lisa_recipe,
)
from lisa_kit.checkpoint.native import load_model, save_model
from lisa_kit.components.sam import TINY_SAM, SamMaskDecoder
from lisa_kit.interfaces import MaskDecoder
from lisa_kit.testing import force_generation, synthetic_image, tiny_recipe

pytestmark = pytest.mark.filterwarnings("ignore::lisa_kit.checkpoint.export.ExportWarning")

KEPT = SamMaskDecoder.fp32_prefixes
SAM_NODE = {"name": "sam", "variant": "custom", "config": TINY_SAM}


def _assert_sam_split(sam, dtype=torch.bfloat16):
    """Image encoder in ``dtype``; what SAM keeps (prompt encoder, mask decoder) in fp32."""
    state = sam.state_dict()
    enc = [k for k in state if k.startswith("image_encoder.")]
    kept = [k for k in state if k.startswith(KEPT)]
    assert enc and kept and len(enc) + len(kept) == len(state)
    assert all(state[k].dtype == dtype for k in enc if state[k].is_floating_point())
    assert all(state[k].dtype == torch.float32 for k in kept if state[k].is_floating_point())
    assert sam.pixel_mean.dtype == torch.float32  # non-persistent: kept as built


@pytest.fixture(scope="module")
def lisa_dir(tmp_path_factory):
    """A tiny released-LISA directory (fp32), written by the real exporter."""
    out = tmp_path_factory.mktemp("sam_precision") / "lisa"
    torch.manual_seed(0)
    export_lisa_hf(build_model(tiny_recipe()), out)
    return out


def test_from_recipe_bf16_casts_only_the_image_encoder():
    s = Segmenter.from_recipe("lisa-tiny", precision="bf16")
    _assert_sam_split(s.model.mask_decoder)


def test_lisa_hf_import_bf16_streams_sam_split(lisa_dir):
    model = import_lisa_hf(lisa_dir, sam=lisa_dir / "sam_config.json", dtype=torch.bfloat16)
    _assert_sam_split(model.mask_decoder)
    ref = import_lisa_hf(lisa_dir, sam=lisa_dir / "sam_config.json")  # fp32: the values, once cast
    for k, v in ref.mask_decoder.state_dict().items():
        got = model.mask_decoder.state_dict()[k]
        assert torch.equal(got, v.to(got.dtype)), k


def test_native_load_bf16_streams_sam_split(tmp_path):
    torch.manual_seed(0)
    save_model(build_model(tiny_recipe()), tmp_path / "native")
    model = load_model(tmp_path / "native", dtype=torch.bfloat16)
    _assert_sam_split(model.mask_decoder)
    assert model.projector.state_dict()[next(iter(model.projector.state_dict()))].dtype == torch.bfloat16


def _forced_seg(s, monkeypatch, image):
    force_generation(monkeypatch, {0: s.model.seg_token_id, 1: s.tokenizer.eos_id})
    return s.seg(image, "Segment the red square.")


def test_bf16_seg_masks_match_fp32(monkeypatch):
    image = synthetic_image(40, 56, 3)[0]
    r32 = _forced_seg(Segmenter.from_recipe("lisa-tiny"), monkeypatch, image)
    s16 = Segmenter.from_recipe("lisa-tiny", precision="bf16")
    dec, logits = s16.model.mask_decoder, []
    post = dec.postprocess
    monkeypatch.setattr(dec, "postprocess", lambda *a, **kw: logits.append(post(*a, **kw)) or logits[-1])
    r16 = _forced_seg(s16, monkeypatch, image)
    assert dec.image_encoder.patch_embed.proj.weight.dtype == torch.bfloat16
    assert logits and all(x.dtype == torch.float32 for x in logits)  # mask logits stay fp32
    assert r16.masks.shape == r32.masks.shape == (1, 40, 56)
    m32, m16 = r32.masks.astype(bool), r16.masks.astype(bool)
    assert 0 < m32.sum() < m32.size  # a mask with both classes, so IoU means something
    iou = (m32 & m16).sum() / (m32 | m16).sum()
    assert iou >= 0.9, iou


def test_decode_takes_embeddings_of_any_dtype():
    torch.manual_seed(0)
    sam = build_component("mask_decoder", SAM_NODE).eval()
    io.cast_component(sam, torch.bfloat16)
    pixels = torch.randn(1, 3, sam.image_size, sam.image_size)
    with torch.no_grad():
        feats = sam.encode_image(pixels)
        assert feats["image_embeddings"].dtype == torch.bfloat16
        low, scores = sam.decode(feats, torch.randn(3, sam.prompt_dim))
    assert low.dtype == scores.dtype == torch.float32 and low.shape[0] == 3


class _Undeclared(MaskDecoder):
    """A plugin decoder that declares nothing about precision."""

    prompt_dim = 4

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 4)


def test_decoder_that_declares_nothing_stays_fp32():
    dec = _Undeclared()
    io.cast_component(dec, torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in dec.parameters())
    state = {k: v.to(torch.bfloat16) for k, v in _Undeclared().state_dict().items()}
    with io.empty_weights():
        empty = _Undeclared()
    io.load_into(empty, state, "mask_decoder", dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in empty.parameters())
    assert io.component_dtype("mask_decoder", torch.bfloat16) is None


def test_estimate_counts_the_image_encoder_in_bf16(lisa_dir, monkeypatch):
    recipe = lisa_recipe(lisa_dir, sam=str(lisa_dir / "sam_config.json"))
    owner = io.declared_class("mask_decoder", recipe["model"]["mask_decoder"])
    assert owner is SamMaskDecoder
    model = import_lisa_hf(lisa_dir, sam=lisa_dir / "sam_config.json", dtype=torch.bfloat16)
    enc = [v for k, v in model.mask_decoder.state_dict().items() if k.startswith("image_encoder.")]
    est = lisa_bytes(lisa_dir, torch.bfloat16, {"mask_decoder": owner})
    # The interface default (all fp32) counts the image encoder at 4 bytes a value; SAM's rule at 2.
    assert lisa_bytes(lisa_dir, torch.bfloat16) - est == sum(v.numel() for v in enc) * 2
    # What ensure_memory is asked for (checkpoint and CLIP tower) counts the split too.
    from lisa_kit.checkpoint import lisa_hf

    asked = []
    monkeypatch.setattr(lisa_hf, "ensure_memory", lambda needed, device, what: asked.append(needed))
    ensure_lisa_memory(recipe, lisa_dir, torch.bfloat16, "cpu")
    monkeypatch.setattr(lisa_hf, "declared_class", lambda kind, node: MaskDecoder if kind == "mask_decoder" else None)
    ensure_lisa_memory(recipe, lisa_dir, torch.bfloat16, "cpu")
    assert asked[1] - asked[0] == sum(v.numel() for v in enc) * 2


def test_bf16_autocast_training_step_with_frozen_bf16_image_encoder():
    from lisa_kit.train.trainable import cast_frozen

    torch.manual_seed(0)
    sam = build_component("mask_decoder", SAM_NODE)
    io.cast_component(sam, torch.bfloat16)  # as a bf16 load leaves it: image encoder bf16
    _assert_sam_split(sam)
    sam.image_encoder.requires_grad_(False)  # LISA's recipe: SAM's image encoder frozen
    sam.prompt_encoder.requires_grad_(False)
    cast_frozen(sam, torch.bfloat16)
    prompts = torch.randn(2, sam.prompt_dim, requires_grad=True)
    before = sam.mask_decoder.output_upscaling[0].weight.detach().clone()
    opt = torch.optim.SGD([p for p in sam.parameters() if p.requires_grad], lr=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = sam.encode_image(torch.randn(1, 3, sam.image_size, sam.image_size))
        low, _ = sam.decode(feats, prompts)
    loss = low.float().square().mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and prompts.grad is not None and torch.isfinite(prompts.grad).all()
    assert sam.mask_decoder.output_upscaling[0].weight.dtype == torch.float32
    assert not torch.equal(before, sam.mask_decoder.output_upscaling[0].weight)
    assert np.isfinite(low.detach().float().numpy()).all()


class _SamAllCast(SamMaskDecoder):
    fp32_prefixes = ()  # wrong: the prompt encoder's positional encoding is built in fp32


def _build_all_cast(variant="custom", config=None):
    from lisa_kit.components.sam import sam_config

    return _SamAllCast(sam_config(variant, config))


def test_conformance_runs_a_decoder_in_its_declared_precision():
    from lisa_kit.conformance import ConformanceError, check_component
    from lisa_kit.interfaces import ComponentSpec

    tiny = {"variant": "custom", "config": TINY_SAM}
    with pytest.raises(ConformanceError, match=r"mask_decoder:sam_all_cast: cast to bfloat16 by its fp32_prefixes "
                                                r"\(\) it no longer runs"):
        check_component(ComponentSpec("mask_decoder", "sam_all_cast", _build_all_cast, tiny=tiny))
    from lisa_kit.components.sam import build_sam

    with pytest.raises(ConformanceError, match="component_class is '_SamAllCast' but the build returns SamMaskDecoder"):
        check_component(ComponentSpec("mask_decoder", "liar", build_sam, tiny=tiny, component_class=_SamAllCast))


def test_sam_checkpoint_named_by_the_recipe_streams_split(tmp_path):
    """``checkpoint:`` in the recipe's SAM node (Meta's .pth) is read straight into the split."""
    torch.manual_seed(0)
    src = build_component("mask_decoder", SAM_NODE)
    io.save_safetensors(src.state_dict(), tmp_path / "sam.safetensors")
    recipe = tiny_recipe(mask_decoder={**SAM_NODE, "checkpoint": str(tmp_path / "sam.safetensors")})
    model = build_model(recipe, dtype=torch.bfloat16)
    _assert_sam_split(model.mask_decoder)
    for k, v in src.state_dict().items():
        got = model.mask_decoder.state_dict()[k]
        assert torch.equal(got, v.to(got.dtype)), k
