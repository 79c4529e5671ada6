"""pytest plugin: run lisa_kit's conformance checks on a plugin's components.

Installed with lisa-kit (entry point ``pytest11``), so a plugin author needs no test code::

    pytest --lisa-kit-conformance=lisa-kit-example     # a distribution or entry-point name

adds one test per component that plugin registers (``lisa_kit_conformance[<name>]::<kind>:<name>``),
each running :func:`lisa_kit.conformance.check_component`. The option repeats; ``-k`` and
``-m lisa_kit_conformance`` select among them as usual. A plugin that fails to load gives
one failing test showing why. Without the option this plugin does nothing and imports
nothing beyond pytest (it is loaded in every pytest session).
"""
from __future__ import annotations

import pytest

OPTION = "--lisa-kit-conformance"
MARKER = "lisa_kit_conformance"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lisa-kit")
    group.addoption(OPTION, action="append", default=[], dest="lisa_kit_conformance", metavar="PLUGIN",
                    help="run lisa_kit's conformance checks on every component of PLUGIN, a distribution or "
                         "entry-point name as `lisa-kit plugins` lists them (repeatable)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}: lisa_kit conformance check of one component ({OPTION})")


@pytest.hookimpl(tryfirst=True)  # before -k/-m deselection, so those apply to these tests too
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    selectors = config.getoption("lisa_kit_conformance", default=None)
    if not selectors:
        return
    for selector in dict.fromkeys(selectors):
        name = f"{MARKER}[{selector}]"
        collector = ConformanceCollector.from_parent(session, name=name, nodeid=name, selector=selector)
        # Collected through the hooks, as pytest collects files: counts, --collect-only and
        # collection errors (an unknown plugin) are reported the usual way.
        config.hook.pytest_collectstart(collector=collector)
        report = config.hook.pytest_make_collect_report(collector=collector)
        config.hook.pytest_collectreport(report=report)
        if report.passed:
            items.extend(x for x in report.result if isinstance(x, pytest.Item))


class ConformanceCollector(pytest.Collector):
    """The components of the plugin(s) matching ``selector``."""

    def __init__(self, *, selector: str, **kwargs):
        super().__init__(**kwargs)
        self.selector = selector

    def collect(self) -> list[pytest.Item]:
        import warnings

        from lisa_kit.conformance import matching_plugins
        from lisa_kit.errors import LisaKitError, PluginWarning
        from lisa_kit.registry import get_registry

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PluginWarning)  # a failed plugin becomes a failing test below
                registry = get_registry()
        except LisaKitError as exc:  # e.g. two plugins registering the same component
            raise self.CollectError(f"{OPTION}={self.selector}: {exc}") from None
        plugins = matching_plugins(self.selector, registry)
        if not plugins:
            known = sorted({p.distribution for p in registry.plugins})
            raise self.CollectError(
                f"{OPTION}={self.selector}: no lisa_kit plugin has that distribution or entry-point name; "
                f"installed: {', '.join(known) or '(none)'}. Is it installed (pip install -e .)? "
                "See `lisa-kit plugins`.")
        items: list[pytest.Item] = []
        for plugin in plugins:
            if plugin.error or plugin.skipped or not plugin.components:
                problem = ("provides no components" if not (plugin.error or plugin.skipped) else plugin.status)
                if plugin.skipped:
                    problem += " (LISA_KIT_DISABLE_PLUGIN_AUTOLOAD is set)"
                items.append(PluginLoadItem.from_parent(self, name=f"load:{plugin.name}", plugin=plugin,
                                                        problem=problem))
                continue
            for kind, name in plugin.components:
                items.append(ConformanceItem.from_parent(self, name=f"{kind}:{name}",
                                                         spec=registry.get(kind, name), plugin=plugin))
        for item in items:
            item.add_marker(MARKER)
        return items


class ConformanceItem(pytest.Item):
    """:func:`lisa_kit.conformance.check_component` on one spec."""

    def __init__(self, *, spec, plugin, **kwargs):
        super().__init__(**kwargs)
        self.spec = spec
        self.plugin = plugin

    def runtest(self) -> None:
        from lisa_kit.conformance import check_component

        check_component(self.spec)

    def repr_failure(self, excinfo, style=None):
        from lisa_kit.conformance import ConformanceError

        if excinfo.errisinstance(ConformanceError):  # the message says it all; the traceback is ours
            return f"{self.plugin.describe()}: {excinfo.value}"
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, f"lisa_kit conformance {self.name} from {self.plugin.describe()}"


class PluginLoadItem(pytest.Item):
    """A plugin that cannot be checked: fails with the reason (and the import traceback)."""

    def __init__(self, *, plugin, problem: str, **kwargs):
        super().__init__(**kwargs)
        self.plugin = plugin
        self.problem = problem

    def runtest(self) -> None:
        raise PluginLoadFailed(self.problem)

    def repr_failure(self, excinfo, style=None):
        text = f"lisa_kit plugin {self.plugin.describe()} ({self.plugin.module}): {self.problem}"
        return text + (f"\n\n{self.plugin.traceback}" if self.plugin.traceback else "")

    def reportinfo(self):
        return self.path, None, f"lisa_kit plugin {self.plugin.describe()}"


class PluginLoadFailed(Exception):
    """Raised by :class:`PluginLoadItem`."""
