"""`lisa-kit validate` rejects incompatible parts by their sizes, read from configs, not weights.

The builder derives projector and seg head ``in_dim``/``out_dim`` from the tower, the LLM
and the mask decoder; a recipe that writes one anyway must agree, and validation says so
naming both keys and both sizes before anything is built.
"""
from __future__ import annotations

import json

import pytest

import lisa_kit
from lisa_kit import builder, cli
from lisa_kit.components.hf_causal_lm import sizes_hf_causal_lm
from lisa_kit.components.hf_clip import sizes_hf_clip
from lisa_kit.components.open_clip_tower import TINY_OPEN_CLIP, TINY_SIGLIP, sizes_open_clip
from lisa_kit.components.sam import sizes_sam
from lisa_kit.components.timm_tower import TINY_TIMM_CONVNEXT, build_timm, sizes_timm
from lisa_kit.errors import RecipeError
from lisa_kit.interfaces import ComponentSpec
from lisa_kit.recipes import load_recipe, validate_recipe
from lisa_kit.registry import Registry

# lisa-tiny: CLIP hidden 32, LLaMA hidden 64, SAM prompt_embed_dim 32.
TOWER, LLM, PROMPT = 32, 64, 32


def validate(capsys, *args: str, recipe: str = "lisa-tiny") -> tuple[int, str]:
    code = cli.main(["validate", recipe, *(a for o in args for a in ("--set", o))])
    out, err = capsys.readouterr()
    return code, out + err


@pytest.mark.parametrize("override, expected", [
    ("model.projector.in_dim=48",
     f"model.projector.in_dim: in_dim=48 does not match feature_dim={TOWER} of model.vision_encoder (hf_clip)"),
    ("model.projector.out_dim=65",
     f"model.projector.out_dim: out_dim=65 does not match hidden_size={LLM} of model.llm (hf_causal_lm)"),
    ("model.seg_head.in_dim=63",
     f"model.seg_head.in_dim: in_dim=63 does not match hidden_size={LLM} of model.llm (hf_causal_lm)"),
    ("model.seg_head.out_dim=256",
     f"model.seg_head.out_dim: out_dim=256 does not match prompt_dim={PROMPT} of model.mask_decoder (sam)"),
])
def test_mismatch_names_both_keys_and_sizes(capsys, override, expected):
    code, out = validate(capsys, override)
    assert code == 1 and "FAIL" in out
    assert expected in out and f"override '{override}'" in out
    assert "leave model." in out  # says how to fix it


def test_sizes_that_agree_are_accepted(capsys):
    code, out = validate(capsys, f"model.projector.in_dim={TOWER}", f"model.projector.out_dim={LLM}",
                         f"model.seg_head.in_dim={LLM}", f"model.seg_head.out_dim={PROMPT}")
    assert code == 0, out
    # An interpolation is resolved before the comparison.
    assert validate(capsys, "model.projector.in_dim=${model.vision_encoder.config.hidden_size}")[0] == 0


def test_sizes_follow_the_producers_config(capsys):
    # The tower changed: the written in_dim no longer fits, and the message gives the new size.
    code, out = validate(capsys, "model.vision_encoder.config.hidden_size=48", f"model.projector.in_dim={TOWER}")
    assert code == 1 and f"in_dim={TOWER} does not match feature_dim=48" in out
    # A SAM variant's prompt size (256 for Meta's ViT-B) without any config.
    code, out = validate(capsys, "~model.mask_decoder.config", "model.mask_decoder.variant=vit_b",
                         f"model.seg_head.out_dim={PROMPT}")
    assert code == 1 and f"out_dim={PROMPT} does not match prompt_dim=256 of model.mask_decoder (sam)" in out


def test_load_rejects_before_building():
    with pytest.raises(RecipeError, match=f"in_dim=48 does not match feature_dim={TOWER}"):
        builder.load("lisa-tiny", ["model.projector.in_dim=48"])


def test_pretrained_directories_are_read_without_weights(tmp_path, capsys):
    clip = tmp_path / "clip"
    clip.mkdir()  # a whole CLIPModel directory: the tower's size is under vision_config
    (clip / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": {"hidden_size": 40}}))
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 80}))
    code, out = validate(capsys, f"model.vision_encoder={{name: hf_clip, pretrained: {clip}}}",
                         f"model.llm={{name: hf_causal_lm, pretrained: {llm}}}",
                         f"model.projector.in_dim={TOWER}", f"model.seg_head.in_dim={LLM}")
    assert code == 1
    assert f"in_dim={TOWER} does not match feature_dim=40" in out
    assert f"in_dim={LLM} does not match hidden_size=80" in out
    # A directory that is not there yet: sizes unknown, nothing reported about them.
    code, out = validate(capsys, f"model.vision_encoder={{name: hf_clip, pretrained: {tmp_path / 'nowhere'}}}",
                         "model.projector.in_dim=48")
    assert code == 0, out


def test_builtin_sizes_functions():
    assert sizes_sam("vit_h") == {"prompt_dim": 256}
    assert sizes_sam("custom", {**lisa_kit.components.sam.TINY_SAM, "prompt_embed_dim": 24}) == {"prompt_dim": 24}
    assert sizes_hf_clip() == {} and sizes_hf_causal_lm() == {}
    # Not written: transformers' own default / field name (GPT-2 calls it n_embd).
    assert sizes_hf_clip(config={"image_size": 56}) == {"feature_dim": 768}
    assert sizes_hf_causal_lm(config={"model_type": "gpt2", "n_embd": 48, "n_head": 4}) == {"hidden_size": 48}


# -- the other towers and mask decoders: the tiny variant recipes -----------------------
try:
    import lisa_kit_sam2  # noqa: F401 - the plugin distribution plugins/lisa-kit-sam2
except ImportError:
    HAS_SAM2 = False
else:
    HAS_SAM2 = True
_needs_sam2 = pytest.mark.skipif(not HAS_SAM2, reason="the lisa-kit-sam2 plugin (plugins/lisa-kit-sam2) is not installed")

# (recipe, consumer key, producer, size name, the producer's size in that recipe)
VARIANTS = [
    pytest.param("lisa-tiny-openclip", "model.projector.in_dim", "open_clip", "feature_dim", 32, id="open_clip"),
    pytest.param("lisa-tiny-siglip", "model.projector.in_dim", "open_clip_siglip", "feature_dim", 48,
                 id="open_clip_siglip"),
    pytest.param("lisa-tiny-timm-vit", "model.projector.in_dim", "timm", "feature_dim", 32, id="timm"),
    pytest.param("lisa-tiny-sam2", "model.seg_head.out_dim", "sam2", "prompt_dim", 32, id="sam2",
                 marks=_needs_sam2),
    pytest.param("lisa-tiny-hf-sam", "model.seg_head.out_dim", "hf_sam", "prompt_dim", 32, id="hf_sam",
                 marks=_needs_sam2),
    pytest.param("lisa-tiny-sam3", "model.seg_head.out_dim", "sam3", "prompt_dim", 32, id="sam3",
                 marks=_needs_sam2),
]


@pytest.mark.parametrize("recipe, key, producer, size, given", VARIANTS)
def test_variant_mismatch_names_both_sizes(capsys, recipe, key, producer, size, given):
    wrong = given + 16
    code, out = validate(capsys, f"{key}={wrong}", recipe=recipe)
    arg, kind = key.rsplit(".", 1)[1], "vision_encoder" if size == "feature_dim" else "mask_decoder"
    assert code == 1 and "FAIL" in out
    assert f"{key}: {arg}={wrong} does not match {size}={given} of model.{kind} ({producer})" in out, out


@pytest.mark.parametrize("recipe, key, producer, size, given", VARIANTS)
def test_variant_right_size_is_accepted(capsys, recipe, key, producer, size, given):
    code, out = validate(capsys, f"{key}={given}", recipe=recipe)
    assert code == 0, out


def test_timm_cnn_size_is_the_selected_stages(capsys):
    # lisa-tiny-timm-convnext: stage channels 8, 16, 24, 32; the last stage by default.
    code, out = validate(capsys, "model.vision_encoder.select_layer=3", "model.projector.in_dim=32",
                         recipe="lisa-tiny-timm-convnext")
    assert code == 1 and "in_dim=32 does not match feature_dim=24 of model.vision_encoder (timm)" in out, out
    tower = build_timm(**TINY_TIMM_CONVNEXT, select_layer=3)
    assert sizes_timm(**TINY_TIMM_CONVNEXT, select_layer=3) == {"feature_dim": tower.feature_dim} == {
        "feature_dim": 24}


def test_tower_sizes_without_weights(tmp_path):
    # Full-size towers by name: configs (and timm architectures on the meta device) only.
    junk = tmp_path / "weights.safetensors"
    junk.write_bytes(b"not a weights file")  # never opened: reading it would fail
    assert sizes_open_clip(model_name="ViT-L-14-336", pretrained=str(junk)) == {"feature_dim": 1024}
    assert sizes_open_clip(model_name="ViT-SO400M-14-SigLIP-384", pretrained=str(junk)) == {"feature_dim": 1152}
    assert sizes_timm("vit_large_patch14_clip_336.openai", pretrained=str(junk)) == {"feature_dim": 1024}
    # Tiny configs: the native ViT's width, the shrunk timm trunk's embed_dim.
    assert sizes_open_clip(config=TINY_OPEN_CLIP) == sizes_open_clip(config=TINY_SIGLIP) == {"feature_dim": 32}
    # Unknown: what the build refuses (it says why), and CNN towers open_clip cannot take tokens from.
    assert sizes_open_clip() == sizes_open_clip(model_name="ViT-B-16", config=TINY_OPEN_CLIP) == {}
    assert sizes_open_clip(model_name="no-such-model") == sizes_open_clip(model_name="RN50") == {}
    assert sizes_timm("hf-hub:timm/vit_base_patch16_clip_224.openai") == {}


@_needs_sam2
def test_sam2_plugin_sizes_read_config_json_only(tmp_path):
    from lisa_kit_sam2.hf_sam import sizes_hf_sam
    from lisa_kit_sam2.sam2 import sizes_sam2

    d = tmp_path / "sam2"
    d.mkdir()  # a config.json and a weights file that is never read
    (d / "config.json").write_text(json.dumps({"model_type": "sam2", "mask_decoder_config": {"hidden_size": 40}}))
    (d / "model.safetensors").write_bytes(b"not a weights file")
    assert sizes_sam2(pretrained=str(d)) == sizes_hf_sam(pretrained=str(d)) == {"prompt_dim": 40}
    assert sizes_sam2(variant="hiera_large") == sizes_hf_sam(variant="vit_b") == {"prompt_dim": 256}
    # Unknown: no directory yet, an unknown variant, nothing given.
    assert sizes_sam2(pretrained=str(tmp_path / "nowhere")) == sizes_sam2(variant="hiera_huge") == {}
    assert sizes_hf_sam() == {}


# -- components without `sizes`, or with a broken one -----------------------------------
def build_any(in_dim: int = 0, out_dim: int = 0, width: int = 8):
    return None


def _registry(tower_sizes) -> Registry:
    class Plugin:
        @lisa_kit.hookimpl
        def lisa_kit_components(self):
            kinds = ("projector", "llm", "mask_decoder", "fusion", "seg_head")
            return [ComponentSpec("vision_encoder", "tower", build_any, sizes=tower_sizes),
                    *(ComponentSpec(k, "x", build_any, derived=("in_dim", "out_dim")) for k in kinds)]

    reg = Registry.empty()
    reg.register(Plugin(), "p")
    return reg


RECIPE = {"model": {"vision_encoder": {"name": "tower", "width": 16}, "projector": {"name": "x", "in_dim": 8},
                    **{k: {"name": "x"} for k in ("llm", "mask_decoder", "fusion")},
                    "seg_head": {"name": "x", "out_dim": 3}}}


def test_without_sizes_the_check_is_skipped():
    assert validate_recipe(load_recipe(RECIPE), _registry(None)) == []
    problems = validate_recipe(load_recipe(RECIPE), _registry(lambda width=8, **_: {"feature_dim": width}))
    (problem,) = problems
    assert "model.projector.in_dim: in_dim=8 does not match feature_dim=16 of model.vision_encoder (tower)" in problem


def test_a_failing_sizes_function_is_reported():
    def sizes(width=8, **_):
        raise ValueError(f"width {width} is not a multiple of 3")

    (problem,) = validate_recipe(load_recipe(RECIPE), _registry(sizes))
    assert "model.vision_encoder: cannot tell the sizes of vision_encoder 'tower': ValueError: width 16" in problem


def test_values_still_missing_are_not_sized():
    recipe = load_recipe(RECIPE, ["model.vision_encoder.width=???"])
    assert validate_recipe(recipe, _registry(lambda width=8, **_: {"feature_dim": width}), allow_missing=True) == []


# -- checkpoints supply parts: their config.json is read -------------------------------
@pytest.fixture
def lisa_dir(tmp_path):
    """A released-LISA-like directory with only config files (no weights, no tokenizer)."""
    tower = tmp_path / "clip"
    tower.mkdir()
    (tower / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", "hidden_size": TOWER}))
    ckpt = tmp_path / "lisa"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({
        "model_type": "llava", "hidden_size": 80, "out_dim": 256, "mm_vision_tower": str(tower),
        "architectures": ["LISAForCausalLM"]}))
    return ckpt


def test_lisa_hf_checkpoint_sizes(lisa_dir, capsys):
    # The checkpoint's seg head gives out_dim 256 (its config.json) but the tiny SAM takes 32;
    # its LLM is 80 wide where the recipe wrote 64.
    code, out = validate(capsys, f"weights={{format: lisa_hf, path: {lisa_dir}}}", f"model.seg_head.in_dim={LLM}")
    assert code == 1
    assert f"out_dim=256 (from the checkpoint at weights.path) does not match prompt_dim={PROMPT}" in out
    assert f"in_dim={LLM} does not match hidden_size=80 of model.llm (hf_causal_lm, from weights.path)" in out


def test_checkpoint_not_there_checks_the_recipes_own_parts(tmp_path, capsys):
    weights = f"weights={{format: lisa_hf, path: {tmp_path / 'not_yet'}}}"
    # The LLM comes from the checkpoint: unknown, so no complaint about its size ...
    assert validate(capsys, weights, "model.projector.out_dim=65")[0] == 0
    # ... while the recipe's own tower is still checked.
    code, out = validate(capsys, weights, "model.projector.in_dim=48")
    assert code == 1 and f"feature_dim={TOWER}" in out
    # lisa_kit's own format carries its recipe: the model section here is not what is built.
    assert validate(capsys, f"weights={{format: lisa_kit, path: {tmp_path}}}", "model.projector.in_dim=48")[0] == 0
