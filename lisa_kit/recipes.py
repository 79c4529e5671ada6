"""YAML recipes: which registered components make a model, and with which settings.

A recipe names components only (``model.<kind>.name``), never import paths or code;
new components come from plugins (:mod:`lisa_kit.registry`).

Loading (:func:`load_recipe`):

1. ``base:`` chains are followed (a path relative to the recipe, or a bare name looked
   up as ``<name>.yaml`` next to the recipe and then in :func:`recipe_dirs`).
2. Each child is merged over its base: mappings deep-merge and everything else
   (scalars, lists) is replaced, except that a component node ``model.<kind>`` whose
   ``name`` changes is replaced whole, so settings of the old component never leak
   into the new one.
3. Overrides apply in order, with the same merge rule: ``key=value`` (value parsed as
   YAML; sets or adds), ``+key=value`` (same), ``~key`` (delete; the key must exist).
   ``model.<kind>.name=<other>`` therefore resets that node to ``{name: <other>}``.

The result is a :class:`Recipe`: the merged ``cfg`` plus where every key was set
(``sources``), so problems name the file (or override) to fix.

Validation (:func:`validate_recipe`, :func:`check_recipe`) checks a recipe against the
registry's ``build`` signatures without building anything or reading weights.

Reading YAML from files (:func:`load_yaml_safely`: recipes, their bases, a checkpoint's
``recipe.yaml``) checks the document's events before anything is built: a document that
would expand (through anchors and aliases) past :data:`MAX_YAML_NODES` nodes, or is larger
than :data:`MAX_YAML_BYTES`, is refused, and errors give the file, line and problem, never
the file's content (a ``base:`` may point at any file).

Writing: values that came from the environment (``${oc.env:NAME}``, e.g. tokens) must
not end up in files. :func:`env_origins` finds, by structure, the nodes of a recipe whose
values come from the environment (directly or through node interpolations);
:func:`env_free` writes those nodes back as their interpolation text in data resolved from
the recipe; :func:`persisted_yaml` is the recipe as written to a run's or checkpoint's
``recipe.yaml``.
"""
from __future__ import annotations

import collections.abc
import copy
import datetime
import inspect
import io
import os
import re
import sys
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, OmegaConfBaseException

import lisa_kit
from lisa_kit import registry as _registry
from lisa_kit.errors import DuplicateComponentError, LisaKitError, RecipeError, UnknownComponentError
from lisa_kit.interfaces import KINDS, SEG_HIDDEN_CHOICES, SIZE_LINKS

__all__ = [
    "Recipe", "recipe_dirs", "list_recipes", "find_recipe", "load_recipe", "validate_recipe",
    "check_recipe", "missing_keys", "resolved_yaml", "RECIPE_PATH_ENV", "TOP_LEVEL_KEYS", "MODEL_KEYS",
    "load_yaml_safely", "env_free", "env_origins", "recipe_env_origins", "persisted_yaml", "MAX_YAML_NODES",
    "MAX_YAML_BYTES",
]

RECIPE_PATH_ENV = "LISA_KIT_RECIPE_PATH"
MISSING = "???"
# How ``weights:`` is read by :func:`lisa_kit.builder.load`.
WEIGHT_FORMATS = ("none", "lisa_hf", "llava_hf", "lisa_kit")

TOP_LEVEL_KEYS = ("base", "name", "description", "model", "weights", "loss", "generation",
                  "conversation", "data", "train", "eval", "precision", "bench")
MODEL_KEYS = KINDS + ("seg_token", "seg_hidden", "extra_tokens", "train_image_encoder", "seg_layers", "reject_token",
                      "prompt_strategy", "text_geometry")
_COMPONENT_PATHS = frozenset(f"model.{kind}" for kind in KINDS)
_HYDRA_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")
_DOTTED_MODULE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
# PyYAML (YAML 1.1) reads 1e-4 as a string; recipe files (OmegaConf's loader) do not.
_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")
# `?` is a YAML flow indicator, so `{path: ???}` does not parse; quote such values.
_FLOW_MISSING = re.compile(r"(?P<pre>[:\[,]\s*)\?\?\?(?P<post>\s*[,}\]])")


# A recipe is a few hundred nodes; anchors and aliases may repeat parts of it, but a
# document expanding past this many nodes is an alias bomb ("billion laughs").
MAX_YAML_NODES = 10_000
# Recipes are a few KiB; this bounds what is read before parsing at all.
MAX_YAML_BYTES = 4 * 1024 * 1024


def _quote_flow_missing(text: str) -> str:
    return _FLOW_MISSING.sub(r"\g<pre>'???'\g<post>", text)


def _yaml_problem(exc: Exception) -> str:
    """A YAML error as ``line L, column C: <problem>``: PyYAML's own message quotes the
    offending line, which must not be printed (the file may be anything, even a secret)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or type(exc).__name__
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def _check_yaml(text: str, origin: str, *, mapping: bool, invalid: str = "cannot read recipe") -> None:
    """Parse ``text`` to events only (nothing is constructed) and refuse it when its root
    is not a mapping (``mapping``) or it expands past :data:`MAX_YAML_NODES` nodes.

    Each node counts 1, an alias counts the expanded size of its anchor's node, so the
    count is the size of the data that loading would build."""
    anchors: dict[str, int] = {}
    open_nodes: list[tuple[int, str | None]] = []  # (count before the node, its anchor)
    expanded = 0
    root_seen = False
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.NodeEvent) and not root_seen:
                root_seen = True
                if mapping and not isinstance(event, yaml.MappingStartEvent):
                    kind = {yaml.SequenceStartEvent: "a list", yaml.AliasEvent: "an alias"}.get(type(event), "a scalar")
                    raise RecipeError(f"a recipe must be a YAML mapping, this document is {kind}", file=origin)
            if isinstance(event, yaml.CollectionStartEvent):
                open_nodes.append((expanded, event.anchor))
                expanded += 1
            elif isinstance(event, yaml.CollectionEndEvent):
                before, anchor = open_nodes.pop()
                if anchor is not None:
                    anchors[anchor] = expanded - before
            elif isinstance(event, yaml.ScalarEvent):
                expanded += 1
                if event.anchor is not None:
                    anchors[event.anchor] = 1
            elif isinstance(event, yaml.AliasEvent):
                expanded += anchors.get(event.anchor, 1)
            if expanded > MAX_YAML_NODES:
                raise RecipeError(f"YAML document expands past {MAX_YAML_NODES} nodes through its anchors "
                                  "and aliases; refused before loading it", file=origin)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{invalid}: not valid YAML: {_yaml_problem(exc)}", file=origin) from None


def load_yaml_safely(source: str | os.PathLike, *, origin: str | None = None) -> dict:
    """The YAML mapping in ``source`` as plain data, interpolations left as text.

    ``source``: a path (``pathlib.Path`` or any ``os.PathLike``) to read, or the YAML text
    itself (``str``). For recipe files and a checkpoint's ``recipe.yaml``: refuses
    (:class:`RecipeError` naming ``origin`` or the path) documents over
    :data:`MAX_YAML_BYTES`, expanding past :data:`MAX_YAML_NODES` nodes (alias bombs),
    invalid YAML and non-mappings -- before building anything, and without quoting
    the content. Numbers such as ``1e-4`` are floats and ``{path: ???}`` is allowed, as
    in recipe files.
    """
    if isinstance(source, os.PathLike):
        path = Path(source)
        origin = origin or str(path)
        try:
            if path.stat().st_size > MAX_YAML_BYTES:
                raise RecipeError(f"file is larger than {MAX_YAML_BYTES} bytes; not a recipe", file=origin)
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise RecipeError(f"cannot read recipe: not UTF-8 text (undecodable byte at offset {exc.start})",
                              file=origin) from None
        except OSError as exc:
            raise RecipeError(f"cannot read recipe: {exc.strerror or type(exc).__name__}", file=origin) from None
    else:
        text, origin = str(source), origin or "<yaml text>"
        if len(text) > MAX_YAML_BYTES:
            raise RecipeError(f"text is larger than {MAX_YAML_BYTES} characters; not a recipe", file=origin)
    text = _quote_flow_missing(text)
    _check_yaml(text, origin, mapping=True)
    try:
        raw = OmegaConf.load(io.StringIO(text))
    except yaml.YAMLError as exc:
        raise RecipeError(f"cannot read recipe: not valid YAML: {_yaml_problem(exc)}", file=origin) from None
    except OmegaConfBaseException as exc:  # e.g. duplicate keys; messages name keys, not values
        raise RecipeError(f"cannot read recipe: {str(exc).splitlines()[0]}", file=origin) from None
    if raw is None:  # an empty document
        return {}
    if not isinstance(raw, DictConfig):
        raise RecipeError("a recipe must be a YAML mapping", file=origin)
    return OmegaConf.to_container(raw, resolve=False)


@dataclass
class Recipe:
    """A loaded recipe.

    ``cfg``: the merged config (``base`` removed, interpolations left lazy);
    ``path``: the recipe file asked for (``None`` for an in-memory mapping);
    ``sources``: dotted key -> file or override that set it (see :meth:`source_of`);
    ``files``: the recipe file then its bases; ``overrides``: as applied.
    """

    cfg: DictConfig
    path: Path | None = None
    sources: dict[str, str] = field(default_factory=dict)
    files: tuple[Path, ...] = ()
    overrides: tuple[str, ...] = ()

    def source_of(self, key: str) -> str:
        """The file (or ``override '...'``) that set ``key`` or its closest parent."""
        key = re.sub(r"\[\d+\]", "", key)
        parts = key.split(".")
        while parts:
            origin = self.sources.get(".".join(parts))
            if origin is not None:
                return origin
            parts.pop()
        return str(self.path) if self.path else "<recipe>"


# -- finding ----------------------------------------------------------------------
def recipe_dirs() -> list[Path]:
    """``$LISA_KIT_RECIPE_PATH`` entries (``os.pathsep`` separated), then the repository's ``recipes/``."""
    dirs = [Path(p).expanduser() for p in os.environ.get(RECIPE_PATH_ENV, "").split(os.pathsep) if p]
    dirs.append(Path(lisa_kit.__file__).resolve().parent.parent / "recipes")
    return dirs


def list_recipes() -> dict[str, Path]:
    """Recipe name -> file for every ``*.yaml`` in :func:`recipe_dirs` (earlier dirs win)."""
    found: dict[str, Path] = {}
    for directory in recipe_dirs():
        if directory.is_dir():
            for path in sorted(directory.glob("*.yaml")):
                found.setdefault(path.stem, path)
    return dict(sorted(found.items()))


def _is_bare_name(text: str) -> bool:
    return "/" not in text and os.sep not in text and not text.startswith("~")


def _stem(name: str) -> str:
    return name[: -len(".yaml")] if name.endswith(".yaml") else name


def find_recipe(name_or_path: str | os.PathLike) -> Path:
    """An existing file as given, else ``<dir>/<name>.yaml`` from :func:`recipe_dirs`."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    text = str(name_or_path)
    if _is_bare_name(text):
        for directory in recipe_dirs():
            candidate = directory / f"{_stem(text)}.yaml"
            if candidate.is_file():
                return candidate
    available = ", ".join(list_recipes()) or "(none)"
    searched = ", ".join(str(d) for d in recipe_dirs())
    raise RecipeError(f"recipe {text!r} not found; available recipes: {available} "
                      f"(searched {searched}; add directories with ${RECIPE_PATH_ENV})")


def _find_base(base: str, child: Path | None, origin: str) -> Path:
    here = child.parent if child is not None else Path.cwd()
    candidate = Path(os.path.normpath(here / Path(base).expanduser()))  # no "sub/../" in messages
    if candidate.is_file():
        return candidate
    if _is_bare_name(base):
        sibling = here / f"{_stem(base)}.yaml"
        if sibling.is_file():
            return sibling
        try:
            return find_recipe(base)
        except RecipeError as exc:
            raise RecipeError(f"base {exc}", key="base", file=origin) from None
    raise RecipeError(f"base recipe {base!r} not found (relative to {here})", key="base", file=origin)


# -- loading and merging ------------------------------------------------------------
def _read(path: Path, *, base: bool = False) -> dict:
    data = load_yaml_safely(path)
    if base and data and not any(key in TOP_LEVEL_KEYS for key in data):
        # Name no key: a base: may point at any file; its keys are not ours to print.
        raise RecipeError(f"base file is not a recipe (none of its top-level keys is a recipe key: "
                          f"{', '.join(TOP_LEVEL_KEYS)})", file=str(path))
    return data


def _chain(data: dict, path: Path | None, origin: str, seen: list[Path]) -> list[tuple[str, dict]]:
    """``(origin, data)`` layers, base-most first; ``base`` keys are removed."""
    base = data.pop("base", None)
    if base is None:
        return [(origin, data)]
    if not isinstance(base, str) or not base or base == MISSING:
        raise RecipeError(f"base must be a recipe name or a path, got {base!r}", key="base", file=origin)
    base_path = _find_base(base, path, origin)
    resolved = base_path.resolve()
    if resolved in seen:
        cycle = " -> ".join(str(p) for p in [*seen, resolved])
        raise RecipeError(f"base recipes form a cycle: {cycle}", key="base", file=origin)
    return _chain(_read(base_path, base=True), base_path, str(base_path), [*seen, resolved]) + [(origin, data)]


def _record(sources: dict[str, str], path: str, value: Any, origin: str) -> None:
    sources[path] = origin
    if isinstance(value, dict):
        for key, item in value.items():
            _record(sources, f"{path}.{key}", item, origin)


def _forget(sources: dict[str, str], path: str) -> None:
    for key in [k for k in sources if k == path or k.startswith(path + ".")]:
        del sources[key]


def _renamed(path: str, old: dict, new: dict) -> bool:
    return path in _COMPONENT_PATHS and "name" in new and new["name"] != old.get("name")


def _merge(dst: dict, src: Mapping, origin: str, sources: dict[str, str], prefix: str = "") -> None:
    """Merge ``src`` into ``dst`` in place with the recipe rule (see module docstring)."""
    for key, value in src.items():
        path = f"{prefix}{key}"
        old = dst.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and not _renamed(path, old, value):
            _merge(old, value, origin, sources, path + ".")
        else:
            dst[key] = copy.deepcopy(value)
            _forget(sources, path)
            _record(sources, path, value, origin)


def _split_key(key: str, origin: str) -> list[str]:
    parts = key.strip().split(".")
    if not all(parts):
        raise RecipeError(f"bad key {key!r}", file=origin)
    if parts[0] == "base":
        raise RecipeError("base cannot be overridden; load the other recipe instead", key=key, file=origin)
    return parts


def _parse_value(raw: str, origin: str) -> Any:
    raw = raw.strip()
    if not raw:
        return ""
    _check_yaml(_quote_flow_missing(raw), origin, mapping=False, invalid=f"cannot parse value {raw!r} as YAML")
    try:
        value = yaml.safe_load(_quote_flow_missing(raw))
    except yaml.YAMLError as exc:
        raise RecipeError(f"cannot parse value {raw!r} as YAML: {_yaml_problem(exc)}", file=origin) from None
    return _normalize(value)


def _normalize(value: Any) -> Any:
    if isinstance(value, str) and _FLOAT.match(value):
        return float(value)
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()  # OmegaConf cannot hold dates
    if isinstance(value, list):
        return [_normalize(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalize(v) for k, v in value.items()}
    return value


def _apply_override(data: dict, text: str, sources: dict[str, str]) -> None:
    origin = f"override {text!r}"
    text = text.strip()
    if text.startswith("~"):
        if "=" in text:
            raise RecipeError("a deletion takes no value; write ~key", file=origin)
        parts = _split_key(text[1:], origin)
        node: Any = data
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or parts[-1] not in node:
            raise RecipeError("cannot delete: key is not in the recipe", key=text[1:], file=origin)
        del node[parts[-1]]
        _forget(sources, text[1:])
        return
    key, eq, raw = text.partition("=")
    if not eq:
        raise RecipeError("an override is key=value, +key=value or ~key", file=origin)
    parts = _split_key(key.lstrip("+"), origin)
    node = data
    for i, part in enumerate(parts[:-1]):
        node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, list):
            raise RecipeError("cannot set inside a list; set the whole list",
                              key=".".join(parts[: i + 1]), file=origin)
    nested: Any = _parse_value(raw, origin)
    for part in reversed(parts):
        nested = {part: nested}
    _merge(data, nested, origin, sources)


def load_recipe(source: str | os.PathLike | Mapping, overrides: Iterable[str] = ()) -> Recipe:
    """Load a recipe by name, path or as a mapping, follow ``base:`` and apply ``overrides``.

    Raises :class:`RecipeError` naming the file (or override) and key at fault.
    """
    if isinstance(source, DictConfig):
        source = OmegaConf.to_container(source, resolve=False)
    if isinstance(source, Mapping):
        path, origin, data = None, "<dict>", copy.deepcopy(dict(source))
    else:
        path = find_recipe(source)
        origin, data = str(path), _read(path)
    layers = _chain(data, path, origin, [path.resolve()] if path else [])
    merged: dict = {}
    sources: dict[str, str] = {}
    for layer_origin, layer in layers:
        _merge(merged, layer, layer_origin, sources)
    overrides = tuple(overrides)
    for text in overrides:
        _apply_override(merged, text, sources)
    try:
        cfg = OmegaConf.create(merged)
    except OmegaConfBaseException as exc:
        raise RecipeError(f"invalid recipe content: {exc}", file=origin) from None
    files = tuple(Path(o) for o, _ in reversed(layers) if o != "<dict>")
    return Recipe(cfg=cfg, path=path, sources=sources, files=files, overrides=overrides)


def _as_recipe(recipe: Recipe | DictConfig | Mapping | str | os.PathLike) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)


# -- values from the environment ----------------------------------------------------
_ENV_INTERPOLATION = re.compile(r"\$\{\s*oc\.env\s*:\s*([A-Za-z_][A-Za-z0-9_]*)")
# A plain node interpolation (``${data.root}``, ``${.sibling}``, ``${..uncle}``): it copies
# what it names, so it carries an environment value when that node does.
_NODE_INTERPOLATION = re.compile(r"\$\{\s*(\.*[A-Za-z_][A-Za-z0-9_.]*)\s*\}")
# Shorter environment values are replaced only where they are a whole value: inside longer
# text they would match unrelated characters (and are no secret worth hiding).
_MIN_EMBEDDED_ENV_VALUE = 6

NodePath = tuple  # a node's path: keys (str) and list indices (int)


def _string_nodes(data: Any, path: NodePath = ()) -> Iterator[tuple[NodePath, str]]:
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _string_nodes(v, (*path, k))
    elif isinstance(data, (list, tuple)):
        for i, v in enumerate(data):
            yield from _string_nodes(v, (*path, i))
    elif isinstance(data, str):
        yield path, data


def _ref_path(at: NodePath, ref: str) -> tuple[str, ...]:
    """The path (as strings) an interpolation ``ref`` written at node ``at`` names."""
    dots = len(ref) - len(ref.lstrip("."))
    parts = tuple(p for p in ref[dots:].split(".") if p)
    base = () if dots == 0 else tuple(str(k) for k in at[:len(at) - dots])
    return (*base, *parts)


def _overlaps(a: tuple, b: tuple) -> bool:
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def env_origins(raw: Any, resolved: Any = None) -> dict[NodePath, tuple[str, Any]]:
    """``path -> (text, value)`` of every string node of an unresolved recipe (``raw``: its
    container with interpolations as text) whose value comes from the environment: it
    interpolates ``${oc.env:NAME}`` itself, or names (through plain node interpolations, to
    any depth) a node that does or a section holding one. ``value``: the node's value in
    ``resolved`` (the same recipe resolved; ``None`` when not given). Tracked by structure:
    a literal that happens to equal an environment value is not one of them."""
    texts = {path: text for path, text in _string_nodes(raw) if "${" in text}
    env = {path for path, text in texts.items() if _ENV_INTERPOLATION.search(text)}
    keyed = {path: tuple(str(k) for k in path) for path in texts}
    changed = True
    while changed:
        changed = False
        for path, text in texts.items():
            if path in env:
                continue
            refs = [_ref_path(path, r) for r in _NODE_INTERPOLATION.findall(text)]
            if any(_overlaps(ref, keyed[e]) for ref in refs for e in env):
                env.add(path)
                changed = True
    return {path: (texts[path], _at(resolved, path)) for path in env}


_ABSENT = object()


def _at(data: Any, path: NodePath) -> Any:
    for k in path:
        try:
            data = data[k]
        except (KeyError, IndexError, TypeError):
            return _ABSENT
    return data


def env_free(data: Any, origins: dict[NodePath, tuple[str, Any]]) -> Any:
    """A copy of ``data`` (a recipe's resolved form, or anything keeping its layout) in which
    every node ``origins`` names (:func:`env_origins` of the recipe it was resolved from)
    and that still holds the value resolved there is written back as its interpolation text
    (``${oc.env:NAME}``, ``key ${oc.env:NAME}``, ``${data.root}``): what may be written to
    files. Other values are never touched."""
    out = copy.deepcopy(data)
    for path, (text, value) in origins.items():
        parent = _at(out, path[:-1]) if path else _ABSENT
        if parent is _ABSENT or _at(parent, path[-1:]) is _ABSENT:
            continue  # not in this data (a section it does not hold)
        current = parent[path[-1]]
        if isinstance(current, str) and (value is _ABSENT or current == value):
            parent[path[-1]] = text
    return out


def env_copies(origins: dict[NodePath, tuple[str, Any]], under: NodePath) -> dict[str, str]:
    """``value -> interpolation text`` for the environment-derived nodes under ``under``:
    what a component built from that node may have copied into what it exports (a
    ``pretrained`` path inside a saved config). Whole resolved values, and the environment
    values themselves (long enough to be told apart from other text)."""
    out: dict[str, str] = {}
    for path, (text, value) in origins.items():
        if path[:len(under)] != under:
            continue
        if isinstance(value, str) and value:
            out[value] = text
        for name in _ENV_INTERPOLATION.findall(text):
            env = os.environ.get(name)
            if env and len(env) >= _MIN_EMBEDDED_ENV_VALUE:
                out.setdefault(env, f"${{oc.env:{name}}}")
    return out


def replace_copies(data: Any, copies: dict[str, str]) -> Any:
    """``data`` with every string equal to a key of ``copies`` replaced by its value, and
    keys found inside longer strings replaced in place (see :func:`env_copies`)."""
    if isinstance(data, dict):
        return {k: replace_copies(v, copies) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [replace_copies(v, copies) for v in data]
    if isinstance(data, str) and copies:
        if data in copies:
            return copies[data]
        for value in sorted(copies, key=len, reverse=True):
            if len(value) >= _MIN_EMBEDDED_ENV_VALUE and value in data:
                data = data.replace(value, copies[value])
    return data


def recipe_env_origins(recipe: Recipe | DictConfig) -> dict[NodePath, tuple[str, Any]]:
    """:func:`env_origins` of a loaded recipe, with its resolved values."""
    cfg = recipe.cfg if isinstance(recipe, Recipe) else recipe
    return env_origins(OmegaConf.to_container(cfg, resolve=False), _resolve(cfg)[0])


# -- resolving ------------------------------------------------------------------
class _Unresolved:
    """Placeholder for a value whose interpolation failed (already reported)."""

    def __repr__(self) -> str:
        return "<unresolved>"


_UNRESOLVED = _Unresolved()


def _resolve(cfg: DictConfig) -> tuple[dict, list[str], list[tuple[str, str]]]:
    """Plain container with interpolations resolved where possible.

    Returns ``(data, missing_keys, errors)``: missing values (and interpolations to
    them) stay ``"???"``; failed interpolations become a placeholder and are listed
    in ``errors`` as ``(key, message)``. Unlike ``OmegaConf.to_container(resolve=True)``
    one bad value does not hide the rest.
    """
    missing: list[str] = []
    errors: list[tuple[str, str]] = []

    def child(node, key, path):
        if OmegaConf.is_missing(node, key):
            missing.append(path)
            return MISSING
        try:
            value = node[key]
        except InterpolationToMissingValueError:
            missing.append(path)
            return MISSING
        except OmegaConfBaseException as exc:
            errors.append((path, str(exc).splitlines()[0]))
            return _UNRESOLVED
        return walk(value, path)

    def walk(node, path):
        if isinstance(node, DictConfig):
            return {k: child(node, k, f"{path}.{k}" if path else str(k)) for k in node.keys()}
        if isinstance(node, ListConfig):
            return [child(node, i, f"{path}[{i}]") for i in range(len(node))]
        return node

    return walk(cfg, ""), missing, errors


def missing_keys(recipe: Recipe | DictConfig) -> list[str]:
    """Dotted keys whose value is still ``???`` (directly or through an interpolation)."""
    cfg = recipe.cfg if isinstance(recipe, Recipe) else recipe
    return sorted(_resolve(cfg)[1])


def resolved_yaml(recipe: Recipe | DictConfig) -> str:
    """The merged recipe as YAML, interpolations resolved; missing values print as ``???``."""
    cfg = recipe.cfg if isinstance(recipe, Recipe) else recipe
    data, _, errors = _resolve(cfg)
    if errors:
        key, message = errors[0]
        file = recipe.source_of(key) if isinstance(recipe, Recipe) else None
        raise RecipeError(f"cannot resolve interpolation: {message}", key=key, file=file)
    return OmegaConf.to_yaml(OmegaConf.create(data))


def persisted_yaml(recipe: Recipe | DictConfig) -> str:
    """:func:`resolved_yaml` with environment values kept as ``${oc.env:NAME}`` (see
    :func:`env_free`): what a run or a checkpoint writes as ``recipe.yaml``. Loading it
    again through :func:`load_recipe` resolves them from the environment of that time."""
    cfg = recipe.cfg if isinstance(recipe, Recipe) else recipe
    data, _, errors = _resolve(cfg)
    if errors:
        key, message = errors[0]
        file = recipe.source_of(key) if isinstance(recipe, Recipe) else None
        raise RecipeError(f"cannot resolve interpolation: {message}", key=key, file=file)
    return OmegaConf.to_yaml(OmegaConf.create(env_free(data, recipe_env_origins(cfg))))


# -- validation -----------------------------------------------------------------
def _looks_like_code(name: str) -> bool:
    return ":" in name or bool(_DOTTED_MODULE.match(name)) or name.endswith(".py") or "/" in name


def _parameters(build: Any) -> tuple[dict[str, inspect.Parameter], bool] | None:
    """Keyword-passable parameters of ``build`` and whether it takes ``**kwargs``."""
    try:
        signature = inspect.signature(build)
    except (TypeError, ValueError):
        return None  # e.g. some builtins: nothing to check against
    params = {n: p for n, p in signature.parameters.items()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    var_kw = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    return params, var_kw


def _annotation(build: Any, param: inspect.Parameter) -> Any:
    """The parameter's annotation as an object, or ``None`` when unknown/unevaluable."""
    annotation = param.annotation
    if annotation is inspect.Parameter.empty:
        return None
    if isinstance(annotation, str):  # ``from __future__ import annotations``
        module = sys.modules.get(getattr(build, "__module__", None) or "")
        try:
            annotation = eval(annotation, dict(vars(module)) if module else {})  # noqa: S307
        except Exception:
            return None  # names we cannot see (e.g. TYPE_CHECKING imports): leave unchecked
    return annotation


def _type_ok(value: Any, tp: Any) -> bool:
    """Whether ``value`` (plain YAML data) fits ``tp``; types we don't model always fit."""
    if tp is None or tp is Any:
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        return any(_type_ok(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin is typing.Literal:
        return value in args
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp in (list, tuple) or origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, list):  # YAML has no tuples: a list stands for one
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_type_ok(v, a) for v, a in zip(value, args))
        return not args or all(_type_ok(v, args[0]) for v in value)
    if tp is dict or origin in (dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            return False
        return len(args) != 2 or all(_type_ok(v, args[1]) for v in value.values())
    return True


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Checker:
    def __init__(self, recipe: Recipe, registry: _registry.Registry):
        self.recipe = recipe
        self.registry = registry
        self.problems: list[str] = []

    def report(self, key: str, message: str) -> None:
        self.problems.append(f"{self.recipe.source_of(key)}: {key}: {message}")

    def run(self, allow_missing: bool) -> list[str]:
        data, missing, errors = _resolve(self.recipe.cfg)
        for key, message in errors:
            self.report(key, f"cannot resolve interpolation: {message}")
        if not allow_missing:
            for key in missing:
                self.report(key, "value is missing (???); set it in the recipe or with key=value")
        for key in data:
            if key not in TOP_LEVEL_KEYS:
                self.report(str(key), f"unknown top-level key; allowed: {', '.join(TOP_LEVEL_KEYS)}")
        for key in ("name", "description"):
            if key in data and not isinstance(data[key], str):
                self.report(key, f"expected str, got {type(data[key]).__name__} {_short(data[key])}")
        for key in ("weights", "loss", "generation", "conversation"):
            if data.get(key) not in (None, MISSING) and not isinstance(data[key], dict):
                self.report(key, "must be a mapping")
        weights = data.get("weights")
        if isinstance(weights, dict) and weights.get("format", "none") not in (*WEIGHT_FORMATS, MISSING, _UNRESOLVED):
            self.report("weights.format", f"unknown weights format {_short(weights['format'])}; "
                        f"formats: {', '.join(WEIGHT_FORMATS)}")
        if isinstance(data.get("loss"), dict):
            for key, value in data["loss"].items():
                if value not in (MISSING, _UNRESOLVED) and not _type_ok(value, float):
                    self.report(f"loss.{key}", f"expected a number, got {_short(value)}")
        self.check_sections(data)
        model = data.get("model")
        if model is None:
            self.report("model", f"missing; a recipe names its components under model: ({', '.join(KINDS)})")
        elif isinstance(model, dict):
            self.check_model(model)
            self.check_sizes(data, model)
        elif model not in (MISSING, _UNRESOLVED):
            self.report("model", "must be a mapping of component kind -> {name: ..., <build arguments>}")
        return self.problems

    # -- the sections other loaders read (generation, conversation, data, train) ------------------
    def check_sections(self, data: dict) -> None:
        """Every key the loaders of these sections read, by type and choice: a value that
        would crash a command at load time (``generation.max_new_tokens: lots``) is
        reported here, naming the key and file."""
        for section, fields in _section_fields().items():
            node = data.get(section)
            if not isinstance(node, dict):
                continue  # absent, or "must be a mapping" reported above
            for key, value in node.items():
                path = f"{section}.{key}"
                if key not in fields:
                    self.report(path, f"unknown key; {section} takes: {', '.join(fields)}")
                elif _complete(value) and not (value is None and fields[key][1]):
                    problem = fields[key][0](value, path)
                    if problem is not None:
                        self.report(*problem)
        self.check_train(data)

    def check_train(self, data: dict) -> None:
        """``train:`` and ``precision`` through the training loop's own reader
        (:meth:`lisa_kit.train.config.TrainConfig.from_recipe`, no model built)."""
        from lisa_kit.train.config import PRECISIONS, TrainConfig

        top = data.get("precision")  # the training default when train.precision is unset: wrong either way
        if top is not None and _complete(top) and top not in PRECISIONS:
            self.report("precision", f"must be one of {', '.join(PRECISIONS)}, got {_short(top)}")
            return
        node = {key: data[key] for key in ("train", "precision") if key in data}
        if not node or not _complete(node) or ("train" in node and not isinstance(node["train"], (dict, type(None)))):
            return

        try:
            TrainConfig.from_recipe(node)
        except RecipeError as exc:
            key = exc.key or "train"
            message = str(exc)
            prefix = f"{key}: "
            self.report(key, message[len(prefix):] if message.startswith(prefix) else message)

    def check_model(self, model: dict) -> None:
        for key in model:
            if key not in MODEL_KEYS:
                self.report(f"model.{key}", f"unknown key; model takes: {', '.join(MODEL_KEYS)}")
        for kind in KINDS:
            path = f"model.{kind}"
            node = model.get(kind)
            if node is None:
                self.report(path, f"missing; every recipe names all components: {', '.join(KINDS)}")
            elif isinstance(node, dict):
                self.check_component(kind, node, path)
            elif node not in (MISSING, _UNRESOLVED):
                self.report(path, f"must be a mapping like {{name: <registered {kind}>, ...}}, got {_short(node)}")
        seg_hidden = model.get("seg_hidden", MISSING)
        if seg_hidden not in (MISSING, _UNRESOLVED) and seg_hidden not in SEG_HIDDEN_CHOICES:
            self.report("model.seg_hidden", f"must be one of {', '.join(SEG_HIDDEN_CHOICES)}, got {_short(seg_hidden)}")
        seg_token = model.get("seg_token", MISSING)
        if seg_token not in (MISSING, _UNRESOLVED) and not (isinstance(seg_token, str) and seg_token):
            self.report("model.seg_token", f"must be a non-empty string, got {_short(seg_token)}")
        reject = model.get("reject_token")
        if reject not in (None, MISSING, _UNRESOLVED) and not (isinstance(reject, str) and reject):
            self.report("model.reject_token", f"must be a non-empty string or null, got {_short(reject)}")
        layers = model.get("seg_layers", MISSING)
        is_index = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        if layers not in (MISSING, _UNRESOLVED, "last", "mix") and not is_index(layers) and not (
                isinstance(layers, list) and layers and all(is_index(v) for v in layers)):
            self.report("model.seg_layers", f"must be last, mix, a layer index or a list of layer indices, "
                        f"got {_short(layers)}")
        self.check_prompt_strategy(model)

    def check_prompt_strategy(self, model: dict) -> None:
        """``model.prompt_strategy`` / ``text_geometry`` (:mod:`lisa_kit.geometry_answers`): a
        known strategy and answer format, a decoder that takes box/point prompts (when its
        spec names its class), and the ``none`` seg head only where no ``[SEG]`` is read."""
        from lisa_kit.geometry_answers import SEG_TOKEN, text_geometry_of

        node = {k: model.get(k) for k in ("prompt_strategy", "text_geometry")}
        if not _complete(node):
            return
        try:
            geometry = text_geometry_of(node)
        except RecipeError as exc:
            key = exc.key or "model.prompt_strategy"
            message, prefix = str(exc), f"{key}: "
            self.report(key, message[len(prefix):] if message.startswith(prefix) else message)
            return
        if geometry is not None and model.get("reject_token") not in (None, MISSING, _UNRESOLVED):
            self.report("model.reject_token", "is not read with prompt_strategy: text_geometry (an answer that "
                        "lists no object is how such a model says the target is not there)")
        head = model.get("seg_head")
        if geometry is None and isinstance(head, dict) and head.get("name") == "none":
            self.report("model.seg_head.name", f"'none' is for prompt_strategy: text_geometry; with {SEG_TOKEN} "
                        "every [SEG] needs a seg head (e.g. mlp2)")
        dec = model.get("mask_decoder")
        name = dec.get("name") if isinstance(dec, dict) else None
        if geometry is None or not isinstance(name, str) or (("mask_decoder", name) not in self.registry):
            return
        try:
            cls = self.registry.get("mask_decoder", name).component_class
        except LisaKitError:
            return
        if cls is not None and not getattr(cls, "accepts_geometry", False):
            self.report("model.mask_decoder.name", f"{name!r} takes no box/point prompts (accepts_geometry), which "
                        "prompt_strategy: text_geometry needs")
        elif cls is not None and geometry.points and not getattr(cls, "accepts_points", True):
            self.report("model.text_geometry.points", f"{name!r} takes boxes only (accepts_points is false); set "
                        "points: false")

    def check_component(self, kind: str, node: dict, path: str) -> None:
        name = node.get("name")
        available = ", ".join(self.registry.names(kind)) or "(none registered)"
        if name is None:
            self.report(f"{path}.name", f"missing; registered {kind} components: {available}")
            return
        if name is MISSING or name is _UNRESOLVED:
            return
        if not isinstance(name, str):
            self.report(f"{path}.name", f"expected a component name (str), got {_short(name)}")
            return
        if (kind, name) in self.registry.ambiguous:  # two installed plugins provide it
            try:
                self.registry.get(kind, name)
            except DuplicateComponentError as exc:
                self.report(f"{path}.name", str(exc))
            return
        if (kind, name) not in self.registry:
            if _looks_like_code(name):
                self.report(f"{path}.name", f"{name!r} looks like an import path; recipes name registered "
                            f"components only (registered {kind} components: {available}). New components "
                            "are added by plugins through the 'lisa_kit' entry-point group")
            else:
                error = UnknownComponentError(kind, name, self.registry.names(kind), self.registry.failure_hint())
                self.report(f"{path}.name", str(error))
            return
        spec = self.registry.get(kind, name)
        found = _parameters(spec.build)
        if found is None:
            return
        params, var_kw = found
        for key, value in node.items():
            key_path = f"{path}.{key}"
            if key == "name":
                continue
            if key in _HYDRA_KEYS:
                self.report(key_path, "recipes name registered components only; "
                            "Hydra-style instantiation keys are not supported")
                continue
            param = params.get(key)
            if param is None:
                if not var_kw:
                    accepted = ", ".join(params) or "(nothing)"
                    self.report(key_path, f"not a parameter of {kind} {name!r} (it accepts: {accepted})")
                continue
            if value is MISSING or value is _UNRESOLVED:
                continue
            expected = _annotation(spec.build, param)
            # A None default documents "optional" even where the annotation forgot it.
            if not (value is None and param.default is None) and not _type_ok(value, expected):
                self.report(key_path, f"expected {_type_name(expected)}, got {type(value).__name__} {_short(value)}")
        for pname, param in params.items():
            if param.default is inspect.Parameter.empty and pname not in node and pname not in spec.derived:
                self.report(f"{path}.{pname}", f"required by {kind} {name!r} but not set")


    # -- sizes of connected components ------------------------------------------------
    def check_sizes(self, data: dict, model: dict) -> None:
        """Sizes written for one component against those another one gives (SIZE_LINKS),
        from the components' ``sizes`` functions (configs only, no weights). A component
        without ``sizes``, or with a value still missing, is not checked."""
        found = self._size_nodes(data, model)
        if found is None:
            return
        nodes, held = found
        known: dict[str, dict] = {}
        for consumer, arg, producer, size in SIZE_LINKS:
            node = nodes.get(consumer)
            value = node.get(arg) if isinstance(node, dict) else None
            if not isinstance(value, int) or isinstance(value, bool):
                continue  # not written (derived by the builder), or a type error reported above
            if producer not in known:
                known[producer] = self._sizes(producer, nodes.get(producer))
            given = known[producer].get(size)
            if given is None or given == value:
                continue
            pnode = nodes[producer]
            written = isinstance(model.get(consumer), dict) and model[consumer].get(arg) == value
            source = "" if written else " (from the checkpoint at weights.path)"
            hint = f"; leave model.{consumer}.{arg} out to have it derived" if written else ""
            self.report(f"model.{consumer}.{arg}",
                        f"{arg}={value}{source} does not match {size}={given} of model.{producer} "
                        f"({pnode['name']}{', from weights.path' if producer in held else ''}){hint}")

    def _size_nodes(self, data: dict, model: dict) -> tuple[dict, tuple[str, ...]] | None:
        """The component nodes the builder would use and the kinds a checkpoint supplies:
        ``lisa_hf``/``llava_hf`` checkpoints are read from their config files; ``lisa_kit``
        checkpoints carry their own recipe (``None``: nothing to check here)."""
        weights = data.get("weights") if isinstance(data.get("weights"), dict) else {}
        fmt = weights.get("format", "none")
        if fmt == "lisa_kit":
            return None
        held = _CHECKPOINT_PARTS.get(fmt, ())
        if not held:
            return model, held
        from lisa_kit.builder import checkpoint_model

        path = weights.get("path")
        if isinstance(path, str) and path != MISSING and (Path(path) / "config.json").is_file():
            try:
                return checkpoint_model({**data, "model": model}), held
            except Exception:  # noqa: BLE001 - the loader reports an unusable checkpoint; check what is known
                pass
        # Without a readable checkpoint, the parts it would supply are unknown.
        return {k: v for k, v in model.items() if k not in held}, held

    def _sizes(self, kind: str, node: Any) -> dict:
        """``spec.sizes(**node)`` for a registered component whose values are all known, else ``{}``."""
        name = node.get("name") if isinstance(node, dict) else None
        if not isinstance(name, str) or (kind, name) not in self.registry:
            return {}
        spec = self.registry.get(kind, name)
        kwargs = {k: v for k, v in node.items() if k != "name"}
        if spec.sizes is None or not _complete(kwargs):
            return {}
        try:
            sizes = spec.sizes(**kwargs)
        except Exception as exc:  # noqa: BLE001 - a config the build would fail on too
            self.report(f"model.{kind}", f"cannot tell the sizes of {kind} {name!r}: {type(exc).__name__}: {exc}")
            return {}
        if not isinstance(sizes, Mapping):
            self.report(f"model.{kind}", f"{kind} {name!r}: its sizes() returned {_short(sizes)}, not a dict")
            return {}
        return {k: v for k, v in sizes.items() if isinstance(v, int) and not isinstance(v, bool)}


# -- checks of single values in the generation, conversation and data sections ---------------
# Each check takes (value, key) and returns None (fine) or (key at fault, message).
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value, key):
    return None if _is_int(value) and value > 0 else (key, f"expected a positive int, got {_short(value)}")


def _boolean(value, key):
    return None if isinstance(value, bool) else (key, f"expected true or false, got {_short(value)}")


def _text(value, key):
    return None if isinstance(value, str) and value else (key, f"expected a non-empty string, got {_short(value)}")


def _any_text(value, key):
    return None if isinstance(value, str) else (key, f"expected a string (may be empty), got {_short(value)}")


def _probability_or_off(value, key):
    ok = _type_ok(value, float) and value <= 1
    return None if ok else (key, f"expected a probability (<= 1; negative: none), got {_short(value)}")


def _template(value, key):
    from lisa_kit.conversation import TEMPLATE_NAMES

    if isinstance(value, str) and value in TEMPLATE_NAMES:
        return None
    return key, f"unknown conversation template {_short(value)}; templates: {', '.join(TEMPLATE_NAMES)}"


def _phrasing(value, key):
    from lisa_kit.prompts import PHRASINGS

    return None if value in PHRASINGS else (key, f"expected one of {', '.join(PHRASINGS)}, got {_short(value)}")


def _explain_first(value, key):
    from lisa_kit.prompts import EXPLAIN_AFTER_NAME

    ok = isinstance(value, bool) or value == EXPLAIN_AFTER_NAME
    return None if ok else (key, f"expected true, false or {EXPLAIN_AFTER_NAME}, got {_short(value)}")


def _multi_seg(value, key):
    from lisa_kit.prompts import MultiSeg

    try:
        MultiSeg.from_config(value, key=key)
    except RecipeError as exc:
        message = str(exc)
        return exc.key or key, message.split(": ", 1)[1] if message.startswith(f"{exc.key}: ") else message
    return None


_SOURCE_KEYS = ("datasets", "rate", "split", "options")


def _sources(value, key):
    """``data.sources``: ``{group: {datasets: [registered reader names], rate, split, options}}``."""
    from lisa_kit.datasets import dataset_names

    if not isinstance(value, dict) or not value:
        return key, f"expected a mapping of source groups, got {_short(value)}"
    known = dataset_names()
    for group, node in value.items():
        path = f"{key}.{group}"
        if not isinstance(node, dict):
            return path, f"expected a mapping with {', '.join(_SOURCE_KEYS)}, got {_short(node)}"
        unknown = [k for k in node if k not in _SOURCE_KEYS]
        if unknown:
            return f"{path}.{unknown[0]}", f"unknown key; a source takes: {', '.join(_SOURCE_KEYS)}"
        names = node.get("datasets", [group])
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            return f"{path}.datasets", f"expected a list of dataset names, got {_short(names)}"
        for name in names:
            if name not in known:
                return f"{path}.datasets", f"unknown dataset {name!r}; datasets: {', '.join(known)}"
        rate = node.get("rate", 1)
        if not (_type_ok(rate, float) and rate >= 0):
            return f"{path}.rate", f"expected a number >= 0, got {_short(rate)}"
        if node.get("split") is not None and not isinstance(node["split"], str):
            return f"{path}.split", f"expected a split name (str) or null, got {_short(node['split'])}"
        if node.get("options") is not None and not isinstance(node["options"], dict):
            return f"{path}.options", f"expected a mapping of reader options, got {_short(node['options'])}"
    return None


def _section_fields() -> dict[str, dict[str, tuple]]:
    """section -> key -> (check, null allowed): the keys the loaders read
    (``generation``: api/cli.segment/cli.eval; ``conversation``: every template user;
    ``data``: :func:`lisa_kit.datasets.hybrid.hybrid_from_config`)."""
    return {
        "generation": {"max_new_tokens": (_positive_int, False)},
        "conversation": {"template": (_template, False), "system": (_any_text, False)},
        "data": {
            "root": (_text, True),
            "samples_per_epoch": (_positive_int, False),
            "classes_per_sample": (_positive_int, False),
            "explanatory": (_probability_or_off, False),
            "explain_first": (_explain_first, False),
            "phrasing": (_phrasing, False),
            "multi_seg": (_multi_seg, True),
            "sources": (_sources, True),
        },
    }


# The parts a checkpoint of each weights.format supplies in place of the recipe's nodes
# (lisa_kit.builder.checkpoint_model).
_CHECKPOINT_PARTS = {"lisa_hf": ("llm",), "llava_hf": ("vision_encoder", "projector", "llm")}


def _complete(value: Any) -> bool:
    """No ``???`` or failed interpolation anywhere inside ``value``."""
    if value is _UNRESOLVED or (isinstance(value, str) and value == MISSING):
        return False
    if isinstance(value, dict):
        return all(_complete(v) for v in value.values())
    if isinstance(value, list):
        return all(_complete(v) for v in value)
    return True


def validate_recipe(recipe: Recipe | DictConfig | Mapping | str | os.PathLike,
                    registry: _registry.Registry | None = None, *, allow_missing: bool = False) -> list[str]:
    """Problems of ``recipe``, each ``"<file>: <key>: <message>"``; empty means valid.

    Builds nothing and reads no weights. ``allow_missing`` accepts ``???`` values
    (shipped recipes leave e.g. ``weights.path`` to the user); list them with
    :func:`missing_keys`. ``registry`` defaults to :func:`lisa_kit.registry.get_registry`.
    """
    recipe = _as_recipe(recipe)
    if registry is None:
        registry = _registry.get_registry()
    return _Checker(recipe, registry).run(allow_missing)


def check_recipe(recipe: Recipe | DictConfig | Mapping | str | os.PathLike,
                 registry: _registry.Registry | None = None, *, allow_missing: bool = False) -> Recipe:
    """:func:`validate_recipe`, raising :class:`RecipeError` with every problem; returns the recipe."""
    recipe = _as_recipe(recipe)
    problems = validate_recipe(recipe, registry, allow_missing=allow_missing)
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        plural = "s" if len(problems) > 1 else ""
        raise RecipeError(f"invalid recipe ({len(problems)} problem{plural}):\n{listing}",
                          file=str(recipe.path) if recipe.path else None, problems=problems)
    return recipe
