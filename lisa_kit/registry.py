"""Component registry: finds plugins through entry points and indexes their components.

Every component, built-in ones included, comes from a plugin named in the ``lisa_kit``
entry-point group (see ``pyproject.toml``). A plugin implements the
``lisa_kit_components`` hook (:mod:`lisa_kit.hookspecs`) and returns
:class:`~lisa_kit.interfaces.ComponentSpec` objects.

Discovery is fault tolerant: a plugin that fails to import or returns bad specs is
recorded in :attr:`Registry.plugins` with its error (and a :class:`PluginWarning` is
issued) while the other plugins keep working. Two plugins providing the same
``(kind, name)`` is an error (:class:`DuplicateComponentError`), because which one
wins would depend on install order.

Set ``LISA_KIT_DISABLE_PLUGIN_AUTOLOAD=1`` to load only lisa-kit's own entry points;
third-party ones are then listed as skipped.
"""
from __future__ import annotations

import importlib.metadata
import os
import re
import threading
import traceback
import types
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pluggy

from lisa_kit import hookspecs
from lisa_kit.errors import (
    DuplicateComponentError,
    PluginError,
    PluginWarning,
    UnknownComponentError,
    UnknownKindError,
)
from lisa_kit.interfaces import KINDS, ComponentSpec

DISABLE_AUTOLOAD_ENV = "LISA_KIT_DISABLE_PLUGIN_AUTOLOAD"
OWN_DISTRIBUTION = "lisa-kit"

__all__ = ["PluginInfo", "Registry", "get_registry", "DISABLE_AUTOLOAD_ENV"]


@dataclass
class PluginInfo:
    """What is known about one plugin, loaded or not.

    ``name`` is the entry-point name (or the name given to :meth:`Registry.register`),
    ``module`` what it points at, ``components`` the ``(kind, name)`` pairs it
    provides, ``error`` why it failed (``None`` when it loaded), ``skipped`` whether
    autoload was disabled for it.
    """

    name: str
    module: str
    distribution: str
    version: str
    components: list[tuple[str, str]] = field(default_factory=list)
    error: str | None = None
    skipped: bool = False
    traceback: str | None = field(default=None, repr=False)

    @property
    def status(self) -> str:
        """``"ok"``, ``"skipped"`` or ``"FAILED: <error>"``."""
        if self.skipped:
            return "skipped"
        return f"FAILED: {self.error}" if self.error else "ok"

    def describe(self) -> str:
        """Who provides it, for error messages: ``dist version (plugin 'name')``."""
        version = f" {self.version}" if self.version else ""
        return f"{self.distribution}{version} (plugin {self.name!r})"


def _canonical(dist_name: str) -> str:
    return re.sub(r"[-_.]+", "-", dist_name).lower()


def _autoload_disabled() -> bool:
    value = os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


class _BadPlugin(Exception):
    """Internal: the plugin's hook result is unusable; the message says why."""


class Registry:
    """Components by kind and name, with the plugin each came from.

    ``Registry()`` / :meth:`empty` loads nothing; :meth:`discover` loads the installed
    entry points; :func:`get_registry` returns the cached default (discovered) one.
    """

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._table: dict[str, dict[str, tuple[ComponentSpec, PluginInfo]]] = {k: {} for k in KINDS}
        self._plugins: list[PluginInfo] = []

    # -- construction -------------------------------------------------------------
    @classmethod
    def empty(cls) -> Registry:
        """A registry with no plugins (for tests and programmatic use)."""
        return cls()

    @classmethod
    def discover(cls, group: str = hookspecs.ENTRY_POINT_GROUP, *, autoload: bool | None = None,
                 entry_points: Iterable[importlib.metadata.EntryPoint] | None = None) -> Registry:
        """Load every plugin of the entry-point ``group`` (or the given ``entry_points``).

        ``autoload=False`` loads only lisa-kit's own entry points; ``None`` reads
        ``LISA_KIT_DISABLE_PLUGIN_AUTOLOAD``. Raises :class:`DuplicateComponentError`.
        """
        if autoload is None:
            autoload = not _autoload_disabled()
        registry = cls()
        eps = importlib.metadata.entry_points(group=group) if entry_points is None else entry_points

        def order(ep):  # built-ins first, then a stable order independent of sys.path
            dist = _canonical(ep.dist.name or "") if ep.dist else ""
            return (dist != OWN_DISTRIBUTION, dist, ep.name)

        for ep in sorted(eps, key=order):
            registry._load_entry_point(ep, autoload)
        return registry

    def _load_entry_point(self, ep: importlib.metadata.EntryPoint, autoload: bool) -> None:
        dist_name = (ep.dist.name if ep.dist else None) or "<unknown>"
        info = PluginInfo(name=ep.name, module=ep.value, distribution=dist_name,
                          version=ep.dist.version if ep.dist else "")
        self._plugins.append(info)
        if not autoload and _canonical(dist_name) != OWN_DISTRIBUTION:
            info.skipped = True
            return
        try:
            plugin = ep.load()
        except Exception as exc:  # any import-time failure must not take the others down
            info.error = f"{type(exc).__name__}: {exc}"
            info.traceback = traceback.format_exc()
            warnings.warn(f"lisa_kit plugin {info.describe()} failed to load: {info.error}",
                          PluginWarning, stacklevel=3)
            return
        # Qualify by distribution: two dists may well reuse an entry-point name.
        self._add(plugin, info, pm_name=f"{dist_name}:{ep.name}")
        if info.error:
            warnings.warn(f"lisa_kit plugin {info.describe()} is broken: {info.error}",
                          PluginWarning, stacklevel=3)

    def register(self, obj: Any, name: str, distribution: str = "<local>", version: str = "") -> PluginInfo:
        """Add a plugin object (module or instance with a ``lisa_kit_components`` hookimpl).

        Raises :class:`PluginError` if the plugin is broken and
        :class:`DuplicateComponentError` if it clashes with a registered component;
        in both cases the registry is left unchanged.
        """
        if isinstance(obj, types.ModuleType):
            module = obj.__name__
        else:
            cls = obj if isinstance(obj, type) else type(obj)
            module = f"{cls.__module__}.{cls.__qualname__}"
        info = PluginInfo(name=name, module=module, distribution=distribution, version=version)
        self._plugins.append(info)
        self._add(obj, info, pm_name=f"{distribution}:{name}")
        if info.error:
            self._forget(info)
            raise PluginError(f"plugin {info.describe()}: {info.error}")
        return info

    def _add(self, plugin: Any, info: PluginInfo, *, pm_name: str) -> None:
        """Register ``plugin``, call its hook and index its specs (all or nothing).

        ``info`` is already in ``self._plugins``; problems are recorded in ``info.error``.
        """
        try:
            self._pm.register(plugin, name=pm_name)
        except Exception as exc:  # ValueError (already registered) or PluginValidationError
            info.error = f"cannot register: {exc}"
            return
        try:
            specs = self._call_hook(plugin)
            self._check_duplicates(specs, info)
        except _BadPlugin as exc:
            info.error = str(exc)
        except DuplicateComponentError:
            self._pm.unregister(plugin)
            self._forget(info)
            raise
        except Exception as exc:  # the plugin's own hook code raised
            info.error = f"lisa_kit_components() raised {type(exc).__name__}: {exc}"
            info.traceback = traceback.format_exc()
        if info.error:
            self._pm.unregister(plugin)
            return
        for spec in specs:
            self._table[spec.kind][spec.name] = (spec, info)
            info.components.append((spec.kind, spec.name))

    def _forget(self, info: PluginInfo) -> None:
        self._plugins = [p for p in self._plugins if p is not info]

    def _call_hook(self, plugin: Any) -> list[ComponentSpec]:
        # Call this plugin's implementation directly so each spec is attributed to it.
        impls = [i for i in self._pm.hook.lisa_kit_components.get_hookimpls() if i.plugin is plugin]
        if not impls:
            raise _BadPlugin("implements no lisa_kit_components hook (missing @lisa_kit.hookimpl?)")
        specs: list[ComponentSpec] = []
        for impl in impls:
            result = impl.function()
            if result is None or isinstance(result, (ComponentSpec, str, bytes)):
                raise _BadPlugin(f"lisa_kit_components() must return a list of ComponentSpec, got {result!r}")
            specs.extend(result)
        problems = []
        for spec in specs:
            if not isinstance(spec, ComponentSpec):
                problems.append(f"not a ComponentSpec: {spec!r}")
            elif spec.kind not in KINDS:
                problems.append(f"component {spec.name!r} has unknown kind {spec.kind!r} "
                                f"(kinds are: {', '.join(KINDS)})")
            elif not isinstance(spec.name, str) or not spec.name:
                problems.append(f"{spec.kind} component has an invalid name {spec.name!r}")
            elif not callable(spec.build):
                problems.append(f"component {spec.kind}:{spec.name} has a non-callable build {spec.build!r}")
        if problems:
            raise _BadPlugin("; ".join(problems))
        return specs

    def _check_duplicates(self, specs: list[ComponentSpec], info: PluginInfo) -> None:
        seen: set[tuple[str, str]] = set()
        for spec in specs:
            key = (spec.kind, spec.name)
            if key in seen:
                raise DuplicateComponentError(spec.kind, spec.name, info.describe(), info.describe())
            seen.add(key)
            if spec.name in self._table[spec.kind]:
                other = self._table[spec.kind][spec.name][1]
                raise DuplicateComponentError(spec.kind, spec.name, other.describe(), info.describe())

    # -- queries ------------------------------------------------------------------
    def _kind(self, kind: str) -> dict[str, tuple[ComponentSpec, PluginInfo]]:
        if kind not in self._table:
            raise UnknownKindError(kind, KINDS)
        return self._table[kind]

    def get(self, kind: str, name: str) -> ComponentSpec:
        """The spec registered as ``kind``/``name`` (:class:`UnknownComponentError` if none)."""
        return self._entry(kind, name)[0]

    def origin(self, kind: str, name: str) -> PluginInfo:
        """The plugin that provides ``kind``/``name``."""
        return self._entry(kind, name)[1]

    def _entry(self, kind: str, name: str) -> tuple[ComponentSpec, PluginInfo]:
        table = self._kind(kind)
        if name not in table:
            raise UnknownComponentError(kind, name, table, hint=self.failure_hint())
        return table[name]

    def names(self, kind: str) -> list[str]:
        """Sorted names registered for ``kind``."""
        return sorted(self._kind(kind))

    def specs(self) -> Iterator[ComponentSpec]:
        """Every spec, in :data:`KINDS` order then by name."""
        for kind in KINDS:
            for name in sorted(self._table[kind]):
                yield self._table[kind][name][0]

    def __contains__(self, kind_name: tuple[str, str]) -> bool:
        kind, name = kind_name
        return name in self._table.get(kind, {})

    @property
    def plugins(self) -> list[PluginInfo]:
        """Every plugin seen, in load order, including failed and skipped ones."""
        return list(self._plugins)

    @property
    def plugin_manager(self) -> pluggy.PluginManager:
        """The underlying pluggy manager (for hooks added later)."""
        return self._pm

    def failure_hint(self) -> str:
        """A sentence naming plugins that failed to load, or ``""``; appended to lookup errors."""
        failed = [p for p in self._plugins if p.error]
        if not failed:
            return ""
        names = ", ".join(f"{p.name} ({p.error})" for p in failed)
        return f"Note: these plugins failed to load: {names}; see `lisa-kit plugins`"


_default: Registry | None = None
_lock = threading.Lock()


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry, discovered on first use (``refresh=True`` rediscovers)."""
    global _default
    with _lock:
        if _default is None or refresh:
            _default = Registry.discover()
        return _default
