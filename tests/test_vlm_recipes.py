"""The VLM-base recipes: the full-size sa2va-style ones validate with their downloads named;
the tiny Qwen2.5-VL one builds, segments, trains on the synthetic set with its loss
falling, and survives a lisa_kit export and reload with identical outputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lisa_kit.recipes import load_recipe, missing_keys, validate_recipe
from lisa_kit.testing import force_generation, synthetic_image

TINY = "lisa-tiny-qwen2.5vl"


@pytest.mark.parametrize("name", ["sa2va-qwen2.5vl-7b", "sa2va-internvl3-8b"])
def test_full_size_recipe_validates_and_names_its_downloads(name):
    recipe = load_recipe(name)
    assert validate_recipe(recipe, allow_missing=True) == []
    assert {"model.vision_encoder.pretrained", "model.llm.pretrained", "model.fusion.pretrained",
            "model.mask_decoder.pretrained"} <= set(missing_keys(recipe))


def test_tiny_recipe_segments_with_image_sized_masks(monkeypatch):
    from lisa_kit.api import Segmenter

    seg = Segmenter.from_recipe(TINY)
    force_generation(monkeypatch, lambda m: {0: m.seg_token_id, 1: m.tokenizer.eos_id})
    img, _ = synthetic_image(45, 70, 3)
    r = seg.seg(img, "Segment the red square.")
    assert r.token_ids == [seg.model.seg_token_id, seg.tokenizer.eos_id]
    assert r.masks.shape == (1, 45, 70)
    # Budgets count the image's own number of visual tokens (dynamic resolution).
    enc = seg.model.vision_encoder
    assert seg._image_tokens((45, 70)) == enc.tokens_for((45, 70)) != enc.tokens_for((200, 200))


@pytest.fixture
def trained(tmp_path, one_thread):
    """A few training steps of the tiny VLM recipe on the synthetic shapes."""
    import yaml
    from omegaconf import OmegaConf

    from lisa_kit.train.loop import Trainer

    # lisa-tiny-synthetic's data and training settings with the tiny VLM's components.
    vlm = OmegaConf.to_container(load_recipe(TINY).cfg.model)
    recipe = tmp_path / "vlm-train.yaml"
    recipe.write_text(yaml.safe_dump({
        "base": "lisa-tiny-synthetic", "name": "vlm-train", "conversation": {"template": "chat"},
        "model": {k: vlm[k] for k in ("vision_encoder", "projector", "llm", "fusion")}}))
    overrides = ["train.steps=16", "train.warmup_steps=2", "train.batch_size=2", "train.val=null",
                 "train.save_every=0", "train.val_every=0", "data.samples_per_epoch=4",
                 "data.sources.synthetic.options.size=4", "train.max_length=128"]
    tr = Trainer(str(recipe), tmp_path / "run", overrides=overrides, progress=False)
    tr.fit()
    log = [json.loads(line) for line in (tmp_path / "run" / "train.jsonl").read_text().splitlines()]
    return tr, log


def test_tiny_recipe_trains_exports_and_reloads(trained, tmp_path):
    from lisa_kit.checkpoint.native import load_model, save_model
    from lisa_kit.train.lora import merge_lora

    tr, log = trained
    first, last = np.mean([r["loss"] for r in log[:4]]), np.mean([r["loss"] for r in log[-4:]])
    assert len(log) == 16 and last < 0.8 * first, (first, last)

    model = merge_lora(tr.model).eval()  # as `lisa-kit export` of a training run does
    save_model(model, tmp_path / "export")
    again = load_model(tmp_path / "export").eval()
    _assert_same_outputs(model, again)


def test_bad_inputs_are_typed_errors(tmp_path):
    from lisa_kit.components import hf_vlm
    from lisa_kit.errors import CheckpointError, RecipeError
    from lisa_kit.testing import tiny_hf_tokenizer_dir, tiny_vlm_dir

    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match="not a VLM family"):  # a directory of another model
        hf_vlm.build_hf_vlm_fusion(pretrained=str(tmp_path))
    with pytest.raises(CheckpointError):  # no config.json at all
        hf_vlm.build_hf_vlm_fusion(pretrained=str(tiny_hf_tokenizer_dir()))
    with pytest.raises(RecipeError, match="model_type"):
        hf_vlm.build_hf_vlm_fusion(config={"model_type": "llama"})
    with pytest.raises(RecipeError, match="above max_pixels"):
        hf_vlm.build_hf_vlm_vision(pretrained=str(tiny_vlm_dir("qwen2_5_vl")), min_pixels=10_000, max_pixels=5_000)
    with pytest.raises(RecipeError, match="fixed-size tiles"):
        hf_vlm.build_hf_vlm_vision(pretrained=str(tiny_vlm_dir("internvl")), max_pixels=5_000)
    with pytest.raises(RecipeError, match="feature_dim"):
        hf_vlm.build_identity(32, 64)


@pytest.mark.parametrize("family", ["qwen3_vl", "internvl", "llava_onevision"])
def test_other_families_export_and_reload(family, tmp_path):
    """The tiny recipe on each other family: a lisa_kit export (components rebuilt from their
    export_config: VLM config, image processor, tokenizer) reloads with identical outputs."""
    from lisa_kit.builder import load
    from lisa_kit.checkpoint.native import load_model, save_model

    torch.manual_seed(0)
    model = load(TINY, [f"model.{k}.pretrained='@tiny_vlm:{family}'" for k in ("vision_encoder", "llm", "fusion")])
    save_model(model.eval(), tmp_path / "export")
    again = load_model(tmp_path / "export").eval()
    assert again.llm.model.config.model_type == family
    _assert_same_outputs(model, again)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "internvl", "llava_onevision"])
def test_every_family_gives_a_trainable_seg_loss(family):
    """Teacher-forced [SEG] answer on each family: finite CE and mask losses whose gradient
    reaches the seg head and the LM (through the image positions and M-RoPE/deepstack)."""
    from lisa_kit.builder import load
    from lisa_kit.conversation import IMAGE, Conversation, get_template
    from lisa_kit.data import Sample, collate
    from lisa_kit.loss import lisa_loss

    torch.manual_seed(0)
    model = load(TINY, [f"model.{k}.pretrained='@tiny_vlm:{family}'" for k in ("vision_encoder", "llm", "fusion")])
    img, mask = synthetic_image(50, 60, 2)
    conv = Conversation(get_template("chat", model.tokenizer)).add([IMAGE, "\nSegment the red square."],
                                                                    "Sure, [SEG].")
    batch = collate([Sample(img, [conv], mask[None])], model)
    out = model(batch)
    losses = lisa_loss(out.logits, out.fused.labels, out.pred_masks, batch.gt_masks)
    assert torch.isfinite(losses["loss"]) and losses["ce_loss"] > 0 and losses["mask_loss"] > 0
    losses["loss"].backward()
    assert model.seg_head.layers[0].weight.grad.abs().sum() > 0
    assert model.llm.model.get_input_embeddings().weight.grad.abs().sum() > 0


def test_fixed_resize_sets_the_frame_the_llm_sees():
    """``vision_encoder.resize`` (Seg-Zero's 840 x 840): every image is resized to that
    frame before the processor, so its token count is the frame's, whatever the image's
    size; it survives export, and a malformed value is a recipe error."""
    from PIL import Image

    from lisa_kit.components.hf_vlm import build_hf_vlm_vision
    from lisa_kit.errors import RecipeError
    from lisa_kit.testing import tiny_vlm_dir

    path = str(tiny_vlm_dir("qwen2_5_vl"))
    plain, fixed = build_hf_vlm_vision(path), build_hf_vlm_vision(path, resize=[112, 56])
    small, tall = synthetic_image(30, 40, 0)[0], synthetic_image(150, 60, 1)[0]
    want = plain.tokens_for((112, 56))
    assert plain.tokens_for((30, 40)) != want  # the frame matters at this size
    for img in (small, tall):
        grid = fixed.preprocess(img)["image_grid_thw"]
        assert fixed.tokens_for(img.shape[:2]) == want == int(grid.prod()) // fixed.merge_size ** 2
    resized = np.array(Image.fromarray(small).resize((56, 112), Image.BILINEAR))
    torch.testing.assert_close(fixed.preprocess(small)["pixel_values"], plain.preprocess(resized)["pixel_values"])
    again = build_hf_vlm_vision(**{k: v for k, v in fixed.export_config().items()})
    assert again.resize == (112, 56)
    for bad in ([840], [0, 840], "840x840", [840.0, 840]):
        with pytest.raises(RecipeError, match="resize"):
            build_hf_vlm_vision(path, resize=bad)


def _assert_same_outputs(model, again):
    """``model`` and its exported-and-reloaded copy give identical logits and masks on one
    chat-template sample with an image and a [SEG] answer."""
    from lisa_kit.conversation import IMAGE, Conversation, get_template
    from lisa_kit.data import Sample, collate

    img, mask = synthetic_image(50, 60, 1)
    conv = Conversation(get_template("chat", model.tokenizer)).add([IMAGE, "\nSegment the red square."],
                                                                    "Sure, [SEG].")
    with torch.no_grad():
        a = model(collate([Sample(img, [conv], mask[None])], model))
        b = again(collate([Sample(img, [conv], mask[None])], again))
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    torch.testing.assert_close(a.pred_masks[0], b.pred_masks[0], atol=0, rtol=0)
