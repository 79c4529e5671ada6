"""mask_decoder ``hf_sam``: the same masks as the built-in ``sam`` given the same weights,
transformers' processor and forward reproduced, Meta and HF checkpoints, released LISA
checkpoints, and broken directories refused with the path named."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from lisa_kit.components.sam import TINY_SAM, build_sam
from lisa_kit.errors import CheckpointError

pytest.importorskip("lisa_kit_sam2", reason="the plugin distribution lisa-kit-sam2 is not installed "
                    "(pip install -e plugins/lisa-kit-sam2)")

from lisa_kit_sam2.hf_sam import TINY_HF_SAM, build_hf_sam, meta_to_hf, sizes_hf_sam  # noqa: E402

TOL = 1e-4  # same weights, two implementations (measured: ~5e-6)


def _image(h=37, w=53, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _prompts(m=3, p=32, seed=0):
    return 4 * torch.randn(m, p, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pair():
    """The built-in tiny `sam` (segment_anything) and `hf_sam` holding its weights."""
    torch.manual_seed(0)
    meta = build_sam("custom", config=TINY_SAM).eval()
    hf = build_hf_sam(config=TINY_HF_SAM).eval()
    hf.model.load_state_dict(meta_to_hf(meta.state_dict()), strict=True)
    return meta, hf


def _decode(comp, px, meta, prompts):
    with torch.no_grad():
        low, scores = comp.decode(comp.encode_image(px[None]), prompts)
        return low, scores, comp.postprocess(low, meta)


def test_meta_key_layout_maps_onto_sam_model_exactly(pair):
    meta, hf = pair
    converted = meta_to_hf(meta.state_dict())
    own = hf.model.state_dict()
    assert converted.keys() == own.keys()
    assert all(converted[k].shape == own[k].shape for k in own)


@pytest.mark.parametrize("size", [(37, 53), (60, 40)])
def test_same_weights_same_masks_as_builtin_sam(pair, size):
    """Given the pixels of the built-in preprocessing, both implementations agree to 1e-4."""
    meta_sam, hf = pair
    px, meta = meta_sam.preprocess(_image(*size))
    prompts = _prompts()
    a, b = _decode(meta_sam, px, meta, prompts), _decode(hf, px, meta, prompts)
    assert a[0].abs().max() > 0.1  # not trivially small logits
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=TOL, rtol=0)


def test_meta_checkpoint_file_loads(pair, tmp_path):
    """`checkpoint:` reads a Meta sam_vit_*.pth (weights_only) and renames its keys."""
    meta_sam, hf = pair
    torch.save(meta_sam.state_dict(), tmp_path / "sam_tiny.pth")
    loaded = build_hf_sam(config=TINY_HF_SAM, checkpoint=str(tmp_path / "sam_tiny.pth")).eval()
    for k, v in hf.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_preprocess_and_postprocess_are_sam_image_processors(pair):
    """Longest side to 1024 (torchvision, antialiased), ImageNet mean/std, zero padding:
    bit-exact with transformers' SamImageProcessor; masks as its post_process_masks."""
    from transformers import SamImageProcessor

    full = build_hf_sam(config={**TINY_HF_SAM,  # tiny widths at the processor's 1024 px (only preprocess runs)
                                "vision_config": {**TINY_HF_SAM["vision_config"], "image_size": 1024},
                                "prompt_encoder_config": {**TINY_HF_SAM["prompt_encoder_config"], "image_size": 1024}})
    proc = SamImageProcessor()
    for img in (_image(37, 53, 0), _image(300, 120, 1)):
        px, meta = full.preprocess(img)
        ref = proc(images=img, return_tensors="pt")
        assert torch.equal(px, ref["pixel_values"][0])
        assert meta.input_size == tuple(ref["reshaped_input_sizes"][0].tolist())
    _, hf = pair
    px, meta = hf.preprocess(_image())
    low, _, masks = _decode(hf, px, meta, _prompts())
    proc64 = SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
    ref = proc64.post_process_masks([low], [(37, 53)], [meta.input_size], binarize=False)[0]
    torch.testing.assert_close(masks, ref[:, 0], atol=0, rtol=0)


def test_encode_and_decode_reproduce_sam_forward(pair):
    _, hf = pair
    px, _ = hf.preprocess(_image())
    points = torch.tensor([[[[10.0, 20.0]], [[40.0, 5.0]]]])
    labels = torch.ones(1, 2, 1, dtype=torch.int)
    with torch.no_grad():
        ref = hf.model(pixel_values=px[None], input_points=points, input_labels=labels, multimask_output=False)
        sparse, _ = hf.model.prompt_encoder(input_points=points, input_labels=labels, input_boxes=None,
                                            input_masks=None)
        low, scores = hf.decode_tokens(hf.encode_image(px[None]), sparse[0])
    torch.testing.assert_close(low, ref.pred_masks[0], atol=0, rtol=0)
    torch.testing.assert_close(scores, ref.iou_scores[0], atol=0, rtol=0)


def test_save_pretrained_round_trip_and_sizes(pair, tmp_path):
    _, hf = pair
    hf.model.save_pretrained(tmp_path / "sam")
    again = build_hf_sam(pretrained=str(tmp_path / "sam")).eval()
    px, meta = hf.preprocess(_image())
    for x, y in zip(_decode(hf, px, meta, _prompts()), _decode(again, px, meta, _prompts())):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    assert again.prompt_dim == 32 and sizes_hf_sam(pretrained=str(tmp_path / "sam")) == {"prompt_dim": 32}
    assert sizes_hf_sam(variant="vit_h") == {"prompt_dim": 256}


def test_broken_directories_name_the_path(pair, tmp_path):
    from safetensors.torch import load_file, save_file

    _, hf = pair
    d = tmp_path / "sam"
    hf.model.save_pretrained(d)
    state = load_file(str(d / "model.safetensors"))
    state.pop("mask_decoder.iou_token.weight")
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{d}.*missing keys: 1.*iou_token\.weight"):
        build_hf_sam(pretrained=str(d))
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=f"no weights in {d}"):
        build_hf_sam(pretrained=str(d))
    with pytest.raises(CheckpointError, match="does not fit"):
        bad = {k: v for k, v in build_sam("custom", config=TINY_SAM).state_dict().items() if "iou_token" not in k}
        torch.save(bad, tmp_path / "bad.pth")
        build_hf_sam(config=TINY_HF_SAM, checkpoint=str(tmp_path / "bad.pth"))


def test_recipe_builds_and_matches_lisa_tiny_with_the_same_weights():
    """lisa-tiny-hf-sam is lisa-tiny with the other implementation: copy lisa-tiny's SAM
    weights over and the masks of a full forward agree."""
    from lisa_kit.builder import load
    from lisa_kit.conversation import IMAGE, Conversation, get_template
    from lisa_kit.data import Sample, collate
    from lisa_kit.testing import synthetic_image

    torch.manual_seed(0)
    ref = load("lisa-tiny").eval()
    torch.manual_seed(0)
    model = load("lisa-tiny-hf-sam").eval()
    assert model.seg_head.out_dim == model.mask_decoder.prompt_dim == 32
    model.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("mask_decoder.")},
                          strict=False)
    model.mask_decoder.load_state_dict(model.mask_decoder.normalize_keys(ref.mask_decoder.state_dict()))
    img, mask = synthetic_image(48, 64, 0)
    conv = Conversation(get_template("llava_v1")).add([IMAGE, "\nSegment the red square."], "Sure, [SEG].")
    batch = collate([Sample(img, [conv], mask[None])], ref)  # the built-in's pixels, for both
    with torch.no_grad():
        a, b = ref(batch), model(batch)
    torch.testing.assert_close(a.seg_embeddings, b.seg_embeddings, atol=0, rtol=0)
    torch.testing.assert_close(a.pred_masks[0], b.pred_masks[0], atol=TOL, rtol=0)


def test_released_lisa_checkpoint_through_hf_sam(tmp_path):
    """A released-LISA directory (lisa-tiny exported) read with the decoder swapped for
    hf_sam: SAM's Meta-layout weights are renamed on load and the masks are the built-in's."""
    from lisa_kit.builder import build_model, load
    from lisa_kit.checkpoint.export import SAM_CONFIG, TOWER_DIR, export_lisa_hf
    from lisa_kit.checkpoint.lisa_hf import import_lisa_hf
    from lisa_kit.conversation import IMAGE, Conversation, get_template
    from lisa_kit.data import Sample, collate
    from lisa_kit.testing import synthetic_image, tiny_recipe

    torch.manual_seed(0)
    lisa = build_model(tiny_recipe()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export's notes about the tiny tower
        out = export_lisa_hf(lisa, tmp_path / "lisa")
    ref = import_lisa_hf(out, sam=out / SAM_CONFIG).eval()
    model = load({"name": "swap", "weights": {"format": "lisa_hf", "path": str(out)},
                  "model": {"vision_encoder": {"name": "hf_clip", "pretrained": str(out / TOWER_DIR)},
                            "mask_decoder": {"name": "hf_sam", "config": TINY_HF_SAM}}}).eval()
    img, mask = synthetic_image(48, 64, 0)
    conv = Conversation(get_template("llava_v1")).add([IMAGE, "\nSegment the red square."], "Sure, [SEG].")
    batch = collate([Sample(img, [conv], mask[None])], ref)
    with torch.no_grad():
        a, b = ref(batch), model(batch)
    torch.testing.assert_close(a.pred_masks[0], b.pred_masks[0], atol=TOL, rtol=0)
