"""lisa_kit's own checkpoint format.

A directory with ``recipe.yaml`` (the resolved recipe, every component node made
self-contained by the component's ``export_config()``), one ``<kind>.safetensors`` per
component and ``tokenizer/``. Loading builds the components from the recipe with
random weights, then loads each file strictly: a mismatch names the component and key.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import yaml

from lisa_kit.checkpoint.io import load_into, save_safetensors
from lisa_kit.errors import CheckpointError
from lisa_kit.interfaces import KINDS
from lisa_kit.recipes import env_free

FORMAT_VERSION = 1


def _components(model) -> dict:
    return {"vision_encoder": model.vision_encoder, "projector": model.projector, "llm": model.llm,
            "mask_decoder": model.mask_decoder, "fusion": model.fusion, "seg_head": model.seg_head}


def _extras(model) -> dict:
    """Model-owned modules with weights besides the components (the learned seg-layer mix
    of ``model.seg_layers: mix``): one ``<name>.safetensors`` each, only when they have any."""
    mods = {"seg_layers": getattr(model, "seg_layers", None)}
    return {k: m for k, m in mods.items() if m is not None and len(m.state_dict())}


def save_model(model, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` (created). Each file is written atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    recipe = copy.deepcopy(model.recipe or {"model": {}})
    recipe.pop("weights", None)
    m = recipe.setdefault("model", {})
    for kind, comp in _components(model).items():
        name = (m.get(kind) or {}).get("name")
        if name is None:
            raise CheckpointError("the model's recipe does not name this component", component=kind)
        node = {"name": name, **comp.export_config()}
        if kind == "llm":
            node["tokenizer"] = "tokenizer"  # relative to the checkpoint directory
        m[kind] = node
        save_safetensors(comp.state_dict(), path / f"{kind}.safetensors")
    m["seg_token"], m["seg_hidden"] = model.seg_token, model.seg_hidden
    layers, reject = getattr(getattr(model, "seg_layers", None), "spec", "last"), getattr(model, "reject_token", None)
    for key, value, default in (("seg_layers", layers, "last"), ("reject_token", reject, None)):
        if value != default:  # written only when set: default recipes stay as they were
            m[key] = value
    for name, module in _extras(model).items():
        save_safetensors(module.state_dict(), path / f"{name}.safetensors")
    model.tokenizer.save(path / "tokenizer")
    recipe["lisa_kit_format"] = FORMAT_VERSION
    tmp = path / "recipe.yaml.tmp"
    tmp.write_text(yaml.safe_dump(env_free(recipe), sort_keys=False))  # no ${oc.env:...} values in files
    os.replace(tmp, path / "recipe.yaml")
    return path


def load_model(path: str | os.PathLike, registry=None, strict: bool = True):
    """Load a directory written by :func:`save_model`."""
    from safetensors.torch import load_file

    from lisa_kit.builder import build_model

    path = Path(path)
    if not (path / "recipe.yaml").exists():
        raise CheckpointError(f"not a lisa_kit checkpoint (no recipe.yaml): {path}")
    recipe = yaml.safe_load((path / "recipe.yaml").read_text())
    recipe.pop("lisa_kit_format", None)
    recipe["model"]["llm"]["tokenizer"] = str(path / recipe["model"]["llm"]["tokenizer"])
    model = build_model(recipe, registry)
    comps = _components(model)
    for kind in KINDS:
        f = path / f"{kind}.safetensors"
        if not f.exists():
            raise CheckpointError(f"missing weights file {f.name}", component=kind, file=f)
        load_into(comps[kind], load_file(str(f)), kind, strict)
    for name, module in _extras(model).items():
        f = path / f"{name}.safetensors"
        if not f.exists():
            raise CheckpointError(f"missing weights file {f.name} (the recipe's model.{name} has weights)",
                                  component=name, file=f)
        load_into(module, load_file(str(f)), name, strict)
    return model
