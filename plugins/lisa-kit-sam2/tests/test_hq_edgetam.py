"""mask decoders ``sam_hq`` and ``edgetam``, and box/point prompts (``decode_geometry``) of all
four plugin decoders: on tiny random models saved with ``save_pretrained`` and loaded through
the component (``pretrained:``), the component's outputs equal transformers' own forward of
the same directory; the tiny recipes run ``seg()`` and train."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from lisa_kit.errors import InputError, RecipeError

pytest.importorskip("lisa_kit_sam2", reason="the plugin distribution lisa-kit-sam2 is not installed "
                    "(pip install -e plugins/lisa-kit-sam2)")

from lisa_kit_sam2 import edgetam, hf_sam, sam2, sam_hq  # noqa: E402
from lisa_kit_sam2._hf import ForeignWeightsWarning  # noqa: E402

# name -> (build, tiny config, config maker, transformers model class name)
DECODERS = {
    "sam_hq": (sam_hq.build_sam_hq, sam_hq.TINY_SAM_HQ, sam_hq.sam_hq_config, "SamHQModel"),
    "edgetam": (edgetam.build_edgetam, edgetam.TINY_EDGETAM, edgetam.edgetam_config, "EdgeTamModel"),
    "hf_sam": (hf_sam.build_hf_sam, hf_sam.TINY_HF_SAM, hf_sam.sam_config, "SamModel"),
    "sam2": (sam2.build_sam2, sam2.TINY_SAM2, sam2.sam2_config, "Sam2Model"),
}
NEW = ("sam_hq", "edgetam")
TOL = {"atol": 1e-5, "rtol": 1e-5}
# Random init leaves SAM-HQ's ViT at std 1e-10 (transformers' initializer_range) and the others
# near zero logits: spread every weight so that masks, and so the comparisons, depend on them.
SPREAD = 0.2


def _image(h=37, w=53, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def saved(save_spread_models):
    """name -> directory of a tiny random transformers model (``save_pretrained``)."""
    return save_spread_models(DECODERS, SPREAD)


def _pair(saved, name, **kwargs):
    """(component loaded from the directory, transformers' own model loaded from it)."""
    import transformers

    build, _, _, cls_name = DECODERS[name]
    comp = build(pretrained=str(saved[name]), **kwargs).eval()
    ref = getattr(transformers, cls_name).from_pretrained(saved[name], local_files_only=True).eval()
    return comp, ref


def _prompts(m, p, seed=0):
    return torch.randn(m, p, generator=torch.Generator().manual_seed(seed))


def _not_flat(low):
    """A comparison means something only if the masks vary with position."""
    assert low.std() > 1e-3 * low.abs().max() and low.abs().max() > 0


# -- (a) the [SEG] prompt as the sparse embedding: transformers' forward with that embedding ---
@pytest.mark.parametrize("name,option", [("sam_hq", {"hq_token_only": False}), ("sam_hq", {"hq_token_only": True}),
                                         ("edgetam", {"dynamic_multimask": False}),
                                         ("edgetam", {"dynamic_multimask": True})],
                         ids=["sam_hq", "sam_hq-hq_only", "edgetam", "edgetam-dynamic"])
def test_sparse_prompt_equals_transformers_forward(saved, name, option, monkeypatch):
    """transformers' forward takes no sparse embedding, so its prompt encoder is made to return
    ours (and its no-mask dense embedding); the rest is the model's own forward from pixels."""
    comp, ref = _pair(saved, name, **option)
    px, _ = comp.preprocess(_image())
    prompts = _prompts(3, comp.prompt_dim)
    pe, calls = ref.prompt_encoder, []

    def sparse_is_ours(input_points=None, input_labels=None, input_boxes=None, input_masks=None):
        calls.append(1)
        h, w = pe.image_embedding_size
        return prompts[None, :, None, :], pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, h, w)

    monkeypatch.setattr(pe, "forward", sparse_is_ours)
    kwargs = {"multimask_output": False}
    if name == "sam_hq":
        kwargs["hq_token_only"] = option["hq_token_only"]
    else:
        ref.mask_decoder.dynamic_multimask_via_stability = option["dynamic_multimask"]
    with torch.no_grad():
        out = ref(pixel_values=px[None], **kwargs)
        low, scores = comp.decode(comp.encode_image(px[None]), prompts)
    assert calls
    _not_flat(low)
    torch.testing.assert_close(low, out.pred_masks[0], **TOL)
    torch.testing.assert_close(scores, out.iou_scores[0], **TOL)


def test_sam_hq_uses_the_early_vit_features_and_hq_token(saved):
    """The early ViT features feed the HQ path, and hq_token_only changes the mask."""
    comp, _ = _pair(saved, "sam_hq")
    px, _ = comp.preprocess(_image())
    prompts = _prompts(2, comp.prompt_dim)
    with torch.no_grad():
        feats = comp.encode_image(px[None])
        assert tuple(feats[sam_hq.VIT_FEATURES].shape) == (1, 4, 4, 32)  # (I, S/16, S/16, ViT width)
        base, _ = comp.decode(feats, prompts)
        zeroed, _ = comp.decode({**feats, sam_hq.VIT_FEATURES: torch.zeros_like(feats[sam_hq.VIT_FEATURES])}, prompts)
        comp.hq_token_only = True
        hq_only, _ = comp.decode(feats, prompts)
    assert (zeroed - base).abs().max() > 1e-3 * base.abs().max()
    assert (hq_only - base).abs().max() > 1e-3 * base.abs().max()


# -- (c) boxes and points through decode_geometry: transformers' forward with input_boxes/points ---
def _geometry():
    boxes = torch.tensor([[4.0, 6.0, 40.0, 30.0], [20.0, 2.0, 60.0, 50.0]])
    points = torch.tensor([[[10.0, 12.0], [30.0, 20.0]], [[50.0, 40.0], [0.0, 0.0]]])
    labels = torch.tensor([[1, 0], [1, -1]])  # foreground, background; foreground, padding
    return boxes, points, labels


@pytest.mark.parametrize("name", list(DECODERS))
@pytest.mark.parametrize("kind", ["box", "points", "both"])
def test_geometry_equals_transformers_forward(saved, name, kind):
    comp, ref = _pair(saved, name)
    if name in ("sam2", "edgetam"):
        ref.mask_decoder.dynamic_multimask_via_stability = False  # as the component (its default)
    boxes, points, labels = _geometry()
    boxes = None if kind == "points" else boxes
    points, labels = (None, None) if kind == "box" else (points, labels)
    px, _ = comp.preprocess(_image())
    with torch.no_grad():
        out = ref(pixel_values=px[None], input_boxes=None if boxes is None else boxes[None],
                  input_points=None if points is None else points[None],
                  input_labels=None if labels is None else labels[None], multimask_output=False)
        low, scores = comp.decode_geometry(comp.encode_image(px[None]), boxes, points, labels)
    assert comp.accepts_geometry is True
    assert low.shape == (2, 1, 16, 16) and scores.shape == (2, 1)
    _not_flat(low)
    torch.testing.assert_close(low, out.pred_masks[0], **TOL)
    torch.testing.assert_close(scores, out.iou_scores[0], **TOL)


# -- (b) M prompts decoded together equal each alone ------------------------------------------
@pytest.mark.parametrize("name", list(DECODERS))
def test_prompts_together_equal_each_alone(saved, name):
    comp, _ = _pair(saved, name)
    boxes, points, labels = _geometry()
    prompts = _prompts(3, comp.prompt_dim)
    px, _ = comp.preprocess(_image())
    with torch.no_grad():
        feats = comp.encode_image(px[None])
        def sparse(rows):
            return comp.decode(feats, prompts[rows])

        def geometry(rows):
            return comp.decode_geometry(feats, boxes[rows], points[rows], labels[rows])

        for run in (sparse, geometry):
            together = run(slice(None))
            for i in range(together[0].shape[0]):
                for a, b in zip(run(slice(i, i + 1)), together):
                    torch.testing.assert_close(a, b[i:i + 1], **TOL)
            assert (together[0][0] - together[0][1]).abs().max() > 0, run.__name__  # the prompts do differ


def test_box_from_original_pixels_via_to_input(saved):
    """A box given in original-image pixels, mapped by ImageMeta.to_input, is the box the
    processor would send: its corners land on the resized image's corners."""
    comp, _ = _pair(saved, "sam_hq")
    img = _image(37, 53)
    _, meta = comp.preprocess(img)
    assert meta.input_size == (45, 64)  # longest side to 64, rounded half up
    corners = meta.to_input(torch.tensor([[0.0, 0.0], [53.0, 37.0]]))
    torch.testing.assert_close(corners, torch.tensor([[0.0, 0.0], [64.0, 45.0]]))
    comp2, _ = _pair(saved, "edgetam")  # square resize: each axis scaled on its own
    _, meta2 = comp2.preprocess(img)
    torch.testing.assert_close(meta2.to_input(torch.tensor([[53.0, 37.0]])), torch.tensor([[64.0, 64.0]]))


@pytest.mark.parametrize("args,match", [
    ((None, None, None), "boxes or points"),
    ((torch.zeros(2, 3), None, None), r"boxes must be a float tensor \(M, 4\)"),
    ((torch.tensor([[5.0, 5.0, 1.0, 9.0]]), None, None), "x1 <= x2"),
    ((torch.tensor([[0.0, 0.0, float("nan"), 1.0]]), None, None), "finite"),
    ((None, torch.zeros(1, 2, 2), None), "point_labels must be an integer tensor"),
    ((None, torch.zeros(1, 2, 2), torch.tensor([[1, 2]])), "1 \\(foreground\\), 0"),
    ((torch.zeros(1, 4), None, torch.tensor([[1]])), "without points"),
    ((torch.zeros(2, 4), torch.zeros(1, 1, 2), torch.ones(1, 1, dtype=torch.long)), "same number"),
], ids=["none", "box-shape", "box-order", "box-nan", "labels-missing", "label-value", "labels-alone", "counts"])
def test_bad_geometry_is_an_input_error(saved, args, match):
    comp, _ = _pair(saved, "edgetam")
    px, _ = comp.preprocess(_image())
    with torch.no_grad(), pytest.raises(InputError, match=match):
        comp.decode_geometry(comp.encode_image(px[None]), *args)


# -- building and loading --------------------------------------------------------------------
def test_sizes_and_export_round_trip(saved):
    from lisa_kit.builder import build_component

    for name, sizes, variant in (("sam_hq", sam_hq.sizes_sam_hq, "vit_h"),
                                 ("edgetam", edgetam.sizes_edgetam, "repvit_m1")):
        tiny = DECODERS[name][1]
        assert sizes(config=tiny) == sizes(pretrained=str(saved[name])) == {"prompt_dim": 32}
        assert sizes(variant=variant) == {"prompt_dim": 256}
        comp, _ = _pair(saved, name)
        # lisa_kit's own format rebuilds it from export_config alone (EdgeTAM: the timm config
        # transformers wrote, with its classifier-head keys, comes back as a TimmWrapperConfig).
        again = build_component("mask_decoder", {"name": name, **comp.export_config()}).eval()
        again.load_state_dict(comp.state_dict())
        px, _ = comp.preprocess(_image())
        with torch.no_grad():
            a = comp.decode(comp.encode_image(px[None]), _prompts(2, 32))
            b = again.decode(again.encode_image(px[None]), _prompts(2, 32))
        for x, y in zip(a, b):  # the same weights (a model from from_pretrained may run other kernels)
            torch.testing.assert_close(x, y, **TOL)


def test_edgetam_variant_is_repvit_m1():
    cfg = edgetam.edgetam_config(edgetam.VARIANTS["repvit_m1"])
    bb = cfg.vision_config.backbone_config
    assert type(bb).__name__ == "TimmWrapperConfig" and bb.architecture == "repvit_m1"
    assert bb.model_args["features_only"] is True
    assert cfg.vision_config.backbone_channel_list == [384, 192, 96, 48]
    assert cfg.mask_decoder_config.hidden_size == cfg.vision_config.fpn_hidden_size == 256


@pytest.mark.parametrize("backbone,match", [
    ({"archirecture": "repvit_m1"}, "must name the timm trunk"),  # transformers' own misspelling
    ({"architecture": "no_such_net"}, "is not a timm model"),
    (None, "backbone_config is missing"),
], ids=["misspelt", "unknown", "missing"])
def test_edgetam_backbone_must_be_named(backbone, match):
    vision = {k: v for k, v in edgetam.TINY_EDGETAM["vision_config"].items() if k != "backbone_config"}
    if backbone is not None:
        vision["backbone_config"] = backbone
    with pytest.raises(RecipeError, match=match):
        edgetam.build_edgetam(config={**edgetam.TINY_EDGETAM, "vision_config": vision})


def test_a_directory_of_another_model_is_refused(saved):
    """transformers only warns: a SAM2 directory would give EdgeTamModel a Hiera trunk (its
    weights fit), a SAM directory SAM-HQ without its HQ parts."""
    from lisa_kit.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"holds a 'sam2' model, not 'edgetam' or 'edgetam_video'"):
        edgetam.build_edgetam(pretrained=str(saved["sam2"]))
    with pytest.raises(CheckpointError, match=r"holds a 'sam' model, not 'sam_hq' \(SamHQModel\)"):
        sam_hq.build_sam_hq(pretrained=str(saved["hf_sam"]))


def test_bad_builds_are_typed():
    with pytest.raises(RecipeError, match="either"):
        sam_hq.build_sam_hq(pretrained="/x", config=sam_hq.TINY_SAM_HQ)
    with pytest.raises(RecipeError, match="unknown edgetam variant 'hiera_tiny'"):
        edgetam.build_edgetam(variant="hiera_tiny")
    with pytest.raises(RecipeError, match="prompt encoder's grid"):
        edgetam.build_edgetam(config={**edgetam.TINY_EDGETAM, "vision_config": {
            **edgetam.TINY_EDGETAM["vision_config"], "backbone_feature_sizes": [[32, 32], [16, 16], [8, 8]]}})


def test_edgetam_loads_from_a_video_model_directory(tmp_path):
    """EdgeTAM's published weights are an EdgeTamVideoModel directory: the image model's
    weights load from it, the memory modules are skipped."""
    import json

    from transformers import EdgeTamVideoConfig, EdgeTamVideoModel

    tiny = edgetam.TINY_EDGETAM
    torch.manual_seed(0)
    video = EdgeTamVideoModel(EdgeTamVideoConfig(
        vision_config=edgetam.edgetam_config(tiny).vision_config, prompt_encoder_config=tiny["prompt_encoder_config"],
        mask_decoder_config=tiny["mask_decoder_config"], image_size=64, memory_attention_hidden_size=32,
        memory_attention_mlp_hidden_size=64, memory_attention_num_layers=1, memory_attention_rope_feat_sizes=[4, 4],
        memory_attention_rope_k_sizes=[4, 4], perceiver_resampler_num_latents=4, perceiver_resampler_hidden_size=16,
        perceiver_resampler_mlp_intermediate_size=32, perceiver_resampler_attention_head_dim=8,
        perceiver_resampler_num_layers=1, memory_encoder_hidden_size=32, memory_encoder_output_channels=16,
        mask_downsampler_embed_dim=32, memory_fuser_intermediate_dim=64, memory_fuser_embed_dim=32))
    video.save_pretrained(tmp_path / "edgetam-video")
    assert json.loads((tmp_path / "edgetam-video" / "config.json").read_text())["model_type"] == "edgetam_video"
    comp = edgetam.build_edgetam(pretrained=str(tmp_path / "edgetam-video"))
    own, image = video.state_dict(), comp.model.state_dict()
    assert any(k.startswith("memory_") for k in set(own) - set(image))  # what was skipped
    for k, v in image.items():
        assert torch.equal(v, own[k]), k


@pytest.mark.parametrize("name", NEW)
def test_released_lisa_sam_weights_are_not_loaded(saved, name):
    """A released LISA checkpoint holds SAM's ViT decoder in Meta's layout: not loaded (warned);
    the component's own keys get the `model.` prefix."""
    comp, _ = _pair(saved, name)
    with pytest.warns(ForeignWeightsWarning, match="do not apply to"):
        assert comp.normalize_keys({"image_encoder.patch_embed.proj.weight": torch.zeros(1)}) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(comp.normalize_keys({"mask_decoder.iou_token.weight": torch.zeros(1)})) == [
            "model.mask_decoder.iou_token.weight"]


# -- the tiny recipes ----------------------------------------------------------------------------
@pytest.mark.parametrize("recipe,cls", [("lisa-tiny-sam-hq", "SamHQMaskDecoder"),
                                        ("lisa-tiny-edgetam", "EdgeTamMaskDecoder")])
def test_recipe_validates_and_segments(recipe, cls, monkeypatch):
    from lisa_kit.api import Segmenter
    from lisa_kit.recipes import load_recipe, validate_recipe
    from lisa_kit.testing import force_generation, synthetic_image

    assert validate_recipe(load_recipe(recipe)) == []
    seg = Segmenter.from_recipe(recipe)
    assert type(seg.model.mask_decoder).__name__ == cls
    force_generation(monkeypatch, {1: seg.model.seg_token_id, 2: seg.tokenizer.eos_id})
    img, _ = synthetic_image(37, 53, 0)
    r = seg.seg(img, "Can you segment the red circle in this image?")
    assert r.masks.shape == (1, 37, 53) and len(r.scores) == 1 and np.isfinite(r.scores).all()


def test_edgetam_recipe_trains(monkeypatch):
    """A few optimizer steps on one batch with LISA's trainable set (mask decoder, seg head,
    LLM): the loss goes down and the trunk stays frozen."""
    from lisa_kit.builder import load
    from lisa_kit.conversation import IMAGE, Conversation, get_template
    from lisa_kit.data import Sample, collate
    from lisa_kit.loss import lisa_loss
    from lisa_kit.testing import synthetic_image
    from lisa_kit.train.trainable import _decoder_part

    torch.manual_seed(0)
    model = load("lisa-tiny-edgetam").train()
    for p in model.parameters():
        p.requires_grad_(False)
    trained = [*_decoder_part(model.mask_decoder), *model.seg_head.parameters(), *model.llm.parameters()]
    for p in trained:
        p.requires_grad_(True)
    img, mask = synthetic_image(48, 64, 0)
    conv = Conversation(get_template("llava_v1")).add([IMAGE, "\nSegment the red square."], "Sure, [SEG].")
    batch = collate([Sample(img, [conv], mask[None])], model)
    opt = torch.optim.AdamW(trained, lr=3e-3)
    losses, mask_losses = [], []
    for _ in range(6):
        out = model(batch)
        parts = lisa_loss(out.logits, out.fused.labels, out.pred_masks, batch.gt_masks)
        opt.zero_grad()
        parts["loss"].backward()
        opt.step()
        losses.append(parts["loss"].item())
        mask_losses.append(parts["mask_loss"].item())
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses
    assert mask_losses[-1] < mask_losses[0], mask_losses  # the decoder learns, not only the LLM
    assert all(p.grad is None for p in model.mask_decoder.image_encoder.parameters())


def test_sam_hq_recipe_runs_under_lisa_kit_train(tmp_path):
    """`lisa-kit train` (LISA's trainable rule, data pipeline, checkpoint) on the SAM-HQ recipe:
    two steps, a finite loss each, and the trained decoder comes back from the run."""
    import json

    from lisa_kit.cli import main
    from lisa_kit.train.checkpointing import load_trained_model

    quick = ["train.warmup_steps=0", "train.batch_size=2", "train.grad_accumulation=1", "train.val=null",
             "train.workers=0", "train.steps=2", "data.samples_per_epoch=4", "data.sources.synthetic.options.size=8",
             "data.explanatory=-1"]
    run = tmp_path / "run"
    assert main(["train", "lisa-tiny-sam-hq", *quick, "--out", str(run), "--no-progress"]) == 0
    log = [json.loads(line) for line in (run / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
    model = load_trained_model(run)
    assert type(model.mask_decoder).__name__ == "SamHQMaskDecoder"
