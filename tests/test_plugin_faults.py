"""Plugin discovery survives any installed plugin, and every command survives a closed stdout.

Third-party plugins are real distributions (``<dist>-<version>.dist-info`` with an
``entry_points.txt``) written into a directory on ``sys.path`` -- in this process for the
registry, on ``PYTHONPATH`` for ``lisa-kit`` run as a subprocess.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from lisa_kit import registry as registry_module
from lisa_kit.cli import EXIT_BROKEN_PIPE
from lisa_kit.errors import DuplicateComponentError, PluginWarning
from lisa_kit.recipes import validate_recipe
from lisa_kit.registry import OWN_DISTRIBUTION, Registry
from lisa_kit.testing import tiny_recipe

GOOD = """
import lisa_kit
from lisa_kit.interfaces import ComponentSpec

def build(in_dim: int = 1, out_dim: int = 1):
    return (in_dim, out_dim)

@lisa_kit.hookimpl
def lisa_kit_components():
    return [ComponentSpec(kind="projector", name={name!r}, build=build)]
"""

HOOK = """
import sys
import lisa_kit
from lisa_kit.interfaces import ComponentSpec

@lisa_kit.hookimpl
def lisa_kit_components():
{body}
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    """``make(dist, module_source)``: a distribution ``dist`` whose plugin ``<dist>`` is the
    module ``<dist>_mod``; returns the site directory (also prepended to sys.path)."""
    root = tmp_path / "site"
    root.mkdir()
    modules = []

    def make(dist: str, source: str) -> Path:
        info = root / f"{dist}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[lisa_kit]\n{dist} = {dist}_mod\n")
        (root / f"{dist}_mod.py").write_text(textwrap.dedent(source))
        modules.append(f"{dist}_mod")
        return root

    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(registry_module, "_default", None)  # no fake plugin in the cached registry after
    yield make
    for module in modules:
        sys.modules.pop(module, None)


def discover() -> tuple[Registry, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = Registry.discover()
    return reg, [str(w.message) for w in caught if issubclass(w.category, PluginWarning)]


def tiny() -> dict:
    """:func:`tiny_recipe` (it reads the default registry, which sees the fake plugins too)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)
        return tiny_recipe()


def info_of(reg: Registry, name: str):
    (info,) = [p for p in reg.plugins if p.name == name]
    return info


def lisa_kit_cli(site_dir: Path, *args: str, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site_dir), *sys.path]), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "lisa_kit", *args], env=env, stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=120)


# -- a plugin that exits or raises anything ------------------------------------------------
IMPORT_FAULTS = {
    "sys.exit()": ("import sys\nsys.exit()\n", "called sys.exit(None)"),
    "sys.exit(3)": ("import sys\nsys.exit(3)\n", "called sys.exit(3)"),
    "SystemExit(msg)": ("raise SystemExit('bye')\n", "called sys.exit('bye')"),
    "BaseException": ("raise BaseException('odd')\n", "BaseException: odd"),
    "GeneratorExit": ("raise GeneratorExit\n", "GeneratorExit"),
}


@pytest.mark.parametrize("fault", list(IMPORT_FAULTS))
def test_plugin_exiting_or_raising_at_import(site, fault):
    source, message = IMPORT_FAULTS[fault]
    site("exiter", source)
    site("goodone", GOOD.format(name="good_proj"))
    reg, warned = discover()
    assert message in info_of(reg, "exiter").error
    assert any("exiter 1.0" in w for w in warned)
    assert reg.origin("projector", "good_proj").distribution == "goodone"
    assert reg.origin("projector", "linear").distribution == OWN_DISTRIBUTION


HOOK_FAULTS = {
    "exit": ("    sys.exit(0)", "raised called sys.exit(0)"),
    "BaseException": ("    raise BaseException('odd')", "raised BaseException: odd"),
    "exit mid-generator": ("    yield ComponentSpec('projector', 'p', build=dict)\n    sys.exit(1)",
                           "must return a list"),
    "number": ("    return 42", "got 42"),
    "dict": ("    return {'projector': 'p'}", "must return a list"),
    "broken repr": ("    class X:\n        def __repr__(self): raise RuntimeError('no repr')\n    return [X()]",
                    "not a ComponentSpec: <X object>"),
    "same name twice": ("    return [ComponentSpec('projector', 'p', build=dict)] * 2",
                        "provides projector:p twice"),
}


@pytest.mark.parametrize("fault", list(HOOK_FAULTS))
def test_plugin_hook_exiting_raising_or_returning_garbage(site, fault):
    body, message = HOOK_FAULTS[fault]
    site("hooker", HOOK.format(body=body))
    reg, warned = discover()
    info = info_of(reg, "hooker")
    assert message in info.error and info.components == []
    assert any("hooker 1.0" in w for w in warned)
    assert "p" not in reg.names("projector") and "linear" in reg.names("projector")


def test_plugin_output_at_import_does_not_reach_stdout(site, capsys):
    site("chatty", "print('hello from a plugin')\n" + GOOD.format(name="chatty_proj"))
    reg, _ = discover()
    out, err = capsys.readouterr()
    assert "chatty_proj" in reg.names("projector")
    assert "hello from a plugin" not in out and "hello from a plugin" in err


# -- name clashes ----------------------------------------------------------------------------
def test_plugin_reusing_a_builtin_name_keeps_the_builtin(site):
    site("shadow", GOOD.replace("[ComponentSpec(kind=\"projector\", name={name!r}, build=build)]",
                                "[ComponentSpec('projector', 'linear', build=build), "
                                "ComponentSpec('projector', {name!r}, build=build)]").format(name="shadow_proj"))
    reg, warned = discover()
    assert reg.origin("projector", "linear").distribution == OWN_DISTRIBUTION
    info = info_of(reg, "shadow")
    assert info.error is None and info.components == [("projector", "shadow_proj")]
    assert "projector:linear" in info.status and "built-in" in info.status
    assert any("shadow 1.0" in w and "projector:linear" in w for w in warned)
    assert validate_recipe(tiny(), reg) == []


def test_two_plugins_clashing_fail_only_where_the_name_is_used(site):
    site("alpha", GOOD.format(name="twin"))
    site("beta", GOOD.format(name="twin"))
    site("gamma", GOOD.format(name="single"))
    reg, _ = discover()
    assert reg.origin("projector", "single").distribution == "gamma"
    assert all(("projector", "twin") in info_of(reg, n).components for n in ("alpha", "beta"))
    assert validate_recipe(tiny(), reg) == []
    with pytest.raises(DuplicateComponentError, match="alpha 1.0.*beta 1.0"):
        reg.get("projector", "twin")
    recipe = tiny()
    recipe["model"]["projector"] = {"name": "twin"}
    (problem,) = validate_recipe(recipe, reg)
    assert "model.projector.name" in problem and "alpha 1.0" in problem and "beta 1.0" in problem


def test_cli_plugins_lists_clash_and_exit_plugin(site):
    site("shadow", GOOD.format(name="linear"))
    root = site("quitter", "import sys\nsys.exit(0)\n")
    proc = lisa_kit_cli(root, "plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    records = {r["name"]: r for r in json.loads(proc.stdout)}
    assert records["quitter"]["status"] == "failed" and "sys.exit(0)" in records["quitter"]["error"]
    assert records["shadow"]["components"] == [] and "projector:linear" in records["shadow"]["clashes"][0]
    proc = lisa_kit_cli(root, "validate", "lisa-tiny")  # other commands keep working, warnings on stderr
    assert proc.returncode == 0 and "OK" in proc.stdout
    assert "quitter" in proc.stderr and "projector:linear" in proc.stderr and "Traceback" not in proc.stderr


# -- stdout closed early (`lisa-kit plugins --json | head`) --------------------------------------
@pytest.mark.parametrize("args", [("plugins", "--json"), ("plugins",), ("recipe", "show", "lisa-7b"),
                                  ("validate", "lisa-tiny", "lisa-7b", "--allow-missing")])
def test_closed_stdout_ends_quietly(args, tmp_path):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        proc = lisa_kit_cli(tmp_path, *args, stdout=write_end)
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert proc.returncode == EXIT_BROKEN_PIPE
