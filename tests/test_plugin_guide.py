"""docs/plugins.md: its listings are the files of docs/example_plugin/, and the example works.

The example is "installed" the way pip leaves a distribution: its module next to a
``<name>-<version>.dist-info`` with ``entry_points.txt`` (generated from its pyproject), in
a directory on ``sys.path`` — exactly what ``importlib.metadata`` discovers. Then
``lisa-kit plugins`` lists it, its recipe validates and builds, and ``pytest`` in a copy of
its checkout runs the conformance suite through ``--lisa-kit-conformance`` (its pyproject's
``addopts``), one passing test per component.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from lisa_kit import cli
from lisa_kit import registry as registry_module

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "plugins.md"
EXAMPLE = ROOT / "docs" / "example_plugin"
RECIPE = EXAMPLE / "recipes" / "lisa-tiny-example.yaml"
# ```lang title="path relative to docs/example_plugin"
LISTING = re.compile(r'^```\w+ title="(?P<path>[^"]+)"\n(?P<body>.*?)^```$', re.M | re.S)


def example_files() -> set[str]:
    return {p.relative_to(EXAMPLE).as_posix() for p in EXAMPLE.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def test_guide_listings_are_the_example_files():
    listings = {m["path"]: m["body"] for m in LISTING.finditer(GUIDE.read_text())}
    assert set(listings) == example_files(), "every file of docs/example_plugin is shown in full, and only those"
    for path, body in listings.items():
        assert body == (EXAMPLE / path).read_text(), f"docs/plugins.md's listing of {path} differs from the file"


@pytest.fixture
def installed_example(tmp_path, monkeypatch):
    """The example as an installed distribution; yields (site dir, project metadata)."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    meta = project["project"]
    site = tmp_path / "site"
    info = site / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n")
    groups = meta["entry-points"]
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) for group, eps in groups.items()))
    modules = project["tool"]["setuptools"]["py-modules"]
    for module in modules:
        shutil.copy(EXAMPLE / f"{module}.py", site / f"{module}.py")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(registry_module, "_default", None)  # rediscover with the example; restored after
    yield site, meta
    for module in modules:
        sys.modules.pop(module, None)


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out + err


def test_example_plugin_end_to_end(installed_example, tmp_path, capsys):
    site, meta = installed_example
    code, out = run_cli(capsys, "plugins", "--json")
    assert code == 0
    (record,) = [r for r in json.loads(out) if r["distribution"] == meta["name"]]
    assert (record["name"], record["version"], record["status"]) == ("example", meta["version"], "ok")
    assert record["components"] == ["seg_head:mlp3", "projector:ln_mlp"]

    assert run_cli(capsys, "validate", str(RECIPE))[0] == 0
    code, out = run_cli(capsys, "validate", str(RECIPE), "--set", "model.seg_head.out_dim=256")
    assert code == 1 and "out_dim=256 does not match prompt_dim=32 of model.mask_decoder (sam)" in out

    from lisa_kit.builder import load

    model = load(str(RECIPE))
    assert type(model.seg_head).__module__ == type(model.projector).__module__ == "lisa_kit_example"
    assert (model.seg_head.in_dim, model.seg_head.hidden_dim, model.seg_head.out_dim) == (
        model.llm.hidden_size, 48, model.mask_decoder.prompt_dim)
    assert (model.projector.in_dim, model.projector.out_dim) == (model.vision_encoder.feature_dim,
                                                                  model.llm.hidden_size)

    if not any(ep.value == "lisa_kit.pytest_plugin" for ep in importlib.metadata.entry_points(group="pytest11")):
        pytest.skip("lisa-kit's pytest11 entry point is not installed; run `pip install -e .` again")
    checkout = tmp_path / "checkout"
    shutil.copytree(EXAMPLE, checkout)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(PYTHONPATH=os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    # A plain `pytest` in the plugin's checkout: its pyproject's addopts asks for the suite.
    # (Unrelated pytest plugins that are slow to import are left out.)
    args = ["-p", "no:cacheprovider", "-p", "no:xdist", "-p", "no:hypothesispytest", "-v"]
    proc = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=checkout, env=env, capture_output=True,
                          text=True, timeout=120)
    n = len(record["components"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(rf"\b{n} passed\b", proc.stdout), proc.stdout
    for component in record["components"]:
        assert f"lisa_kit_conformance[{meta['name']}]::{component} PASSED" in proc.stdout, proc.stdout
