"""lisa_kit's own checkpoint format.

A directory with ``recipe.yaml`` (the resolved recipe, every component node made
self-contained by the component's ``export_config()``), one ``<kind>.safetensors`` per
component and ``tokenizer/``. Loading checks the recipe, builds the components without
memory (meta parameters) and streams each file into them strictly: a mismatch names the
component and key.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import yaml

from lisa_kit.checkpoint.io import (declared_class, ensure_memory, estimate_bytes, load_file_into, param_dtype,
                                    save_safetensors)
from lisa_kit.errors import CheckpointError, RecipeError
from lisa_kit.interfaces import KINDS
from lisa_kit.recipes import env_copies, env_free, replace_copies

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
    origins = getattr(model, "recipe_env", None) or {}
    m = recipe.setdefault("model", {})
    for kind, comp in _components(model).items():
        name = (m.get(kind) or {}).get("name")
        if name is None:
            raise CheckpointError("the model's recipe does not name this component", component=kind)
        node = replace_copies({"name": name, **comp.export_config()}, env_copies(origins, ("model", kind)))
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
    # No ${oc.env:...} values in files: the recipe's environment nodes are written back as
    # their interpolations, and what a component built from such a node exported is too.
    tmp.write_text(yaml.safe_dump(env_free(recipe, origins), sort_keys=False))
    os.replace(tmp, path / "recipe.yaml")
    return path


def read_recipe_file(f: Path, origins: dict | None = None) -> dict:
    """The recipe of a lisa_kit checkpoint, read with bounds (size, alias expansion) and
    checked: a mapping with a ``model`` mapping naming every component, valid for
    :func:`lisa_kit.recipes.check_recipe`. Every problem is a :class:`CheckpointError`
    naming the file."""
    from omegaconf import OmegaConf

    from lisa_kit.recipes import load_recipe, load_yaml_safely, recipe_env_origins

    try:
        # Bounded before anything is expanded (size, YAML alias bombs); errors never quote content.
        recipe = load_yaml_safely(Path(f), origin=str(f))
    except RecipeError as e:
        raise CheckpointError(f"cannot read recipe.yaml: {e}", file=f) from e
    model = recipe.get("model")
    if not isinstance(model, dict):
        raise CheckpointError("recipe.yaml has no `model` mapping", key="model", file=f)
    for kind in KINDS:
        node = model.get(kind)
        if not isinstance(node, dict) or not isinstance(node.get("name"), str):
            raise CheckpointError(f"recipe.yaml: model.{kind} must be a mapping with a component `name`",
                                  key=f"model.{kind}", file=f)
    try:  # saved recipes keep ${oc.env:NAME}: resolved from this environment, here
        loaded = load_recipe(recipe)
        if origins is not None:  # which nodes those are, to write them back the same way
            origins.update(recipe_env_origins(loaded))
        return OmegaConf.to_container(loaded.cfg, resolve=True)
    except RecipeError as e:
        raise CheckpointError(f"recipe.yaml is not a valid recipe: {e}", file=f) from e


def _weights_file(path: Path, name: str) -> Path:
    f = path / f"{name}.safetensors"
    if not f.exists():
        raise CheckpointError(f"missing weights file {f.name}", component=name, file=f)
    return f


def load_model(path: str | os.PathLike, registry=None, strict: bool = True, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None, device_map=None):
    """Load a directory written by :func:`save_model`. With ``strict`` (the default) the
    components are built without memory and each file is streamed into them, every tensor
    cast once to ``dtype`` (but the keys a component keeps: :func:`~lisa_kit.checkpoint.io.param_dtype`;
    ``None``: as built)
    and placed on ``device``; a load that cannot fit is refused before reading.
    ``device_map`` (parsed by :func:`~lisa_kit.checkpoint.device_map.parse_device_map`;
    replaces ``device``): the LLM's decoder layers spread over several devices, planned
    before reading (:mod:`lisa_kit.checkpoint.device_map`)."""
    from lisa_kit.builder import build_component, build_model
    from lisa_kit.checkpoint.device_map import plan
    from lisa_kit.recipes import check_recipe

    path = Path(path)
    if not (path / "recipe.yaml").exists():
        raise CheckpointError(f"not a lisa_kit checkpoint (no recipe.yaml): {path}")
    origins: dict = {}
    recipe = read_recipe_file(path / "recipe.yaml", origins)
    recipe.pop("lisa_kit_format", None)
    tok = recipe["model"]["llm"].get("tokenizer")
    if not isinstance(tok, str):
        raise CheckpointError("recipe.yaml: model.llm.tokenizer must name the tokenizer directory",
                              key="model.llm.tokenizer", file=path / "recipe.yaml")
    recipe["model"]["llm"]["tokenizer"] = str(path / tok)
    try:
        check_recipe(recipe, registry=registry)
    except RecipeError as e:
        raise CheckpointError(f"recipe.yaml is not a valid recipe: {e}", file=path / "recipe.yaml") from e
    files = {kind: _weights_file(path, kind) for kind in KINDS}
    owners = {kind: declared_class(kind, recipe["model"].get(kind), registry) for kind in KINDS}
    sizes = {kind: estimate_bytes(f, lambda k, kind=kind: param_dtype(owners[kind], k, dtype) or torch.float32)
             for kind, f in files.items()}
    placement = None
    if device_map is not None:
        # The LLM on the meta device tells its layers' sizes; the rest comes from the headers.
        llm = build_component("llm", recipe["model"]["llm"], registry, empty=True)
        placement = plan(llm, sum(v for k, v in sizes.items() if k != "llm"),
                         lambda k, t: param_dtype(llm.model, k, dtype) or t.dtype, device_map, llm_bytes=sizes["llm"])
    else:
        ensure_memory(sum(sizes.values()), device, str(path))
    model = build_model(recipe, registry, empty=KINDS if strict else (), dtype=dtype)
    comps = _components(model)
    for kind in KINDS:
        where = placement.device_for(comps[kind], model.llm.model) if placement else device
        load_file_into(comps[kind], files[kind], kind, strict, dtype=dtype, device=where)
    for name, module in _extras(model).items():
        f = path / f"{name}.safetensors"
        if not f.exists():
            raise CheckpointError(f"missing weights file {f.name} (the recipe's model.{name} has weights)",
                                  component=name, file=f)
        load_file_into(module, f, name, strict, device=placement.first if placement else device)
    model.recipe_env = origins
    if placement is not None:
        placement.dispatch(model)
    elif device is not None:
        model.to(device)  # buffers; the parameters are there already
    return model
