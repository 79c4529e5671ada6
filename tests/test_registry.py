"""Plugin registry: runtime registration, entry-point discovery, errors."""
from __future__ import annotations

import importlib.metadata
import pickle
import sys
import textwrap
import types
import warnings

import pytest

import lisa_kit
from lisa_kit import registry as registry_module
from lisa_kit.errors import (
    DuplicateComponentError,
    LisaKitError,
    PluginError,
    PluginWarning,
    UnknownComponentError,
    UnknownKindError,
)
from lisa_kit.interfaces import KINDS, ComponentSpec
from lisa_kit.registry import DISABLE_AUTOLOAD_ENV, PluginInfo, Registry, get_registry


def build_proj(in_dim: int, out_dim: int):
    return ("proj", in_dim, out_dim)


class FakePlugin:
    def __init__(self, *specs: tuple[str, str]):
        self.pairs = specs or (("projector", "fake_linear"),)

    @lisa_kit.hookimpl
    def lisa_kit_components(self):
        return [ComponentSpec(kind=k, name=n, build=build_proj, tiny={"in_dim": 2, "out_dim": 3})
                for k, n in self.pairs]


# -- runtime registration ---------------------------------------------------------
def test_empty_registry_has_no_components():
    reg = Registry.empty()
    assert all(reg.names(kind) == [] for kind in KINDS)
    assert list(reg.specs()) == [] and reg.plugins == []


def test_register_and_query():
    reg = Registry.empty()
    plugin = FakePlugin(("projector", "b"), ("projector", "a"), ("seg_head", "a"))
    info = reg.register(plugin, "mine", distribution="mydist", version="2.0")
    assert reg.names("projector") == ["a", "b"]
    spec = reg.get("projector", "a")
    assert spec.build(in_dim=1, out_dim=2) == ("proj", 1, 2)
    assert [(s.kind, s.name) for s in reg.specs()] == [("projector", "a"), ("projector", "b"), ("seg_head", "a")]
    assert reg.origin("seg_head", "a") is info
    assert info == PluginInfo(name="mine", module=f"{__name__}.FakePlugin", distribution="mydist", version="2.0",
                              components=[("projector", "b"), ("projector", "a"), ("seg_head", "a")])
    assert info.status == "ok" and reg.plugins == [info]
    assert ("projector", "a") in reg and ("llm", "a") not in reg


def test_register_module_object():
    module = types.ModuleType("my_plugin_module")

    @lisa_kit.hookimpl
    def lisa_kit_components():
        return [ComponentSpec("fusion", "splice", build_proj)]

    module.lisa_kit_components = lisa_kit_components
    reg = Registry.empty()
    info = reg.register(module, "mod")
    assert info.module == "my_plugin_module" and info.distribution == "<local>"
    assert reg.names("fusion") == ["splice"]


def test_unknown_name_lists_available_sorted():
    reg = Registry.empty()
    reg.register(FakePlugin(("projector", "zeta"), ("projector", "alpha")), "p")
    with pytest.raises(UnknownComponentError) as info:
        reg.get("projector", "nope")
    err = info.value
    assert isinstance(err, KeyError) and isinstance(err, LisaKitError)
    assert str(err) == "unknown projector 'nope'; available projector components: alpha, zeta"
    assert err.available == ["alpha", "zeta"] and err.kind == "projector"


def test_unknown_kind_lists_kinds():
    reg = Registry.empty()
    with pytest.raises(UnknownKindError) as info:
        reg.get("tokenizer", "x")
    assert all(kind in str(info.value) for kind in KINDS)
    with pytest.raises(UnknownComponentError):
        reg.names("tokenizer")


def test_duplicate_names_both_distributions_and_leaves_registry_unchanged():
    reg = Registry.empty()
    reg.register(FakePlugin(("projector", "linear")), "first", distribution="dist-a", version="1.0")
    with pytest.raises(DuplicateComponentError) as info:
        reg.register(FakePlugin(("seg_head", "h"), ("projector", "linear")), "second",
                     distribution="dist-b", version="2.0")
    message = str(info.value)
    assert "projector:linear" in message and "dist-a 1.0" in message and "dist-b 2.0" in message
    assert [p.name for p in reg.plugins] == ["first"]
    assert reg.names("seg_head") == []
    # The failed plugin was unregistered from pluggy too: registering it again works once the clash is gone.
    reg2 = Registry.empty()
    reg2.register(FakePlugin(("seg_head", "h")), "second", distribution="dist-b")


def test_same_name_in_different_kinds_is_fine():
    reg = Registry.empty()
    reg.register(FakePlugin(("projector", "mlp2"), ("seg_head", "mlp2")), "p")
    assert reg.get("projector", "mlp2") is not reg.get("seg_head", "mlp2")


@pytest.mark.parametrize("plugin, match", [
    (FakePlugin(("tokenizer", "x")), "unknown kind 'tokenizer'"),
    (object(), "implements no lisa_kit_components hook"),
])
def test_broken_runtime_plugins_raise_plugin_error(plugin, match):
    reg = Registry.empty()
    with pytest.raises(PluginError, match=match):
        reg.register(plugin, "bad")
    assert reg.plugins == []


def test_hook_that_raises_or_returns_garbage():
    class Raises:
        @lisa_kit.hookimpl
        def lisa_kit_components(self):
            raise RuntimeError("boom")

    class ReturnsNone:
        @lisa_kit.hookimpl
        def lisa_kit_components(self):
            return None

    reg = Registry.empty()
    with pytest.raises(PluginError, match="RuntimeError: boom"):
        reg.register(Raises(), "r")
    with pytest.raises(PluginError, match="must return a list"):
        reg.register(ReturnsNone(), "n")


def test_errors_pickle():
    err = UnknownComponentError("projector", "x", ["b", "a"])
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.available == ["a", "b"]


def test_get_registry_is_cached(monkeypatch):
    monkeypatch.setattr(registry_module, "_default", None)
    calls = []
    monkeypatch.setattr(Registry, "discover", classmethod(lambda cls: calls.append(1) or cls()))
    first = get_registry()
    assert get_registry() is first and len(calls) == 1
    assert get_registry(refresh=True) is not first and len(calls) == 2


# -- entry-point discovery through fake installed distributions -------------------
PLUGIN_SOURCE = """
import lisa_kit
from lisa_kit.interfaces import ComponentSpec

def build(in_dim: int = 1):
    return in_dim

@lisa_kit.hookimpl
def lisa_kit_components():
    return [ComponentSpec(kind={kind!r}, name={name!r}, build=build)]
"""


@pytest.fixture
def make_dist(tmp_path, monkeypatch):
    """Write ``<dist>-<version>.dist-info`` plus modules into a fresh dir on sys.path."""
    modules: list[str] = []

    def make(dist: str, version: str, entry_points: dict[str, str], sources: dict[str, str]):
        root = tmp_path / f"site-{dist}"
        info = root / f"{dist}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
        (info / "entry_points.txt").write_text(f"[lisa_kit]\n{lines}")
        for module, source in sources.items():
            (root / f"{module}.py").write_text(textwrap.dedent(source))
            modules.append(module)
        monkeypatch.syspath_prepend(str(root))
        return root

    yield make
    for module in modules:
        sys.modules.pop(module, None)


def discover(**kwargs):
    """A fresh discovered registry and the plugin warnings it issued."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = Registry.discover(**kwargs)
    return reg, [str(w.message) for w in caught if issubclass(w.category, PluginWarning)]


def plugin(reg: Registry, name: str) -> PluginInfo:
    (info,) = [p for p in reg.plugins if p.name == name]
    return info


def test_discovers_fake_distribution(make_dist):
    make_dist("fakeplugin", "1.0", {"fake": "fakeplugin_mod"},
              {"fakeplugin_mod": PLUGIN_SOURCE.format(kind="projector", name="fake_proj")})
    reg, _ = discover()
    info = reg.origin("projector", "fake_proj")
    assert (info.name, info.distribution, info.version, info.module) == ("fake", "fakeplugin", "1.0", "fakeplugin_mod")
    assert info.components == [("projector", "fake_proj")] and info.error is None
    assert reg.get("projector", "fake_proj").build(in_dim=4) == 4


OBJECT_SOURCE = """
import lisa_kit
from lisa_kit.interfaces import ComponentSpec

class Holder:
    @lisa_kit.hookimpl
    def lisa_kit_components(self):
        return [ComponentSpec("seg_head", "obj_head", build=dict)]

holder = Holder()
"""


def test_entry_point_to_an_object_and_one_without_hook(make_dist):
    make_dist("objplugin", "0.3", {"obj": "objplugin_mod:holder", "nohook": "nohook_mod"},
              {"objplugin_mod": OBJECT_SOURCE, "nohook_mod": "def lisa_kit_components():\n    return []\n"})
    reg, warned = discover()
    assert reg.origin("seg_head", "obj_head").module == "objplugin_mod:holder"
    # Forgetting @lisa_kit.hookimpl is reported, not silently ignored.
    assert "missing @lisa_kit.hookimpl" in plugin(reg, "nohook").error
    assert any("nohook" in w for w in warned)


def test_failing_import_is_reported_and_others_keep_working(make_dist):
    make_dist("goodplugin", "1.0", {"good": "goodplugin_mod"},
              {"goodplugin_mod": PLUGIN_SOURCE.format(kind="llm", name="good_llm")})
    make_dist("brokenplugin", "0.1", {"broken": "brokenplugin_mod"},
              {"brokenplugin_mod": "raise ImportError('needs libfoo')\n"})
    reg, warned = discover()
    broken = plugin(reg, "broken")
    assert broken.error == "ImportError: needs libfoo" and broken.status.startswith("FAILED")
    assert broken.distribution == "brokenplugin" and broken.components == []
    assert "ImportError" in broken.traceback
    assert any("brokenplugin 0.1" in w and "needs libfoo" in w for w in warned)
    assert reg.names("llm").count("good_llm") == 1
    with pytest.raises(UnknownComponentError, match="brokenplugin_mod|broken"):
        reg.get("llm", "missing_llm")  # the hint names the failed plugin


def test_bad_kind_from_entry_point_is_reported(make_dist):
    make_dist("kindplugin", "1.0", {"kindy": "kindplugin_mod"},
              {"kindplugin_mod": PLUGIN_SOURCE.format(kind="decoder", name="x")})
    reg, warned = discover()
    assert "unknown kind 'decoder'" in plugin(reg, "kindy").error
    assert any("kindplugin" in w for w in warned)


def test_duplicate_across_distributions_names_both(make_dist):
    make_dist("fakeone", "1.0", {"one": "fakeone_mod"},
              {"fakeone_mod": PLUGIN_SOURCE.format(kind="projector", name="clash")})
    make_dist("faketwo", "2.5", {"two": "faketwo_mod"},
              {"faketwo_mod": PLUGIN_SOURCE.format(kind="projector", name="clash")})
    reg, warned = discover()  # discovery survives the clash; only using the name fails
    with pytest.raises(DuplicateComponentError) as info:
        reg.get("projector", "clash")
    assert "fakeone 1.0" in str(info.value) and "faketwo 2.5" in str(info.value)
    assert "clash" not in reg.names("projector") and ("projector", "clash") in reg.ambiguous
    assert any("projector:clash" in w and "fakeone 1.0" in w and "faketwo 2.5" in w for w in warned)
    assert all("projector:clash" in plugin(reg, n).status for n in ("one", "two"))


def test_same_entry_point_name_in_two_distributions(make_dist):
    make_dist("dista", "1.0", {"plugin": "dista_mod"}, {"dista_mod": PLUGIN_SOURCE.format(kind="llm", name="a_llm")})
    make_dist("distb", "1.0", {"plugin": "distb_mod"}, {"distb_mod": PLUGIN_SOURCE.format(kind="llm", name="b_llm")})
    reg, _ = discover()
    assert reg.origin("llm", "a_llm").distribution == "dista"
    assert reg.origin("llm", "b_llm").distribution == "distb"


@pytest.mark.parametrize("value", ["1", "true"])
def test_disable_autoload_skips_third_party(make_dist, monkeypatch, value):
    make_dist("fakeplugin", "1.0", {"fake": "fakeplugin_mod"},
              {"fakeplugin_mod": PLUGIN_SOURCE.format(kind="projector", name="fake_proj")})
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, value)
    reg, _ = discover()
    info = plugin(reg, "fake")
    assert info.skipped and info.status == "skipped" and info.error is None
    assert "fake_proj" not in reg.names("projector")
    assert "fakeplugin_mod" not in sys.modules
    own = [p for p in reg.plugins if p.distribution == "lisa-kit"]
    assert own and not any(p.skipped for p in own)


def test_autoload_env_zero_means_enabled(make_dist, monkeypatch):
    make_dist("fakeplugin", "1.0", {"fake": "fakeplugin_mod"},
              {"fakeplugin_mod": PLUGIN_SOURCE.format(kind="projector", name="fake_proj")})
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "0")
    reg, _ = discover()
    assert "fake_proj" in reg.names("projector")


def test_builtin_entry_points_are_declared():
    eps = importlib.metadata.entry_points(group="lisa_kit")
    own = [ep for ep in eps if ep.dist is not None and ep.dist.name == "lisa-kit"]
    assert {ep.name for ep in own} >= {"hf_clip", "projectors", "sam"}


def test_discover_given_entry_points_without_distribution():
    ep = importlib.metadata.EntryPoint(name="ghost", value="no_such_module_for_lisa_kit_tests", group="lisa_kit")
    reg, warned = discover(entry_points=[ep])
    info = plugin(reg, "ghost")
    assert info.distribution == "<unknown>" and "ModuleNotFoundError" in info.error and warned
