"""mask_decoder ``sam2``: transformers' own processor and forward reproduced, the high-res
path really used, the tiny recipe end to end, save/load through ``Sam2Model`` directories,
and broken directories refused with the path named."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from lisa_kit.errors import CheckpointError

pytest.importorskip("lisa_kit_sam2", reason="the plugin distribution lisa-kit-sam2 is not installed "
                    "(pip install -e plugins/lisa-kit-sam2)")

from lisa_kit_sam2.sam2 import TINY_SAM2, VARIANTS, Sam2Warning, build_sam2, sizes_sam2  # noqa: E402


def _image(h=37, w=53, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _prompts(m=3, p=32, seed=0):
    # Scaled up: with random tiny weights, unit-scale prompts give near-constant masks.
    return 4 * torch.randn(m, p, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_sam2(config=TINY_SAM2).eval()


def _run(comp, img, prompts):
    px, meta = comp.preprocess(img)
    with torch.no_grad():
        feats = comp.encode_image(px[None])
        low, scores = comp.decode(feats, prompts)
        return low, scores, comp.postprocess(low, meta)


# -- transformers' processor and model, reproduced -------------------------------------
def test_preprocess_is_sam2_image_processors(tiny):
    """Square resize without keeping the aspect ratio, ImageNet normalisation: bit-exact
    with transformers' Sam2ImageProcessor (built from its defaults, nothing downloaded)."""
    from transformers import Sam2ImageProcessor

    full = build_sam2(config={  # tiny widths at the processor's 1024 px (only preprocess runs)
        **TINY_SAM2, "prompt_encoder_config": {**TINY_SAM2["prompt_encoder_config"], "image_size": 1024},
        "vision_config": {**TINY_SAM2["vision_config"], "backbone_feature_sizes": [[256, 256], [128, 128], [64, 64]],
                          "backbone_config": {**TINY_SAM2["vision_config"]["backbone_config"], "image_size": [1024, 1024]}}})
    proc = Sam2ImageProcessor()
    for img in (_image(37, 53, 0), _image(300, 120, 1)):
        px, meta = full.preprocess(img)
        ref = proc(images=img, return_tensors="pt")["pixel_values"][0]
        assert px.shape == (3, 1024, 1024) and px.dtype == torch.float32
        assert torch.equal(px, ref)
        assert meta.original_size == img.shape[:2] and meta.input_size == (1024, 1024)
    px, _ = tiny.preprocess(_image())
    assert px.shape == (3, 64, 64)


def test_postprocess_is_post_process_masks(tiny):
    from transformers import Sam2ImageProcessor

    low, _, masks = _run(tiny, _image(), _prompts())
    ref = Sam2ImageProcessor().post_process_masks([low], [(37, 53)], binarize=False)[0]
    assert masks.shape == (3, 37, 53) and masks.dtype == torch.float32
    torch.testing.assert_close(masks, ref[:, 0], atol=0, rtol=0)


def test_encode_and_decode_reproduce_sam2_forward(tiny):
    """Split in two (image once, prompts many times), the path is Sam2Model.forward's:
    fed the prompt encoder's point embeddings, the masks and scores are identical."""
    px, _ = tiny.preprocess(_image())
    points = torch.tensor([[[[10.0, 20.0]], [[40.0, 5.0]]]])  # 1 image, 2 masks, 1 point each (x, y)
    labels = torch.ones(1, 2, 1, dtype=torch.int)
    with torch.no_grad():
        ref = tiny.model(pixel_values=px[None], input_points=points, input_labels=labels, multimask_output=False)
        sparse, _ = tiny.model.prompt_encoder(input_points=points, input_labels=labels, input_boxes=None,
                                              input_masks=None)
        low, scores = tiny.decode_tokens(tiny.encode_image(px[None]), sparse[0])
    torch.testing.assert_close(low, ref.pred_masks[0], atol=0, rtol=0)
    torch.testing.assert_close(scores, ref.iou_scores[0], atol=0, rtol=0)


def test_shapes_and_prompt_dim(tiny):
    px, _ = tiny.preprocess(_image())
    with torch.no_grad():
        feats = tiny.encode_image(torch.stack([px, px]))
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "image_embeddings": (2, 32, 4, 4), "high_res_feats_0": (2, 32, 16, 16), "high_res_feats_1": (2, 32, 8, 8)}
    low, scores, masks = _run(tiny, _image(), _prompts(5))
    assert low.shape == (5, 1, 16, 16) and scores.shape == (5, 1) and masks.shape == (5, 37, 53)
    assert tiny.prompt_dim == 32 and sizes_sam2(config=TINY_SAM2) == {"prompt_dim": 32}
    assert sizes_sam2(variant="hiera_large") == {"prompt_dim": 256}


def test_high_resolution_features_are_used(tiny):
    """The stride-4/8 FPN maps feed the decoder's upsampling: zeroing either changes the masks."""
    px, _ = tiny.preprocess(_image())
    prompts = _prompts()
    with torch.no_grad():
        feats = tiny.encode_image(px[None])
        base, _ = tiny.decode(feats, prompts)
        for key in ("high_res_feats_0", "high_res_feats_1"):
            low, _ = tiny.decode({**feats, key: torch.zeros_like(feats[key])}, prompts)
            # Random init (std 0.02) gives small logits: compare relative to their scale.
            assert (low - base).abs().max() > 0.01 * base.abs().max(), key


def test_dynamic_multimask_is_off_unless_asked():
    torch.manual_seed(0)
    assert build_sam2(config=TINY_SAM2).model.mask_decoder.dynamic_multimask_via_stability is False
    on = build_sam2(config=TINY_SAM2, dynamic_multimask=True)
    assert on.model.mask_decoder.dynamic_multimask_via_stability is True
    assert on.export_config()["dynamic_multimask"] is True


def test_variants_have_the_released_shapes():
    """Hiera-L: 4 stages of 2/6/36/4 blocks, 144..1152 wide; the decoder is SAM2's 256."""
    from lisa_kit_sam2.sam2 import sam2_config

    cfg = sam2_config(VARIANTS["hiera_large"])
    bb = cfg.vision_config.backbone_config
    assert bb.blocks_per_stage == [2, 6, 36, 4] and bb.embed_dim_per_stage == [144, 288, 576, 1152]
    assert bb.global_attention_blocks == [23, 33, 43]
    assert cfg.vision_config.backbone_channel_list == [1152, 576, 288, 144]
    assert cfg.mask_decoder_config.hidden_size == cfg.vision_config.fpn_hidden_size == 256
    with pytest.raises(ValueError, match="hiera_huge"):
        build_sam2(variant="hiera_huge")
    with pytest.raises(ValueError, match="either"):
        build_sam2(pretrained="/x", config=TINY_SAM2)


# -- loading ---------------------------------------------------------------------------
def test_save_pretrained_round_trip(tiny, tmp_path):
    """Sam2Model.save_pretrained -> `pretrained:` gives a bit-identical component."""
    tiny.model.save_pretrained(tmp_path / "sam2")
    again = build_sam2(pretrained=str(tmp_path / "sam2")).eval()
    img, prompts = _image(), _prompts()
    for a, b in zip(_run(tiny, img, prompts), _run(again, img, prompts)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert sizes_sam2(pretrained=str(tmp_path / "sam2")) == {"prompt_dim": 32}
    # lisa_kit's own format rebuilds it from export_config alone.
    from lisa_kit.builder import build_component

    rebuilt = build_component("mask_decoder", {"name": "sam2", **again.export_config()}).eval()
    rebuilt.load_state_dict(again.state_dict())
    torch.testing.assert_close(_run(rebuilt, img, prompts)[2], _run(again, img, prompts)[2], atol=0, rtol=0)


def test_official_video_checkpoint_layout_loads(tmp_path):
    """facebook/sam2.1-hiera-* are Sam2VideoModel directories: the image model's weights
    load from them, the memory modules are skipped."""
    from transformers import Sam2VideoConfig, Sam2VideoModel

    torch.manual_seed(0)
    video = Sam2VideoModel(Sam2VideoConfig(**TINY_SAM2, image_size=64, memory_attention_hidden_size=32,
                                           memory_encoder_hidden_size=32, memory_encoder_output_channels=16,
                                           mask_downsampler_embed_dim=32, memory_fuser_embed_dim=32,
                                           memory_fuser_intermediate_dim=64, memory_attention_num_layers=1,
                                           memory_attention_feed_forward_hidden_size=64))
    video.save_pretrained(tmp_path / "sam2.1-tiny")
    assert json.loads((tmp_path / "sam2.1-tiny" / "config.json").read_text())["model_type"] == "sam2_video"
    comp = build_sam2(pretrained=str(tmp_path / "sam2.1-tiny"))
    own = video.state_dict()
    for k, v in comp.model.state_dict().items():
        assert torch.equal(v, own[k]), k


def test_broken_directories_name_the_path(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(CheckpointError, match="not found.*nowhere"):
        build_sam2(pretrained=str(tmp_path / "nowhere"))
    d = tmp_path / "ok"
    tiny.model.save_pretrained(d)
    weights = d / "model.safetensors"
    state = load_file(str(weights))

    (d / "model.safetensors").rename(d / "elsewhere.bin")  # no weights file
    with pytest.raises(CheckpointError, match=f"no weights in {d}"):
        build_sam2(pretrained=str(d))

    renamed = dict(state)  # a key that does not belong: missing + unexpected, path and key named
    renamed["mask_decoder.iou_tokenX.weight"] = renamed.pop("mask_decoder.iou_token.weight")
    save_file(renamed, str(weights))
    with pytest.raises(CheckpointError, match=rf"{d}.*missing keys: 1.*iou_token\.weight") as err:
        build_sam2(pretrained=str(d))
    assert err.value.file == str(d)

    reshaped = dict(state)  # a tensor of the wrong shape
    reshaped["mask_decoder.iou_token.weight"] = torch.zeros(1, 7)
    save_file(reshaped, str(weights))
    with pytest.raises(CheckpointError, match=rf"{d}.*mismatched keys: 1.*iou_token\.weight \(checkpoint \(1, 7\)"):
        build_sam2(pretrained=str(d))

    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=f"cannot load {d} as Sam2Model"):
        build_sam2(pretrained=str(d))

    save_file(state, str(weights))
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match=f"{d} has no config.json"):
        build_sam2(pretrained=str(d))


# -- the tiny recipe end to end --------------------------------------------------------
def _conv(q="Can you segment the red square?", a="Sure, it is [SEG]."):
    from lisa_kit.conversation import IMAGE, Conversation, get_template

    return Conversation(get_template("llava_v1")).add([IMAGE, "\n" + q], a)


def _samples():
    from lisa_kit.data import Sample
    from lisa_kit.testing import synthetic_image

    img0, m0 = synthetic_image(48, 64, 0)
    img1, m1 = synthetic_image(40, 30, 1)
    return [Sample(img0, [_conv(), _conv(a="[SEG] and [SEG].")], np.stack([m0, m0, 1 - m0])),
            Sample(img1, [_conv()], m1[None])]


def test_recipe_forward_loss_backward(sam2_model):
    from lisa_kit.data import collate
    from lisa_kit.loss import lisa_loss

    model = sam2_model
    assert type(model.mask_decoder).__name__ == "Sam2MaskDecoder"
    assert model.seg_head.out_dim == model.mask_decoder.prompt_dim == 32  # derived from the decoder
    batch = collate(_samples(), model)
    out = model(batch)
    assert [tuple(p.shape) for p in out.pred_masks] == [(3, 48, 64), (1, 40, 30)]
    assert [tuple(x.shape) for x in out.low_res_masks] == [(3, 1, 16, 16), (1, 1, 16, 16)]
    losses = lisa_loss(out.logits, out.fused.labels, out.pred_masks, batch.gt_masks)
    assert torch.isfinite(losses["loss"]) and losses["loss"] > 0
    try:
        losses["loss"].backward()
        md = model.mask_decoder.mask_decoder
        # The high-res projections run in decode, so they learn with the decoder ...
        assert md.conv_s0.weight.grad is not None and md.conv_s0.weight.grad.abs().sum() > 0
        assert md.conv_s1.weight.grad is not None and md.conv_s1.weight.grad.abs().sum() > 0
        assert model.seg_head.layers[0].weight.grad.abs().sum() > 0
        # ... while the image encoder runs without a graph (LISA freezes it).
        assert all(p.grad is None for p in model.mask_decoder.image_encoder.parameters())
    finally:
        model.zero_grad(set_to_none=True)


def test_training_rule_trains_the_decoder_only(sam2_model):
    """LISA's rule finds SAM2's parts by name: decoder trained, image/prompt encoders frozen."""
    from lisa_kit.train.trainable import _decoder_part

    trained = {id(p) for p in _decoder_part(sam2_model.mask_decoder)}
    md = sam2_model.mask_decoder
    assert trained == {id(p) for p in md.mask_decoder.parameters()}
    assert not trained & {id(p) for p in md.image_encoder.parameters()}
    assert not trained & {id(p) for p in md.prompt_encoder.parameters()}


def test_recipe_generation_matches_teacher_forcing(sam2_model, monkeypatch):
    import lisa_kit.generation as g
    from lisa_kit.conversation import IMAGE, Conversation, encode, get_template
    from lisa_kit.generation import GenerationConfig
    from lisa_kit.model import Batch
    from lisa_kit.testing import force_generation, synthetic_image

    model = sam2_model
    tok = model.tokenizer
    seg, eos, word = tok.token_id("[SEG]"), tok.eos_id, tok.encode_text("red")[0]
    force_generation(monkeypatch, {0: word, 1: seg, 2: word, 3: seg, 4: eos})
    img, _ = synthetic_image(48, 64, 3)
    conv = Conversation(get_template("llava_v1")).add([IMAGE, "\nSegment the red square."], None)
    ids, _ = encode(conv, tok, model.fusion.wrap_image(tok))
    px, meta = model.mask_decoder.preprocess(img)
    vpx, mpx = model.vision_encoder.preprocess(img)[None], px[None]
    res = g.generate(model, [ids], [[0]], vpx, mpx, [meta], GenerationConfig(max_new_tokens=10))[0]
    assert res.token_ids == [word, seg, word, seg, eos] and res.seg_indices == [1, 3]
    assert res.masks.shape == (2, 48, 64) and res.scores.shape == (2,)
    full = torch.tensor([ids + res.token_ids])
    with torch.no_grad():
        out = model(Batch(full, torch.ones_like(full, dtype=torch.bool), [[0]], vpx, mpx, [meta]))
    torch.testing.assert_close(res.masks, out.pred_masks[0], atol=1e-4, rtol=1e-4)


def test_native_checkpoint_round_trip(sam2_model, tmp_path):
    """lisa_kit's own format: the resolved recipe (with export_config) + safetensors."""
    from lisa_kit.checkpoint.native import load_model, save_model
    from lisa_kit.data import collate

    save_model(sam2_model, tmp_path / "ckpt")
    again = load_model(tmp_path / "ckpt").eval()
    batch = collate(_samples(), sam2_model)
    with torch.no_grad():
        a, b = sam2_model(batch), again(batch)
    for x, y in zip(a.pred_masks, b.pred_masks):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


def test_released_lisa_checkpoint_keeps_sam2_weights(tmp_path):
    """A released-LISA directory (here: lisa-tiny exported) with the decoder swapped for
    SAM2: the LLM, projector and seg head load from it, its SAM weights are skipped with a
    warning, and SAM2 keeps the weights of its own `pretrained` directory."""
    from lisa_kit.builder import build_model, load
    from lisa_kit.checkpoint.export import TOWER_DIR, export_lisa_hf
    from lisa_kit.testing import tiny_recipe

    torch.manual_seed(0)
    lisa = build_model(tiny_recipe()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export's notes about the tiny tower
        out = export_lisa_hf(lisa, tmp_path / "lisa")
    torch.manual_seed(1)
    build_sam2(config=TINY_SAM2).model.save_pretrained(tmp_path / "sam2")
    recipe = {"name": "swap", "weights": {"format": "lisa_hf", "path": str(out)},
              "model": {"vision_encoder": {"name": "hf_clip", "pretrained": str(out / TOWER_DIR)},
                        "mask_decoder": {"name": "sam2", "pretrained": str(tmp_path / "sam2")}}}
    with pytest.warns(Sam2Warning, match="do not apply to SAM2"):
        model = load(recipe)
    ref = build_sam2(pretrained=str(tmp_path / "sam2"))
    for k, v in ref.state_dict().items():
        assert torch.equal(model.mask_decoder.state_dict()[k], v), k
    for k, v in lisa.seg_head.state_dict().items():
        assert torch.equal(model.seg_head.state_dict()[k], v), k
