"""Recipes from hostile or careless sources: alias bombs, ``base:`` pointing at any file,
secrets interpolated from the environment, and values of the wrong type or choice."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import yaml

from lisa_kit.errors import RecipeError
from lisa_kit.recipes import MAX_YAML_NODES, load_recipe, load_yaml_safely, validate_recipe

REPO = Path(__file__).resolve().parent.parent


def alias_bomb(levels: int = 9, width: int = 10) -> str:
    """``width ** levels`` scalars once expanded, a few hundred bytes as text."""
    lines = ["l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


# -- alias bombs -------------------------------------------------------------------------------
def test_load_yaml_safely_refuses_an_alias_bomb_before_expanding(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("name: x\n" + alias_bomb())
    for source in (path, path.read_text()):
        with pytest.raises(RecipeError, match=f"expands past {MAX_YAML_NODES} nodes"):
            load_yaml_safely(source)


def test_load_yaml_safely_keeps_what_recipes_need(tmp_path):
    text = "name: x\ncommon: &c {lr: 1e-4, path: ???}\ntrain: *c\nweights: {path: '${oc.env:NOPE,/ckpt}'}\n"
    data = load_yaml_safely(text)
    assert data["train"] == {"lr": 1e-4, "path": "???"}  # small anchors are fine, floats stay floats
    assert data["weights"]["path"] == "${oc.env:NOPE,/ckpt}"  # interpolations are left as text
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        load_yaml_safely("[1, 2]")


def test_alias_bomb_in_an_override_is_refused_within_bounded_memory():
    # A subprocess with a 1 GiB heap limit: expanding the bomb would die of MemoryError.
    override = "eval.bomb=" + _flow_bomb()
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_DATA, (1 << 30, 1 << 30))
        from lisa_kit.errors import RecipeError
        from lisa_kit.recipes import load_recipe
        try:
            load_recipe("lisa-tiny", [{override!r}])
        except RecipeError as exc:
            print("refused:", exc)
        """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "refused:" in proc.stdout and "expands past" in proc.stdout, proc.stderr[-2000:]


def _flow_bomb(levels: int = 9, width: int = 10) -> str:
    """The alias bomb as one flow-style YAML value (for a ``key=value`` override)."""
    items = ["&l0 [" + ", ".join(["lol"] * width) + "]"]
    items += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


# -- base: pointing at any file -----------------------------------------------------------------
SECRET = "hunter2-" + uuid.uuid4().hex[:8]
BASE_FILES = {
    "scalar (.env style)": f"TOKEN={SECRET}\n",
    "mapping, not a recipe": f"{SECRET}: 1\naws_secret: {SECRET}\n",
}


@pytest.mark.parametrize("kind", list(BASE_FILES))
def test_base_error_names_path_and_problem_never_content(tmp_path, kind):
    target = tmp_path / "not_a_recipe.txt"
    target.write_text(BASE_FILES[kind])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {target}\nname: r\n")
    try:
        problems = validate_recipe(load_recipe(recipe))
    except RecipeError as exc:
        problems = [str(exc)]
    text = "\n".join(problems)
    assert problems and str(target) in text
    assert SECRET not in text


# -- secrets from the environment are never written ------------------------------------------
def _all_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


@pytest.fixture
def secret(monkeypatch):
    value = "sk-" + uuid.uuid4().hex
    monkeypatch.setenv("LISA_KIT_TEST_SECRET", value)
    return value


def test_saved_model_holds_no_environment_value(tmp_path, secret):
    from lisa_kit.builder import load
    from lisa_kit.checkpoint.native import load_model, save_model
    from lisa_kit.testing import tiny_recipe

    recipe = tiny_recipe()
    recipe["description"] = "key ${oc.env:LISA_KIT_TEST_SECRET} for the demo"
    recipe["eval"] = {"copied": "${description}", "token": "${oc.env:LISA_KIT_TEST_SECRET}"}
    path = tmp_path / "secret.yaml"
    path.write_text(yaml.safe_dump(recipe))
    model = load(str(path))
    assert model.recipe["eval"]["token"] == secret  # in memory, the real value
    save_model(model, tmp_path / "ckpt")
    assert secret.encode() not in _all_bytes(tmp_path / "ckpt")
    saved = load_yaml_safely(tmp_path / "ckpt" / "recipe.yaml")
    assert saved["eval"]["token"] == "${oc.env:LISA_KIT_TEST_SECRET}"
    assert saved["description"] == "key ${oc.env:LISA_KIT_TEST_SECRET} for the demo"
    assert load_model(tmp_path / "ckpt") is not None


def test_training_run_and_checkpoints_hold_no_environment_value(tmp_path, secret):
    from lisa_kit.train.loop import Trainer

    overrides = ["train.steps=1", "train.save_every=1", "train.warmup_steps=1", "train.batch_size=1",
                 "train.grad_accumulation=1", "train.val=null", "train.workers=0", "data.samples_per_epoch=2",
                 "data.sources.synthetic.options.size=4", "description=${oc.env:LISA_KIT_TEST_SECRET}"]
    Trainer("lisa-tiny-synthetic", tmp_path / "run", overrides=overrides, progress=False).fit()
    assert (tmp_path / "run" / "recipe.yaml").is_file()
    assert secret.encode() not in _all_bytes(tmp_path / "run")
    assert "${oc.env:LISA_KIT_TEST_SECRET}" in (tmp_path / "run" / "recipe.yaml").read_text()


# -- every key the loaders read is checked by type and choice ----------------------------------
@pytest.mark.parametrize("override, key, message", [
    ("generation.max_new_tokens=lots", "generation.max_new_tokens", "expected a positive int, got 'lots'"),
    ("generation.max_new_tokens=0", "generation.max_new_tokens", "expected a positive int, got 0"),
    ("generation.max_tokens=5", "generation.max_tokens", "unknown key; generation takes: max_new_tokens"),
    ("conversation.template=vicuna", "conversation.template", "unknown conversation template 'vicuna'"),
    ("conversation.template=[llava_v1]", "conversation.template", "templates: llava_v1"),
    ("conversation.system=3", "conversation.system", "expected a string (may be empty), got 3"),
    ("data.samples_per_epoch=many", "data.samples_per_epoch", "expected a positive int"),
    ("data.classes_per_sample=true", "data.classes_per_sample", "expected a positive int, got True"),
    ("data.explanatory=2", "data.explanatory", "expected a probability"),
    ("data.explain_first=yes please", "data.explain_first", "expected true, false or after_name"),
    ("data.multi_seg={prob: 3}", "data.multi_seg.prob", "must be a probability in [0, 1]"),
    ("data.sources={a: {datasets: [nope]}}", "data.sources.a.datasets", "unknown dataset 'nope'"),
    ("data.sources={a: {datasets: [synthetic], rate: -1}}", "data.sources.a.rate", "expected a number >= 0"),
    ("data.sampels_per_epoch=5", "data.sampels_per_epoch", "unknown key; data takes: root, samples_per_epoch"),
    ("train.lr=fast", "train.lr", "expected a number, got 'fast'"),
    ("train.strategy=magic", "train.strategy", "magic"),
    ("precision=fp64", "precision", "must be one of bf16, fp16, fp32"),
])
def test_validate_checks_sections_the_loaders_read(override, key, message):
    recipe = load_recipe("lisa-tiny-synthetic", [override])
    (problem,) = validate_recipe(recipe)
    assert problem.startswith(f"override {override!r}: {key}: ") and message in problem


def test_shipped_recipes_validate_by_default_and_strict_fails_on_missing(capsys):
    from lisa_kit.cli import main

    shipped = sorted(str(p) for p in (REPO / "recipes").glob("*.yaml"))
    assert main(["validate", *shipped]) == 0  # README: `lisa-kit validate recipes/*.yaml`
    out = capsys.readouterr().out
    assert "FAIL" not in out and "warning:" in out and "weights.path: value is missing (???)" in out
    assert main(["validate", str(REPO / "recipes" / "lisa-7b.yaml"), "--strict"]) == 1
    assert "FAIL" in capsys.readouterr().out
