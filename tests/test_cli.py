"""The lisa-kit command line, with an injected registry of fake components."""
from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

import lisa_kit
from lisa_kit import cli
from lisa_kit import registry as registry_module
from lisa_kit.errors import DuplicateComponentError
from lisa_kit.interfaces import ComponentSpec
from lisa_kit.registry import Registry


def build_any(pretrained: str | None = None, size: int = 1):
    return None


class FakeComponents:
    @lisa_kit.hookimpl
    def lisa_kit_components(self):
        kinds = ("vision_encoder", "projector", "llm", "mask_decoder", "fusion", "seg_head")
        return [ComponentSpec(kind, f"fake_{kind}", build_any) for kind in kinds]


@pytest.fixture
def reg(monkeypatch) -> Registry:
    # A plugin that fails to import, to show in the table, plus the fake components.
    ghost = importlib.metadata.EntryPoint(name="ghost", value="no_such_module_for_lisa_kit_tests", group="lisa_kit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        registry = Registry.discover(entry_points=[ghost])
    registry.register(FakeComponents(), "fakes", distribution="fake-dist", version="0.9")
    monkeypatch.setattr(registry_module, "get_registry", lambda refresh=False: registry)
    return registry


RECIPE = """
name: fake
model:
  vision_encoder: {name: fake_vision_encoder, pretrained: /enc}
  projector: {name: fake_projector}
  llm: {name: fake_llm, pretrained: ???}
  mask_decoder: {name: fake_mask_decoder}
  fusion: {name: fake_fusion}
  seg_head: {name: fake_seg_head, size: 2}
  seg_hidden: previous
"""


@pytest.fixture
def recipe(tmp_path) -> Path:
    path = tmp_path / "fake.yaml"
    path.write_text(textwrap.dedent(RECIPE))
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plugins_json(reg, capsys):
    code, out, _ = run(capsys, "plugins", "--json")
    assert code == 0
    records = {r["name"]: r for r in json.loads(out)}
    fakes = records["fakes"]
    assert (fakes["distribution"], fakes["version"], fakes["status"]) == ("fake-dist", "0.9", "ok")
    assert "projector:fake_projector" in fakes["components"] and fakes["error"] is None
    assert records["ghost"]["status"] == "failed" and "ModuleNotFoundError" in records["ghost"]["error"]


def test_plugins_table(reg, capsys):
    code, out, _ = run(capsys, "plugins")
    assert code == 0
    assert "fakes" in out and "fake-dist" in out and "ok" in out and "FAILED" in out
    assert "seg_head:fake_seg_head" in out and "No module named 'no_such_module_for_lisa_kit_tests'" in out
    code, out, _ = run(capsys, "plugins", "-v")
    assert "Traceback" in out and "no_such_module_for_lisa_kit_tests" in out


def test_plugins_plain_table_without_rich(reg, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "rich.console", None)  # makes `import rich.console` fail
    code, out, _ = run(capsys, "plugins")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["plugin", "distribution", "version", "status", "components"]
    assert any(line.startswith("fakes ") and "fake_llm" in line for line in lines)


def test_validate_ok_and_failures(reg, capsys, recipe, tmp_path):
    code, out, _ = run(capsys, "validate", str(recipe), "--set", "model.llm.pretrained=/llm")
    assert (code, out) == (0, f"OK {recipe}\n")

    code, out, _ = run(capsys, "validate", str(recipe), "--strict")
    assert code == 1
    assert out.splitlines() == [f"FAIL {recipe}",
                                f"  {recipe}: model.llm.pretrained: value is missing (???); "
                                "set it in the recipe or with key=value"]

    for flags in ((), ("--allow-missing",)):  # ??? values are warnings by default (the old flag still works)
        code, out, _ = run(capsys, "validate", str(recipe), *flags)
        assert code == 0 and out.startswith(f"OK {recipe}\n")
        assert f"warning: {recipe}: model.llm.pretrained: value is missing" in out

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {recipe.name}\nmodel:\n  seg_head: {{size: big}}\n")
    code, out, _ = run(capsys, "validate", str(recipe), str(bad), "--allow-missing")
    assert code == 1
    assert f"OK {recipe}" in out and f"FAIL {bad}" in out
    assert f"{bad}: model.seg_head.size: expected int, got str 'big'" in out


def test_validate_unknown_recipe_fails_per_recipe(reg, capsys, recipe):
    code, out, _ = run(capsys, "validate", "no-such-recipe", str(recipe), "--allow-missing")
    assert code == 1
    assert "FAIL no-such-recipe" in out and "not found" in out and f"OK {recipe}" in out


def test_recipe_show(reg, capsys, recipe):
    code, out, _ = run(capsys, "recipe", "show", str(recipe), "model.projector.name=other", "~model.seg_hidden")
    assert code == 0
    assert "name: other" in out and "seg_hidden" not in out and "pretrained: ???" in out


def test_recipe_list(capsys, monkeypatch, recipe):
    monkeypatch.setenv("LISA_KIT_RECIPE_PATH", str(recipe.parent))
    code, out, _ = run(capsys, "recipe", "list")
    assert code == 0 and f"fake\t{recipe}" in out


def test_lisa_kit_errors_are_one_line(reg, capsys):
    code, out, err = run(capsys, "recipe", "show", "no-such-recipe")
    assert code == 2 and out == ""
    assert err.startswith("error: recipe 'no-such-recipe' not found") and err.count("\n") == 1
    assert "Traceback" not in err


def test_registry_errors_exit_2(monkeypatch, capsys):
    def broken(refresh=False):
        raise DuplicateComponentError("llm", "x", "a 1.0 (plugin 'a')", "b 2.0 (plugin 'b')")

    monkeypatch.setattr(registry_module, "get_registry", broken)
    code, _, err = run(capsys, "plugins")
    assert code == 2 and err.startswith("error: duplicate component llm:x")


def test_usage(capsys):
    assert run(capsys, "--help")[0] == 0
    assert run(capsys, "--version")[1].strip() == f"lisa-kit {lisa_kit.__version__}"
    code, _, err = run(capsys)
    assert code == 2 and "COMMAND" in err
    code, _, err = run(capsys, "recipe")
    assert code == 2 and "show" in err
    assert run(capsys, "validate")[0] == 2  # argparse: RECIPE is required


def test_add_subcommand(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_COMMANDS", dict(cli._COMMANDS))

    def setup(parser):
        parser.add_argument("who")

    cli.add_subcommand("recipe hello", "say hello", setup, lambda args: print(f"hello {args.who}") or 3)
    assert run(capsys, "recipe", "hello", "you")[:2] == (3, "hello you\n")
    with pytest.raises(ValueError, match="command group"):
        cli.add_subcommand("nope sub", "x", None, lambda args: 0)


def test_python_dash_m():
    result = subprocess.run([sys.executable, "-m", "lisa_kit", "validate", "--help"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "--allow-missing" in result.stdout
