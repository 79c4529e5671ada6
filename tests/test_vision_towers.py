"""open_clip and timm vision towers: pixels equal the libraries' own transforms, tokens
equal an independent computation through the libraries' modules, weights files load,
hub tags are refused, and export_config rebuilds the same tower. Tiny random towers, CPU."""
from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import timm
import torch
from PIL import Image

from lisa_kit.checkpoint.io import save_safetensors
from lisa_kit.components.open_clip_tower import TINY_OPEN_CLIP, TINY_SIGLIP, build_open_clip, build_open_clip_siglip
from lisa_kit.components.timm_tower import TINY_TIMM_CONVNEXT, TINY_TIMM_VIT, build_timm
from lisa_kit.errors import CheckpointError, RecipeError

# Sizes around the towers' 48-64 px inputs: larger, smaller (padding), odd, square.
SIZES = [(37, 53), (60, 40), (20, 31), (56, 56), (97, 64)]


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _same(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def tiny_clip_name(tmp_path_factory):
    """The tiny CLIP config registered with open_clip (with a tiny text tower, which open_clip's
    model configs require), so open_clip's own create_model_and_transforms can build it."""
    d = tmp_path_factory.mktemp("open_clip_cfg")
    cfg = {**TINY_OPEN_CLIP, "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2,
                                          "layers": 1}}
    (d / "lisa-kit-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d)
    return "lisa-kit-tiny-clip"


# -- open_clip ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["shortest", "squash", "longest"])
def test_open_clip_preprocess_equals_open_clip_transform(mode):
    from open_clip.transform import PreprocessCfg, image_transform_v2

    tower = build_open_clip(config=TINY_OPEN_CLIP, preprocess={"resize_mode": mode, "fill_color": 7})
    ref = image_transform_v2(PreprocessCfg(**tower.preprocess_cfg), is_train=False)
    for i, (h, w) in enumerate(SIZES):
        img = _image(h, w, i)
        _same(tower.preprocess(img), ref(Image.fromarray(img)))


def test_open_clip_named_model_file_and_transform(tiny_clip_name, tmp_path):
    """model_name + pretrained FILE goes through open_clip.create_model; pixels equal
    create_model_and_transforms' eval transform, tokens equal the tower's modules run by hand."""
    torch.manual_seed(0)
    model, _, val = open_clip.create_model_and_transforms(tiny_clip_name)
    f = tmp_path / "open_clip_model.safetensors"
    save_safetensors(model.state_dict(), f)
    tower = build_open_clip(model_name=tiny_clip_name, pretrained=str(f))
    imgs = [_image(h, w, i) for i, (h, w) in enumerate(SIZES[:3])]
    px = torch.stack([tower.preprocess(im) for im in imgs])
    _same(px, torch.stack([val(Image.fromarray(im)) for im in imgs]))

    v = model.visual.eval()
    with torch.no_grad():
        out = tower(px)
        x = v.conv1(px).flatten(2).transpose(1, 2)  # (I, N, W) patch embeddings
        x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], 1) + v.positional_embedding
        x = v.ln_pre(x)
        for blk in v.transformer.resblocks[:-1]:  # select_layer -2: every block but the last
            x = blk(x)
    assert out.shape == (3, tower.num_tokens, tower.feature_dim) == (3, 16, 32)
    _same(out, x[:, 1:])  # the CLS token dropped


def test_open_clip_config_with_weights_file(tmp_path):
    torch.manual_seed(0)
    src = build_open_clip(config=TINY_OPEN_CLIP)
    f = tmp_path / "whole_model.safetensors"  # an open_clip model's keys: the tower under `visual.`
    save_safetensors({f"visual.{k}": v for k, v in src.visual.state_dict().items()}, f)
    torch.manual_seed(1)
    loaded = build_open_clip(config=TINY_OPEN_CLIP, pretrained=str(f))
    px = loaded.preprocess(_image(40, 50))[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(px), src(px), atol=0, rtol=0)


def test_siglip_tower_has_no_prefix_token():
    tower = build_open_clip_siglip(config=TINY_SIGLIP, select_layer=-1, norm=True)
    trunk = tower.visual.trunk
    assert trunk.num_prefix_tokens == 0 and tower.num_tokens == 16 and tower.feature_dim == 32
    assert tower.preprocess_cfg["resize_mode"] == "squash" and tower.preprocess_cfg["mean"] == [0.5] * 3
    px = torch.stack([tower.preprocess(_image(h, w, i)) for i, (h, w) in enumerate(SIZES[:2])])
    with torch.no_grad():  # last block + final norm: every token of timm's forward_features
        _same(tower(px), trunk.forward_features(px))


def test_open_clip_refuses_hub_tags_and_unknown_tags():
    with pytest.raises(CheckpointError, match="never downloads"):
        build_open_clip(model_name="ViT-L-14", pretrained="openai")
    with pytest.raises(CheckpointError, match="not found"):
        build_open_clip(model_name="ViT-L-14", pretrained="/nonexistent/open_clip_model.safetensors")
    with pytest.raises(RecipeError, match="openai"):  # the message lists the model's tags
        build_open_clip(model_name="ViT-L-14-336", tag="nonsense")
    with pytest.raises(RecipeError, match="never downloads"):
        build_open_clip(model_name="hf-hub:timm/ViT-SO400M-14-SigLIP-384")
    with pytest.raises(RecipeError, match="exactly one"):
        build_open_clip()
    with pytest.raises(RecipeError, match="select_layer"):
        build_open_clip(config=TINY_OPEN_CLIP, select_layer=-3)


# -- timm -----------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [TINY_TIMM_VIT, TINY_TIMM_CONVNEXT], ids=["vit", "convnext"])
@pytest.mark.parametrize("crop", [{}, {"crop_mode": "squash", "crop_pct": 0.9},
                                  {"crop_mode": "border", "crop_pct": 1.0, "interpolation": "bilinear"}],
                         ids=["center", "squash", "border"])
def test_timm_preprocess_equals_timm_transform(spec, crop):
    from timm.data import create_transform

    tower = build_timm(**spec, data_config=crop)
    ref = create_transform(**tower.data_config, is_training=False)
    for i, (h, w) in enumerate(SIZES):
        img = _image(h, w, i)
        _same(tower.preprocess(img), ref(Image.fromarray(img)))


def test_timm_vit_drops_every_prefix_token():
    """DINOv2 with 4 registers: 5 prefix tokens; the last block + norm equals timm's
    forward_features without them."""
    tower = build_timm("vit_small_patch14_reg4_dinov2", model_kwargs={"img_size": 56, "embed_dim": 32, "depth": 2,
                                                                      "num_heads": 2}, select_layer=-1, norm=True)
    assert tower.model.num_prefix_tokens == 5 and tower.num_tokens == 16
    px = tower.preprocess(_image(50, 70))[None]
    with torch.no_grad():
        _same(tower(px), tower.model.forward_features(px)[:, 5:])
    assert build_timm("vit_small_patch14_reg4_dinov2", model_kwargs={"img_size": 56, "embed_dim": 32, "depth": 2,
                                                                     "num_heads": 2}).select_layer == -2


def test_timm_convnext_last_stage_as_tokens():
    tower = build_timm(**TINY_TIMM_CONVNEXT)
    assert (tower.num_tokens, tower.feature_dim, tower.select_layer) == (4, 32, -1)
    px = torch.stack([tower.preprocess(_image(h, w, i)) for i, (h, w) in enumerate(SIZES[:2])])
    with torch.no_grad():
        fmap = tower.model.forward_features(px)  # (I, C, 2, 2), row-major flattening
        _same(tower(px), fmap.flatten(2).transpose(1, 2))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_weights_file_loads_without_the_classifier(tmp_path, suffix):
    torch.manual_seed(0)
    src = timm.create_model(TINY_TIMM_CONVNEXT["model_name"], pretrained=False, num_classes=5,
                            **TINY_TIMM_CONVNEXT["model_kwargs"])
    f = tmp_path / f"model{suffix}"
    if suffix == ".pth":
        torch.save(src.state_dict(), f)
    else:
        save_safetensors(src.state_dict(), f)
    tower = build_timm(**TINY_TIMM_CONVNEXT, pretrained=str(f))
    px = tower.preprocess(_image(64, 64))[None]
    with torch.no_grad():
        _same(tower(px), src.forward_features(px).flatten(2).transpose(1, 2), atol=0)


def test_timm_refuses_downloads_and_bad_files(tmp_path):
    with pytest.raises(RecipeError, match="never downloads"):
        build_timm("hf-hub:timm/vit_base_patch16_clip_224.openai")
    with pytest.raises(CheckpointError, match="not found"):
        build_timm(**TINY_TIMM_CONVNEXT, pretrained=str(tmp_path / "missing.safetensors"))
    bad = tmp_path / "other.safetensors"
    save_safetensors({"stem.0.weight": torch.zeros(3, 3, 4, 4)}, bad)
    with pytest.raises(CheckpointError, match="stem.0.weight"):  # shape mismatch names the key
        build_timm(**TINY_TIMM_CONVNEXT, pretrained=str(bad))
    with pytest.raises(RecipeError, match="img_size"):  # a ViT's input size is fixed by its position table
        build_timm(**TINY_TIMM_VIT, image_size=64)


# -- every new tower: export_config rebuilds it ----------------------------------------
@pytest.mark.parametrize("build,kwargs", [
    (build_open_clip, {"config": TINY_OPEN_CLIP}),
    (build_open_clip_siglip, {"config": TINY_SIGLIP}),
    (build_timm, TINY_TIMM_VIT),
    (build_timm, TINY_TIMM_CONVNEXT),
], ids=["open_clip", "open_clip_siglip", "timm_vit", "timm_convnext"])
def test_export_config_rebuilds_the_same_tower(build, kwargs):
    torch.manual_seed(0)
    a = build(**kwargs)
    torch.manual_seed(1)
    b = build(**json.loads(json.dumps(a.export_config())))  # plain YAML-able data
    b.load_state_dict(a.state_dict(), strict=True)
    img = _image(45, 61)
    _same(a.preprocess(img), b.preprocess(img), atol=0)
    with torch.no_grad():
        px = a.preprocess(img)[None]
        torch.testing.assert_close(a(px), b(px), atol=0, rtol=0)
    assert (a.num_tokens, a.feature_dim) == (b.num_tokens, b.feature_dim)
