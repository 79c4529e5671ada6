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
from lisa_kit.components.sam import sizes_sam
from lisa_kit.errors import RecipeError
from lisa_kit.interfaces import ComponentSpec
from lisa_kit.recipes import load_recipe, validate_recipe
from lisa_kit.registry import Registry

# lisa-tiny: CLIP hidden 32, LLaMA hidden 64, SAM prompt_embed_dim 32.
TOWER, LLM, PROMPT = 32, 64, 32


def validate(capsys, *args: str) -> tuple[int, str]:
    code = cli.main(["validate", "lisa-tiny", *(a for o in args for a in ("--set", o))])
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
