"""Recipes: base chains, the merge rule, overrides, validation against fake components."""
from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Literal

import pytest
from omegaconf import DictConfig, OmegaConf

import lisa_kit
from lisa_kit import recipes
from lisa_kit import registry as registry_module
from lisa_kit.errors import RecipeError
from lisa_kit.interfaces import ComponentSpec
from lisa_kit.recipes import (
    Recipe,
    check_recipe,
    find_recipe,
    load_recipe,
    missing_keys,
    recipe_dirs,
    resolved_yaml,
    validate_recipe,
)
from lisa_kit.registry import Registry


# -- fake components (annotations are strings here: from __future__ import annotations) --
class Custom:
    pass


def build_clip(pretrained: str | None = None, select_layer: int = -2, image_size: int | None = None,
               mean: list[float] | None = None, crop: tuple[int, int] = (224, 224), custom: Custom | None = None):
    return None


def build_linear(in_dim: int, out_dim: int):
    return None


def build_mlp(in_dim: int, out_dim: int, depth: int = 2, mode: Literal["gelu", "relu"] = "gelu"):
    return None


def build_llm(pretrained: str, dtype: str = "float32", extra: dict[str, int] | None = None):
    return None


def build_any_llm(**kwargs):
    return None


class SamBuilder:
    def __init__(self, variant: str = "vit_h", checkpoint: str | None = None, config: dict | None = None):
        pass


def build_splice(use_im_start_end: bool = True):
    return None


def build_head(in_dim: int, out_dim: int, dropout: float = 0.0):
    return None


class FakeComponents:
    @lisa_kit.hookimpl
    def lisa_kit_components(self):
        return [
            ComponentSpec("vision_encoder", "clip", build_clip),
            ComponentSpec("projector", "linear", build_linear, derived=("in_dim", "out_dim")),
            ComponentSpec("projector", "mlp", build_mlp, derived=("in_dim", "out_dim")),
            ComponentSpec("llm", "causal_lm", build_llm),
            ComponentSpec("llm", "any_llm", build_any_llm),
            ComponentSpec("mask_decoder", "sam", SamBuilder),
            ComponentSpec("fusion", "splice", build_splice),
            ComponentSpec("seg_head", "mlp2", build_head, derived=("in_dim", "out_dim")),
        ]


@pytest.fixture
def reg() -> Registry:
    registry = Registry.empty()
    registry.register(FakeComponents(), "fake", distribution="fake-dist", version="1.0")
    return registry


TINY = """
name: tiny
description: tiny test recipe
model:
  vision_encoder: {name: clip, pretrained: /enc, select_layer: -2}
  projector: {name: mlp, depth: 3}
  llm: {name: causal_lm, pretrained: /llm}
  mask_decoder: {name: sam, variant: vit_b, checkpoint: /sam.pth}
  fusion: {name: splice, use_im_start_end: true}
  seg_head: {name: mlp2, dropout: 0.0}
  seg_token: "[SEG]"
  seg_hidden: previous
loss: {ce_weight: 1.0, bce_weight: 2.0, dice_weight: 0.5}
generation: {max_new_tokens: 512}
eval: {datasets: [a, b]}  # a free-form section: list merging below
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def tiny(tmp_path) -> Path:
    return write(tmp_path, "tiny.yaml", TINY)


def only(problems: list[str], needle: str) -> str:
    matches = [p for p in problems if needle in p]
    assert len(matches) == 1, problems
    return matches[0]


# -- finding --------------------------------------------------------------------
def test_recipe_dirs_env_first_then_repository(monkeypatch, tmp_path):
    monkeypatch.setenv(recipes.RECIPE_PATH_ENV, f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}")
    dirs = recipe_dirs()
    assert dirs[:2] == [tmp_path / "a", tmp_path / "b"]
    assert dirs[-1] == Path(lisa_kit.__file__).resolve().parent.parent / "recipes"


def test_find_recipe_by_path_and_name(monkeypatch, tmp_path, tiny):
    assert find_recipe(tiny) == tiny
    monkeypatch.setenv(recipes.RECIPE_PATH_ENV, str(tmp_path))
    assert find_recipe("tiny") == tiny
    assert find_recipe("tiny.yaml") == tiny
    with pytest.raises(RecipeError, match=r"recipe 'nope' not found; available recipes: .*tiny"):
        find_recipe("nope")


def test_earlier_recipe_dir_wins(monkeypatch, tmp_path):
    first = write(tmp_path / "one", "r.yaml", "name: one\n")
    write(tmp_path / "two", "r.yaml", "name: two\n")
    monkeypatch.setenv(recipes.RECIPE_PATH_ENV, f"{tmp_path / 'one'}{os.pathsep}{tmp_path / 'two'}")
    assert find_recipe("r") == first
    assert recipes.list_recipes()["r"] == first


# -- loading and inheritance ---------------------------------------------------------
def test_load_plain_recipe(tiny):
    recipe = load_recipe(tiny)
    assert isinstance(recipe.cfg, DictConfig) and recipe.path == tiny and recipe.files == (tiny,)
    assert recipe.cfg.model.projector.depth == 3
    assert recipe.source_of("model.projector.depth") == str(tiny)
    assert recipe.source_of("no.such.key") == str(tiny)


def test_three_level_base_chain(tmp_path, tiny):
    middle = write(tmp_path, "sub/middle.yaml", """
        base: ../tiny.yaml
        name: middle
        model:
          vision_encoder: {select_layer: -1}
          llm: {name: causal_lm, dtype: bfloat16}
        loss: {ce_weight: 3.0}
        eval: {datasets: [c]}
        """)
    child = write(tmp_path, "sub/child.yaml", """
        base: middle
        name: child
        model:
          mask_decoder: {variant: vit_l}
        generation: {max_new_tokens: 64}
        """)
    recipe = load_recipe(child)
    cfg = recipe.cfg
    assert "base" not in cfg
    assert cfg.name == "child" and cfg.description == "tiny test recipe"
    assert cfg.model.vision_encoder == {"name": "clip", "pretrained": "/enc", "select_layer": -1}
    assert cfg.model.llm == {"name": "causal_lm", "pretrained": "/llm", "dtype": "bfloat16"}
    assert cfg.model.mask_decoder.variant == "vit_l" and cfg.model.mask_decoder.checkpoint == "/sam.pth"
    assert cfg.loss == {"ce_weight": 3.0, "bce_weight": 2.0, "dice_weight": 0.5}
    assert cfg.eval.datasets == ["c"]  # lists are replaced, not concatenated
    assert recipe.files == (child, middle, tiny)
    assert recipe.source_of("model.mask_decoder.variant") == str(child)
    assert recipe.source_of("model.llm.dtype") == str(middle)
    assert recipe.source_of("model.llm.pretrained") == str(tiny)


def test_base_name_from_recipe_path(monkeypatch, tmp_path, tiny):
    monkeypatch.setenv(recipes.RECIPE_PATH_ENV, str(tmp_path))
    child = write(tmp_path / "elsewhere", "child.yaml", "base: tiny\nname: child\n")
    assert load_recipe(child).cfg.model.llm.pretrained == "/llm"


def test_changing_component_name_replaces_node(tmp_path, tiny):
    child = write(tmp_path, "child.yaml", """
        base: tiny
        model:
          projector: {name: linear}
          vision_encoder: {name: clip, image_size: 336}
        """)
    recipe = load_recipe(child)
    assert recipe.cfg.model.projector == {"name": "linear"}  # depth of mlp does not leak
    assert recipe.cfg.model.vision_encoder.pretrained == "/enc"  # same name: deep merge
    assert recipe.cfg.model.vision_encoder.image_size == 336
    assert recipe.source_of("model.projector.depth") == str(child)


def test_base_cycle(tmp_path):
    write(tmp_path, "a.yaml", "base: b\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(RecipeError, match="cycle") as info:
        load_recipe(tmp_path / "a.yaml")
    assert info.value.key == "base" and "b.yaml" in info.value.file
    write(tmp_path, "self.yaml", "base: self\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "self.yaml")


def test_missing_base_names_file_and_key(tmp_path):
    child = write(tmp_path, "child.yaml", "base: does-not-exist\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(child)
    assert info.value.key == "base" and info.value.file == str(child)
    assert str(child) in str(info.value) and "base" in str(info.value)


@pytest.mark.parametrize("text, match", [("a: [1,\n", "cannot read recipe"), ("- 1\n- 2\n", "must be a YAML mapping")])
def test_unreadable_recipe(tmp_path, text, match):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(RecipeError, match=match) as info:
        load_recipe(path)
    assert info.value.file == str(path)


def test_load_from_mapping():
    recipe = load_recipe({"name": "x", "model": {"projector": {"name": "linear"}}}, ["name=y"])
    assert recipe.path is None and recipe.cfg.name == "y"


# -- overrides ------------------------------------------------------------------
def test_scalar_overrides(tiny):
    cfg = load_recipe(tiny, ["model.llm.pretrained=/x", "loss.ce_weight=2", "train.lr=1e-4",
                             "model.fusion.use_im_start_end=false", "description="]).cfg
    assert cfg.model.llm.pretrained == "/x"
    assert cfg.loss.ce_weight == 2 and isinstance(cfg.loss.ce_weight, int)
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.model.fusion.use_im_start_end is False
    assert cfg.description == ""


def test_list_and_dict_overrides(tiny):
    cfg = load_recipe(tiny, ["eval.datasets=[x, y, z]", "loss={ce_weight: 5}",
                             "model.vision_encoder={name: clip, select_layer: -1}"]).cfg
    assert cfg.eval.datasets == ["x", "y", "z"]
    assert cfg.loss == {"ce_weight": 5, "bce_weight": 2.0, "dice_weight": 0.5}  # dicts merge
    assert cfg.model.vision_encoder == {"name": "clip", "pretrained": "/enc", "select_layer": -1}


def test_name_change_by_override_replaces_node(tiny):
    recipe = load_recipe(tiny, ["model.projector.name=linear"])
    assert recipe.cfg.model.projector == {"name": "linear"}
    recipe = load_recipe(tiny, ["model.projector={name: linear}", "+model.projector.in_dim=8"])
    assert recipe.cfg.model.projector == {"name": "linear", "in_dim": 8}
    # Same name: nothing is dropped.
    assert load_recipe(tiny, ["model.projector.name=mlp"]).cfg.model.projector.depth == 3


def test_delete_override(tiny):
    recipe = load_recipe(tiny, ["~generation", "~model.mask_decoder.checkpoint"])
    assert "generation" not in recipe.cfg and "checkpoint" not in recipe.cfg.model.mask_decoder
    with pytest.raises(RecipeError, match="not in the recipe") as info:
        load_recipe(tiny, ["~model.nope.x"])
    assert info.value.key == "model.nope.x" and "~model.nope.x" in info.value.file


@pytest.mark.parametrize("override, match", [
    ("model.llm.pretrained", "key=value"),
    ("base=other", "base cannot be overridden"),
    ("eval.datasets.0=x", "inside a list"),
    ("loss..x=1", "bad key"),
    ("~loss=1", "takes no value"),
    ("name=[unclosed", "cannot parse value"),
])
def test_bad_overrides(tiny, override, match):
    with pytest.raises(RecipeError, match=match) as info:
        load_recipe(tiny, [override])
    assert override in str(info.value)


def test_override_is_named_as_source(tiny, reg):
    recipe = load_recipe(tiny, ["model.projector.depth=deep"])
    assert recipe.source_of("model.projector.depth") == "override 'model.projector.depth=deep'"
    problem = only(validate_recipe(recipe, reg), "model.projector.depth")
    assert problem.startswith("override 'model.projector.depth=deep': model.projector.depth: expected int")


# -- validation -----------------------------------------------------------------
def test_valid_recipe(tiny, reg):
    assert validate_recipe(load_recipe(tiny), reg) == []
    assert check_recipe(tiny, reg).path == tiny  # accepts a path too


def test_uses_default_registry(tiny, reg, monkeypatch):
    monkeypatch.setattr(registry_module, "get_registry", lambda refresh=False: reg)
    assert validate_recipe(tiny) == []


def test_missing_values_reported_by_key(tmp_path, tiny, reg):
    # `???` inside flow mappings is not valid YAML on its own; the loader quotes it.
    child = write(tmp_path, "child.yaml", """
        base: tiny
        model:
          llm: {pretrained: ???}
        weights: {format: lisa_hf, path: ???}
        eval: {out: "${weights.path}/eval"}
        """)
    recipe = load_recipe(child)
    problems = validate_recipe(recipe, reg)
    assert len(problems) == 3, problems
    assert only(problems, "weights.path:").startswith(f"{child}: weights.path: value is missing")
    only(problems, "model.llm.pretrained")
    only(problems, "eval.out")  # an interpolation to a missing value counts as missing
    assert missing_keys(recipe) == ["eval.out", "model.llm.pretrained", "weights.path"]
    assert validate_recipe(recipe, reg, allow_missing=True) == []
    listed = load_recipe(child, ["eval.datasets=[a, ???]"])
    assert "eval.datasets[1]" in missing_keys(listed)
    assert listed.source_of("eval.datasets[1]") == "override 'eval.datasets=[a, ???]'"


def test_type_errors_name_key_and_file(tmp_path, tiny, reg):
    child = write(tmp_path, "child.yaml", """
        base: tiny
        model:
          vision_encoder: {select_layer: "-2", image_size: null, mean: [0.5, 1, x], crop: [1, 2, 3], custom: 1}
          projector: {mode: tanh, in_dim: 4.5}
          llm: {extra: {a: 1, b: two}}
          mask_decoder: {variant: 3}
          fusion: {use_im_start_end: 1}
          seg_head: {dropout: 1}
        loss: {ce_weight: heavy}
        """)
    problems = validate_recipe(load_recipe(child), reg)
    expected = {
        "model.vision_encoder.select_layer": "expected int, got str '-2'",
        "model.vision_encoder.mean": "expected list[float] | None",
        "model.vision_encoder.crop": "expected tuple[int, int]",
        "model.projector.mode": "expected Literal['gelu', 'relu']",
        "model.projector.in_dim": "expected int, got float 4.5",
        "model.llm.extra": "expected dict[str, int] | None",
        "model.mask_decoder.variant": "expected str, got int 3",
        "model.fusion.use_im_start_end": "expected bool, got int 1",
        "loss.ce_weight": "expected a number",
    }
    for key, message in expected.items():
        assert f"{child}: {key}: {message}" in only(problems, f" {key}: "), problems
    assert len(problems) == len(expected), problems  # image_size None, dropout int and custom (unknown type) pass


def test_unknown_component_lists_available(tmp_path, tiny, reg):
    child = write(tmp_path, "child.yaml", "base: tiny\nmodel:\n  llm: {name: gpt}\n")
    problem = only(validate_recipe(load_recipe(child), reg), "model.llm.name")
    assert problem == f"{child}: model.llm.name: unknown llm 'gpt'; available llm components: any_llm, causal_lm"


def test_unknown_parameter_and_kwargs(tiny, reg):
    problems = validate_recipe(load_recipe(tiny, ["model.projector.width=3"]), reg)
    assert "not a parameter of projector 'mlp' (it accepts: in_dim, out_dim, depth, mode)" in only(problems, "width")
    recipe = load_recipe(tiny, ["model.llm={name: any_llm, whatever: 1}"])
    assert validate_recipe(recipe, reg) == []


def test_required_parameters(tiny, reg):
    problems = validate_recipe(load_recipe(tiny, ["~model.llm.pretrained", "model.projector.name=linear"]), reg)
    # projector in_dim/out_dim are derived by the model, so only the LLM is reported.
    assert problems == [f"{tiny}: model.llm.pretrained: required by llm 'causal_lm' but not set"]


def test_missing_components_and_model(tmp_path, tiny, reg):
    problems = validate_recipe(load_recipe(tiny, ["~model.fusion", "~model.seg_head"]), reg)
    assert len(problems) == 2 and "model.fusion: missing" in only(problems, "model.fusion:")
    assert "model: missing" in " ".join(validate_recipe(load_recipe({"name": "x"}), reg))
    problems = validate_recipe(load_recipe(tiny, ["model.projector=linear"]), reg)
    assert "must be a mapping" in only(problems, "model.projector")


def test_seg_hidden_and_unknown_keys(tiny, reg):
    problems = validate_recipe(load_recipe(tiny, ["model.seg_hidden=last", "optimizer.lr=1", "model.tower=1"]), reg)
    assert "must be one of previous, token" in only(problems, "model.seg_hidden")
    assert f"{tiny.parent}" not in only(problems, "optimizer")  # set by an override, named as such
    assert "unknown top-level key" in only(problems, "optimizer")
    assert "unknown key; model takes" in only(problems, "model.tower")


@pytest.mark.parametrize("name", ["my_pkg.projectors:Linear", "torch.nn.Linear", "plugins/proj.py"])
def test_import_paths_are_rejected(tiny, reg, name):
    problem = only(validate_recipe(load_recipe(tiny, [f"model.projector.name={name}"]), reg), "projector")
    assert "looks like an import path; recipes name registered components only" in problem
    assert "linear, mlp" in problem


def test_hydra_target_is_rejected(tiny, reg):
    problem = only(validate_recipe(load_recipe(tiny, ["model.projector._target_=x.Y"]), reg), "_target_")
    assert "registered components only" in problem


def test_unresolvable_interpolation_is_a_problem(tiny, reg):
    problems = validate_recipe(load_recipe(tiny, ["eval.x=${nowhere}"]), reg)
    assert "eval.x: cannot resolve interpolation" in only(problems, "eval.x")


def test_check_recipe_raises_with_all_problems(tiny, reg):
    with pytest.raises(RecipeError) as info:
        check_recipe(load_recipe(tiny, ["model.seg_hidden=x", "nope=1"]), reg)
    err = info.value
    assert len(err.problems) == 2 and err.file == str(tiny)
    assert "2 problems" in str(err) and all(p in str(err) for p in err.problems)


def test_annotation_objects_are_checked_too(tiny, reg):
    def build(in_dim: int = 1, size: int = 1):
        return None

    build.__annotations__ = {"size": int}  # as if written without `from __future__ import annotations`

    class Plugin:
        @lisa_kit.hookimpl
        def lisa_kit_components(self):
            return [ComponentSpec("projector", "plain", build)]

    reg.register(Plugin(), "plain")
    problems = validate_recipe(load_recipe(tiny, ["model.projector={name: plain, size: big}"]), reg)
    assert "model.projector.size: expected int, got str 'big'" in only(problems, "size")


# -- output ---------------------------------------------------------------------
def test_resolved_yaml(tiny):
    recipe = load_recipe(tiny, ["weights={format: lisa_hf, path: ???}", "eval.dir=${model.llm.pretrained}/eval"])
    text = resolved_yaml(recipe)
    data = OmegaConf.create(text)
    assert "base" not in data and data.eval.dir == "/llm/eval"
    assert "path: ???" in text
    with pytest.raises(RecipeError, match="eval.x"):
        resolved_yaml(load_recipe(tiny, ["eval.x=${nowhere}"]))


def test_recipe_is_a_plain_dataclass(tiny):
    recipe = load_recipe(tiny, ["name=t"])
    assert isinstance(recipe, Recipe) and recipe.overrides == ("name=t",)
