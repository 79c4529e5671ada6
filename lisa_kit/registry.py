"""Component registry: finds plugins through entry points and indexes their components.

Every component, built-in ones included, comes from a plugin named in the ``lisa_kit``
entry-point group (see ``pyproject.toml``). A plugin implements the
``lisa_kit_components`` hook (:mod:`lisa_kit.hookspecs`) and returns
:class:`~lisa_kit.interfaces.ComponentSpec` objects.

Discovery survives any plugin: one that fails to import or whose hook fails -- any
exception, ``sys.exit()`` included -- or returns bad specs is recorded in
:attr:`Registry.plugins` with its error (and a :class:`PluginWarning` is issued) while the
other plugins keep working; what a plugin prints while loading goes to stderr, so it
cannot corrupt a command's output. Only ``KeyboardInterrupt`` goes through: it is the
user stopping the command. Name clashes between installed plugins:

* a plugin component named like a built-in (``lisa-kit``'s own) one is ignored: the
  built-in stays, the clash is listed in :attr:`PluginInfo.clashes` and warned about;
* two third-party plugins providing the same ``(kind, name)``: the name becomes unusable
  (which one wins would depend on install order), and only using it raises
  :class:`DuplicateComponentError` naming both; everything else keeps working.

:meth:`Registry.register` (explicit, at runtime) stays strict: a clash raises at once.

Set ``LISA_KIT_DISABLE_PLUGIN_AUTOLOAD=1`` to load only lisa-kit's own entry points;
third-party ones are then listed as skipped.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import os
import sys
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
    clashes: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        """``"ok"``, ``"skipped"``, ``"FAILED: <error>"`` or ``"ok; clash: ..."``."""
        if self.skipped:
            return "skipped"
        if self.error:
            return f"FAILED: {self.error}"
        return "ok; clash: " + "; ".join(self.clashes) if self.clashes else "ok"

    def describe(self) -> str:
        """Who provides it, for error messages: ``dist version (plugin 'name')``."""
        version = f" {self.version}" if self.version else ""
        return f"{self.distribution}{version} (plugin {self.name!r})"


def _canonical(dist_name: str) -> str:
    return re.sub(r"[-_.]+", "-", dist_name).lower()


def _autoload_disabled() -> bool:
    value = os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


def _is_builtin(info: PluginInfo) -> bool:
    return _canonical(info.distribution) == OWN_DISTRIBUTION


class _BadPlugin(Exception):
    """Internal: the plugin's hook result is unusable; the message says why."""


def _describe_exception(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):  # `SystemExit: 0` would not say what happened
        return f"called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def _plugin_code():
    """Around code of a plugin: its prints go to stderr (``plugins --json`` stays JSON)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


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
        # (kind, name) provided by several third-party plugins: unusable, see module doc.
        self._ambiguous: dict[tuple[str, str], list[PluginInfo]] = {}

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
        ``LISA_KIT_DISABLE_PLUGIN_AUTOLOAD``. Never raises for a plugin's sake (see the
        module doc for failures and name clashes).
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
            with _plugin_code():
                plugin = ep.load()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # any import-time failure (sys.exit too) must not take the others down
            info.error = _describe_exception(exc)
            info.traceback = traceback.format_exc()
            warnings.warn(f"lisa_kit plugin {info.describe()} failed to load: {info.error}",
                          PluginWarning, stacklevel=3)
            return
        # Qualify by distribution: two dists may well reuse an entry-point name.
        self._add(plugin, info, pm_name=f"{dist_name}:{ep.name}", strict=False)
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
        self._add(obj, info, pm_name=f"{distribution}:{name}", strict=True)
        if info.error:
            self._forget(info)
            raise PluginError(f"plugin {info.describe()}: {info.error}")
        return info

    def _add(self, plugin: Any, info: PluginInfo, *, pm_name: str, strict: bool) -> None:
        """Register ``plugin``, call its hook and index its specs (all or nothing).

        ``info`` is already in ``self._plugins``; problems are recorded in ``info.error``.
        ``strict``: a name clash raises :class:`DuplicateComponentError` (registry
        unchanged); otherwise clashes are resolved as the module doc says.
        """
        try:
            with _plugin_code():  # pluggy reads the plugin's attributes: plugin code may run
                self._pm.register(plugin, name=pm_name)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # ValueError (already registered), PluginValidationError, anything
            info.error = f"cannot register: {_describe_exception(exc)}"
            return
        try:
            with _plugin_code():
                specs = self._call_hook(plugin)
            specs, listed = self._place(specs, info, strict)
        except _BadPlugin as exc:
            info.error = str(exc)
        except (DuplicateComponentError, KeyboardInterrupt):
            self._pm.unregister(plugin)
            self._forget(info)
            raise
        except BaseException as exc:  # the plugin's own hook code raised or exited
            info.error = f"lisa_kit_components() raised {_describe_exception(exc)}"
            info.traceback = traceback.format_exc()
        if info.error:
            self._pm.unregister(plugin)
            return
        for spec in specs:
            self._table[spec.kind][spec.name] = (spec, info)
        info.components.extend((spec.kind, spec.name) for spec in listed)

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
            if not isinstance(result, (list, tuple)):  # None, one spec, a str, a number, a dict ...
                raise _BadPlugin("lisa_kit_components() must return a list of ComponentSpec, "
                                 f"got {_short_repr(result)}")
            specs.extend(result)
        problems = []
        for spec in specs:
            if not isinstance(spec, ComponentSpec):
                problems.append(f"not a ComponentSpec: {_short_repr(spec)}")
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

    def _place(self, specs: list[ComponentSpec], info: PluginInfo,
               strict: bool) -> tuple[list[ComponentSpec], list[ComponentSpec]]:
        """``(specs to index, specs to list as provided by info)`` after handling name
        clashes (module doc): a name shared with another third-party plugin is listed
        by both and indexed by neither; one shadowed by a built-in is neither."""
        seen: set[tuple[str, str]] = set()
        for spec in specs:
            key = (spec.kind, spec.name)
            if key in seen:
                if strict:
                    raise DuplicateComponentError(spec.kind, spec.name, info.describe(), info.describe())
                raise _BadPlugin(f"provides {spec.kind}:{spec.name} twice")
            seen.add(key)
        if strict:
            for spec in specs:
                others = self._providers(spec.kind, spec.name)
                if others:
                    raise DuplicateComponentError(spec.kind, spec.name, others[0].describe(), info.describe())
            return specs, specs
        keep, listed = [], []
        for spec in specs:
            key = (spec.kind, spec.name)
            others = self._providers(*key)
            if not others:
                keep.append(spec)
                listed.append(spec)
            elif any(_is_builtin(o) for o in others):
                self._clash(info, f"{spec.kind}:{spec.name} is ignored; the built-in one "
                            f"from {others[0].describe()} is used")
            else:
                listed.append(spec)
                self._table[spec.kind].pop(spec.name, None)
                self._ambiguous[key] = [*others, info]
                names = " and ".join(o.describe() for o in self._ambiguous[key])
                for provider in self._ambiguous[key]:
                    provider.clashes = [c for c in provider.clashes if not c.startswith(f"{spec.kind}:{spec.name} ")]
                    self._clash(provider, f"{spec.kind}:{spec.name} is provided by {names}; using it is an error "
                                "until one is uninstalled", warn=provider is info)
        return keep, listed

    def _providers(self, kind: str, name: str) -> list[PluginInfo]:
        if (kind, name) in self._ambiguous:
            return self._ambiguous[(kind, name)]
        held = self._table[kind].get(name)
        return [held[1]] if held else []

    @staticmethod
    def _clash(info: PluginInfo, message: str, warn: bool = True) -> None:
        info.clashes.append(message)
        if warn:
            warnings.warn(f"lisa_kit plugin {info.describe()}: {message}", PluginWarning, stacklevel=5)

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
        if (kind, name) in self._ambiguous:
            first, *rest = self._ambiguous[(kind, name)]
            raise DuplicateComponentError(kind, name, first.describe(), " and ".join(p.describe() for p in rest))
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
    def ambiguous(self) -> dict[tuple[str, str], list[PluginInfo]]:
        """``(kind, name)`` provided by several third-party plugins -> those plugins
        (such names are unusable: :meth:`get` raises :class:`DuplicateComponentError`)."""
        return {key: list(infos) for key, infos in self._ambiguous.items()}

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


def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except KeyboardInterrupt:
        raise
    except BaseException:  # noqa: BLE001 - a plugin's object with a broken __repr__ (even one that exits)
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= 80 else text[:77] + "..."


_default: Registry | None = None
_lock = threading.Lock()


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry, discovered on first use (``refresh=True`` rediscovers)."""
    global _default
    with _lock:
        if _default is None or refresh:
            _default = Registry.discover()
        return _default
