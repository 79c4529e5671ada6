"""Recipe -> :class:`~lisa_kit.model.LisaModel`.

Each ``model.<kind>`` node names a registered component; its other keys are that
component's build arguments. Sizes that follow from other components are derived here
(projector ``in_dim``/``out_dim``, seg head ``in_dim``/``out_dim``); a recipe that also
states them must agree, and a mismatch names both sizes.
"""
from __future__ import annotations

from typing import Any

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


def build_component(kind: str, node: dict, registry: Registry | None = None, derived: dict | None = None,
                    resolve: dict | None = None) -> Any:
    """Build one component from its recipe node (``{"name": ..., **kwargs}``).

    ``derived`` values fill arguments the recipe left out; when the recipe gives one too
    they must be equal. ``resolve`` maps ``"@placeholder"`` string values to real ones
    (the conformance tests use it for tiny tokenizer paths)."""
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
        if isinstance(v, str) and v.startswith("@") and resolve and v in resolve:
            node[k] = resolve[v]
    try:
        comp = spec.build(**node)
    except TypeError as e:
        raise RecipeError(f"cannot build {kind} '{name}': {e}", key=f"model.{kind}") from e
    base = BASES[kind]
    if not isinstance(comp, base):
        raise RecipeError(f"{kind} '{name}' built a {type(comp).__name__}, which is not a {base.__name__}",
                          key=f"model.{kind}")
    return comp


def build_model(recipe, registry: Registry | None = None, resolve: dict | None = None) -> LisaModel:
    """Build the model a recipe describes (``recipe``: a loaded recipe, DictConfig or dict
    with a ``model`` section). Weights named by the components (``pretrained``,
    ``checkpoint``) are loaded by them; ``weights:`` is applied by
    :func:`lisa_kit.checkpoint.load_weights`."""
    cfg = _plain(getattr(recipe, "cfg", recipe))
    m = cfg["model"]
    vision = build_component("vision_encoder", m["vision_encoder"], registry, resolve=resolve)
    llm = build_component("llm", m["llm"], registry, resolve=resolve)
    fusion = build_component("fusion", m["fusion"], registry, resolve=resolve)
    mask_decoder = build_component("mask_decoder", m["mask_decoder"], registry, resolve=resolve)
    projector = build_component("projector", m["projector"], registry,
                                derived={"in_dim": vision.feature_dim, "out_dim": llm.hidden_size}, resolve=resolve)
    seg_head = build_component("seg_head", m["seg_head"], registry,
                               derived={"in_dim": llm.hidden_size, "out_dim": mask_decoder.prompt_dim},
                               resolve=resolve)
    seg_token = m.get("seg_token", "[SEG]")
    # The order matters for released checkpoints: LISA added [SEG] first, then the
    # fusion's image tokens; ids come from the tokenizer, never from constants.
    llm.tokenizer.add_special_tokens([seg_token, *m.get("extra_tokens", []), *fusion.image_tokens()])
    llm.resize_vocab(len(llm.tokenizer))
    return LisaModel(vision, projector, llm, mask_decoder, fusion, seg_head, seg_token=seg_token,
                     seg_hidden=m.get("seg_hidden", "previous"), train_image_encoder=m.get("train_image_encoder", False),
                     recipe=cfg)
