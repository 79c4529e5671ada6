"""Recipe -> :class:`~lisa_kit.model.LisaModel`.

Each ``model.<kind>`` node names a registered component; its other keys are that
component's build arguments. Sizes that follow from other components are derived here
(projector ``in_dim``/``out_dim``, seg head ``in_dim``/``out_dim``); a recipe that also
states them must agree, and a mismatch names both sizes.
"""
from __future__ import annotations

import copy
import inspect
from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any

import torch

from lisa_kit.errors import RecipeError
from lisa_kit.interfaces import BASES
from lisa_kit.model import LisaModel
from lisa_kit.registry import Registry, get_registry


def _plain(node) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(node, DictConfig):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return dict(node)


def _asset(value: str, resolve: dict | None, key: str) -> str:
    """``@name`` values are built-in assets (tiny offline tokenizers), not code or paths."""
    from lisa_kit import testing
    from lisa_kit.datasets.synthetic_tokenizer import synthetic_tokenizer_dir

    assets = {"@tiny_tokenizer": testing.tiny_tokenizer_dir, "@tiny_hf_tokenizer": testing.tiny_hf_tokenizer_dir,
              "@synthetic_tokenizer": synthetic_tokenizer_dir}
    if resolve and value in resolve:
        return resolve[value]
    if value in assets:
        return str(assets[value]())
    base, _, family = value.partition(":")  # `@tiny_hf_tokenizer:llama3`: that family's chat template
    if base == "@tiny_hf_tokenizer" and family in testing.CHAT_FAMILIES:
        return str(testing.tiny_hf_tokenizer_dir(family=family))
    if base == "@tiny_vlm" and family in testing.TINY_VLMS:  # a tiny random VLM directory of that family
        return str(testing.tiny_vlm_dir(family))
    raise RecipeError(f"unknown built-in asset {value!r}; available: {', '.join(assets)} "
                      f"(@tiny_hf_tokenizer:<family>: {', '.join(testing.CHAT_FAMILIES)}; "
                      f"@tiny_vlm:<family>: {', '.join(testing.TINY_VLMS)})", key=key)


# Build arguments with which a component names weights it loads itself (a recipe's
# `pretrained` directory, SAM's `checkpoint` file): such a component is always built for real.
WEIGHT_ARGS = ("pretrained", "checkpoint")


def names_weights(node: dict) -> bool:
    """Whether a recipe node names weights the component loads itself."""
    return any(node.get(k) is not None for k in WEIGHT_ARGS)


def build_component(kind: str, node: dict, registry: Registry | None = None, derived: dict | None = None,
                    resolve: dict | None = None, empty: bool = False, dtype: torch.dtype | None = None) -> Any:
    """Build one component from its recipe node (``{"name": ..., **kwargs}``).

    ``derived`` values fill arguments the recipe left out; when the recipe gives one too
    they must be equal. ``resolve`` maps extra ``"@asset"`` names to values. ``empty``:
    build under :func:`~lisa_kit.checkpoint.io.empty_weights` (parameters on the meta
    device, for a checkpoint to fill). ``dtype``: passed as the build's ``dtype`` argument
    when it has one and the recipe sets none (a component loading its own weights reads
    them straight into that precision)."""
    registry = registry or get_registry()
    node = dict(node)
    name = node.pop("name", None)
    if name is None:
        raise RecipeError("component node has no `name`", key=f"model.{kind}")
    spec = registry.get(kind, name)
    for k, v in (derived or {}).items():
        if k in node and node[k] is not None and node[k] != v:
            raise RecipeError(f"{kind} '{name}' has {k}={node[k]} but the connected component gives {v}",
                              key=f"model.{kind}.{k}")
        node[k] = v
    for k, v in list(node.items()):
        if isinstance(v, str) and v.startswith("@"):
            node[k] = _asset(v, resolve, f"model.{kind}.{k}")
    if dtype is not None and node.get("dtype") is None and "dtype" in _build_params(spec.build):
        node["dtype"] = dtype
    from lisa_kit.checkpoint.io import empty_weights

    try:
        with empty_weights() if empty else nullcontext():
            comp = spec.build(**node)
    except TypeError as e:
        raise RecipeError(f"cannot build {kind} '{name}': {e}", key=f"model.{kind}") from e
    base = BASES[kind]
    if not isinstance(comp, base):
        raise RecipeError(f"{kind} '{name}' built a {type(comp).__name__}, which is not a {base.__name__}",
                          key=f"model.{kind}")
    return comp


def _build_params(build) -> set[str]:
    try:
        return set(inspect.signature(build).parameters)
    except (TypeError, ValueError):  # builtins without a signature
        return set()


def build_model(recipe, registry: Registry | None = None, resolve: dict | None = None, empty: Iterable[str] = (),
                dtype: torch.dtype | None = None) -> LisaModel:
    """Build the model a recipe describes (``recipe``: a loaded recipe, DictConfig or dict
    with a ``model`` section). Weights named by the components (``pretrained``,
    ``checkpoint``) are loaded by them; ``weights:`` is applied by :func:`load`.

    ``empty``: the kinds a checkpoint will fill, built without memory (meta parameters)
    unless their node names weights of its own; ``dtype``: the precision asked for, given
    to the builds that load their own weights and take a ``dtype`` (each keeps fp32 what its
    component declares: :func:`~lisa_kit.checkpoint.io.param_dtype`)."""
    cfg = _plain(getattr(recipe, "cfg", recipe))
    m = cfg["model"]
    empty = set(empty)

    def build(kind, derived=None):
        node = m[kind]
        own = names_weights(node)
        # Only weights read from files go straight into `dtype` (a cast, identical to casting
        # later, and never an fp32 copy of the model first); random initialisation stays in the
        # build's precision and is cast afterwards. The LLM's added vocabulary rows, drawn after
        # its load, come out bit-identical in `dtype` (transformers draws the whole resized
        # matrix; torch's normal draw in bf16/fp16 equals the fp32 draw rounded: tested).
        # A build that takes `dtype` applies its own rule per tensor (io.param_dtype).
        cast = dtype if own else None
        return build_component(kind, node, registry, derived=derived, resolve=resolve,
                               empty=kind in empty and not own, dtype=cast)

    from lisa_kit.geometry_answers import text_geometry_of

    registry = registry or get_registry()  # plugins loaded first: they may register answer formats
    geometry = text_geometry_of(m)  # a bad prompt_strategy / text_geometry fails before anything is built
    if geometry is not None and m.get("reject_token"):
        raise RecipeError("is not read with prompt_strategy: text_geometry (an answer listing no object says the "
                          "target is not there)", key="model.reject_token")
    vision = build("vision_encoder")
    llm = build("llm")
    fusion = build("fusion")
    mask_decoder = build("mask_decoder")
    if geometry is not None and not getattr(mask_decoder, "accepts_geometry", False):
        raise RecipeError(f"prompt_strategy text_geometry needs a mask decoder that takes box/point prompts; "
                          f"{m['mask_decoder'].get('name')!r} does not (accepts_geometry)", key="model.mask_decoder")
    projector = build("projector", {"in_dim": vision.feature_dim, "out_dim": llm.hidden_size})
    seg_head = build("seg_head", {"in_dim": llm.hidden_size, "out_dim": mask_decoder.prompt_dim})
    seg_token = m.get("seg_token", "[SEG]")
    # The order matters for released checkpoints: LISA added [SEG] first, then the
    # fusion's image tokens; ids come from the tokenizer, never from constants.
    # A reject token ([REJ], GSVA) comes last, so the ids of the others stay the released ones.
    reject = m.get("reject_token")
    llm.tokenizer.add_special_tokens([seg_token, *m.get("extra_tokens", []), *fusion.image_tokens(),
                                      *([reject] if reject else [])])
    llm.resize_vocab(len(llm.tokenizer))
    return LisaModel(vision, projector, llm, mask_decoder, fusion, seg_head, seg_token=seg_token,
                     seg_hidden=m.get("seg_hidden", "previous"), train_image_encoder=m.get("train_image_encoder", False),
                     recipe=cfg, seg_layers=m.get("seg_layers", "last"), reject_token=reject,
                     text_geometry=geometry)


def _overlay(derived: dict, given: dict) -> dict:
    """Recipe nodes over a checkpoint's derived ones: same name -> the recipe's keys win;
    another name -> the recipe's node replaces the derived one."""
    out = dict(derived)
    for key, node in given.items():
        if isinstance(node, dict) and isinstance(out.get(key), dict) and node.get("name") == out[key].get("name"):
            out[key] = {**out[key], **{k: v for k, v in node.items() if v is not None}}
        else:
            out[key] = node
    return out


def checkpoint_model(cfg: dict) -> dict:
    """The ``model`` section :func:`load` builds from a plain recipe dict: with
    ``weights.format`` ``lisa_hf`` or ``llava_hf`` the parts the checkpoint holds are
    derived from its config files (no weights are read) and the recipe's nodes go over
    them; otherwise ``cfg["model"]`` as it is. Recipe validation uses it to check sizes."""
    weights = cfg.get("weights") or {}
    fmt = weights.get("format", "none")
    m = cfg["model"]
    if fmt == "lisa_hf":
        from lisa_kit.checkpoint.lisa_hf import lisa_recipe

        sam = m["mask_decoder"].get("config") or m["mask_decoder"].get("variant")
        derived = lisa_recipe(weights["path"], vision_tower=m["vision_encoder"].get("pretrained"), sam=sam,
                              seg_hidden=m.get("seg_hidden", "previous"))
        given = {k: v for k, v in m.items() if k != "llm"}  # the LLM is the checkpoint's
        return _overlay(derived["model"], given)
    if fmt == "llava_hf":
        from lisa_kit.checkpoint.llava_hf import llava_recipe

        derived = llava_recipe(weights["path"])
        given = {k: v for k, v in m.items() if k not in derived}  # the tower, projector and LLM are the checkpoint's
        return {**derived, **given}
    return m


def load(recipe, overrides=(), registry: Registry | None = None, dtype: torch.dtype | None = None,
         device: torch.device | str | None = None, device_map=None) -> LisaModel:
    """Load the model a recipe names (a recipe name, path, loaded recipe or dict), applying
    its ``weights:`` section: ``lisa_hf`` (a released LISA checkpoint: the LLM, projector,
    seg head and SAM weights come from it, the CLIP tower from ``model.vision_encoder``),
    ``llava_hf``, ``lisa_kit`` (this library's own format) or none (components load what
    they name). The parts a checkpoint fills are built without memory and receive each
    tensor once, cast to ``dtype`` (the mask decoder keeps its own) on ``device``; a load
    that cannot fit is refused first. Without a checkpoint, weights are random (initialised
    as the components build them) and ``dtype``/``device`` are left to the caller.
    ``device_map`` (replaces ``device``; ``lisa_hf`` and ``lisa_kit`` weights): the LLM's
    decoder layers spread over several devices (:mod:`lisa_kit.checkpoint.device_map`)."""
    from lisa_kit.recipes import check_recipe, load_recipe, recipe_env_origins

    if not hasattr(recipe, "cfg") and not isinstance(recipe, dict):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        recipe = load_recipe(_plain(getattr(recipe, "cfg", recipe)), overrides)
    if hasattr(recipe, "cfg"):
        check_recipe(recipe, registry=registry)
    model = _load(recipe, registry, dtype, device, device_map)
    if hasattr(recipe, "cfg") and model.recipe is not None:
        # Which recipe nodes hold environment values (by structure), for whoever writes the
        # recipe to a file (checkpoint.native.save_model). A lisa_kit checkpoint's model
        # nodes keep the checkpoint's own; every other section is this recipe's.
        if (recipe.cfg.get("weights") or {}).get("format") != "lisa_kit":
            model.recipe_env = model.recipe_env or recipe_env_origins(recipe)
        else:
            own = {p: o for p, o in (model.recipe_env or {}).items() if p[:1] == ("model",)}
            given = {p: o for p, o in recipe_env_origins(recipe).items() if p[:1] != ("model",)}
            model.recipe_env = {**own, **given}
    return model


def _load(recipe, registry, dtype, device, device_map=None) -> LisaModel:
    cfg = _plain(getattr(recipe, "cfg", recipe))
    weights = cfg.get("weights") or {}
    fmt = weights.get("format", "none")
    if device_map is not None and fmt not in ("lisa_kit", "lisa_hf"):
        from lisa_kit.errors import InputError

        raise InputError(f"a device map places checkpoint weights as they are read: it needs a recipe whose "
                         f"weights.format is lisa_hf or lisa_kit, not {fmt!r}")
    if fmt == "lisa_kit":
        from lisa_kit.checkpoint.native import load_model

        model = load_model(weights["path"], registry, dtype=dtype, device=device, device_map=device_map)
        # The checkpoint's model nodes describe the weights it holds; the rest (name,
        # description, data, train, generation, …) is what this recipe asks for, so a run
        # started from these weights is saved and exported under its own name and settings.
        model.recipe = {**model.recipe, **copy.deepcopy({k: v for k, v in cfg.items() if k != "model"})}
        return model
    if fmt == "lisa_hf":
        from lisa_kit.checkpoint.lisa_hf import LISA_PARTS, ensure_lisa_memory, load_lisa_weights, plan_lisa

        full = {**cfg, "model": checkpoint_model(cfg)}
        if device_map is not None:
            device = plan_lisa(full, weights["path"], dtype, device_map, registry)
        else:
            ensure_lisa_memory(full, weights["path"], dtype, device)
        model = build_model(full, registry, empty=LISA_PARTS, dtype=dtype)
        load_lisa_weights(model, weights["path"], lora_alpha=weights.get("lora_alpha", 16), dtype=dtype,
                          device=device)
        return model
    if fmt == "llava_hf":
        from lisa_kit.checkpoint.io import ensure_memory
        from lisa_kit.checkpoint.llava_hf import LLAVA_PARTS, base_vocab_size, llava_bytes, load_llava_weights

        ensure_memory(llava_bytes(weights["path"], dtype), device, str(weights["path"]))
        model = build_model({**cfg, "model": checkpoint_model(cfg)}, registry, empty=LLAVA_PARTS, dtype=dtype)
        load_llava_weights(model, weights["path"], n_base_tokens=base_vocab_size(weights["path"]), dtype=dtype,
                           device=device)
        return model
    if fmt not in ("none", None):
        raise RecipeError(f"unknown weights format {fmt!r}; use lisa_hf, llava_hf, lisa_kit or none",
                          key="weights.format")
    return build_model(cfg, registry, dtype=dtype)


def checkpoint_kind(path) -> str | None:
    """What a directory holds: ``lisa_kit`` (``recipe.yaml``), ``lisa_hf`` (a released LISA
    model: ``model_type: llava`` with LISA's fields), ``llava_hf`` (transformers LLaVA),
    ``llava`` (original LLaVA without LISA's fields) or ``None``."""
    import json
    from pathlib import Path

    from lisa_kit.errors import CheckpointError

    path = Path(path)
    if (path / "recipe.yaml").exists():
        return "lisa_kit"
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        return None
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read config.json: {e}", file=cfg_file) from e
    if cfg.get("model_type") != "llava":
        return None
    if "text_config" in cfg:
        return "llava_hf"
    lisa_fields = ("out_dim", "train_mask_decoder", "seg_token_idx", "vision_pretrained")
    if any(k in cfg for k in lisa_fields) or any("LISA" in a for a in cfg.get("architectures") or []):
        return "lisa_hf"
    return "llava"


def load_checkpoint(path, vision_tower: str | None = None, sam=None, registry: Registry | None = None,
                    dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                    device_map=None) -> LisaModel:
    """A model from a directory, detected by :func:`checkpoint_kind`: lisa_kit's own
    format, or a released LISA checkpoint (the CLIP tower from ``vision_tower`` or its
    config; SAM sizes from ``sam`` or a ``sam_config.json`` next to the weights, default
    ViT-H). LLaVA directories have no trained seg head and are refused with a pointer
    to training. ``dtype``/``device``: see :func:`load`. ``device_map`` (replaces
    ``device``): the LLM's decoder layers spread over several devices
    (:mod:`lisa_kit.checkpoint.device_map`)."""
    from pathlib import Path

    from lisa_kit.errors import CheckpointError

    p = Path(path).expanduser()
    if not p.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {p}")
    kind = checkpoint_kind(p)
    if kind == "lisa_kit":
        from lisa_kit.checkpoint.native import load_model

        return load_model(p, registry, dtype=dtype, device=device, device_map=device_map)
    if kind == "lisa_hf":
        from lisa_kit.checkpoint.lisa_hf import import_lisa_hf

        return import_lisa_hf(p, vision_tower=vision_tower, sam=sam, registry=registry, dtype=dtype, device=device,
                              device_map=device_map)
    if kind == "llava_hf":
        raise CheckpointError(
            f"{p} is a transformers LLaVA checkpoint: it has no trained [SEG] head or mask decoder, so it cannot "
            "segment. It is a starting point for training (recipe lisa-llava15-7b, weights.format: llava_hf)",
            file=p / "config.json")
    if kind == "llava":
        raise CheckpointError(f"{p} is a LLaVA checkpoint without LISA's fields (out_dim, train_mask_decoder): "
                              "no seg head to segment with", file=p / "config.json")
    raise CheckpointError(f"{p} is not a checkpoint lisa_kit can run: expected recipe.yaml (lisa_kit's format) or "
                          "the config.json of a released LISA model (model_type llava)")
