"""Conformance tests generated from the registry: every registered component, tiny, on CPU.

The checks live in :mod:`lisa_kit.conformance` (plugin authors run the same ones with
``pytest --lisa-kit-conformance=<their dist>``): for each ``ComponentSpec`` the tiny
instance is built, run through its kind's contract (shapes and dtypes of the interface),
its ``sizes`` function is compared with the built module, and it is saved with
safetensors and loaded back into a second, differently initialised instance, which must
then give identical outputs.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lisa_kit
from lisa_kit.conformance import ConformanceError, check_component, matching_plugins, plugin_specs
from lisa_kit.errors import PluginError
from lisa_kit.interfaces import KINDS, ComponentSpec, Projector
from lisa_kit.registry import Registry, get_registry

SPECS = sorted(get_registry().specs(), key=lambda s: (s.kind, s.name))


@pytest.mark.parametrize("spec", SPECS, ids=[f"{s.kind}:{s.name}" for s in SPECS])
def test_component_conformance(spec, tmp_path):
    check_component(spec, tmp_path)
    assert list(tmp_path.glob("*.safetensors")), "the round trip went through a file"


def test_every_kind_has_a_component():
    reg = get_registry()
    for kind in KINDS:
        assert reg.names(kind), kind


# Every component that gives a size the builder passes on (SIZE_LINKS): lisa-kit validate
# compares written projector/seg head sizes with these, and skips a producer without them.
BUILTIN_PRODUCERS = (("vision_encoder", "hf_clip"), ("vision_encoder", "open_clip"),
                     ("vision_encoder", "open_clip_siglip"), ("vision_encoder", "timm"),
                     ("llm", "hf_causal_lm"), ("mask_decoder", "sam"))
SAM2_PLUGIN_PRODUCERS = (("mask_decoder", "sam2"), ("mask_decoder", "hf_sam"), ("mask_decoder", "sam_hq"),
                         ("mask_decoder", "edgetam"), ("mask_decoder", "sam3"))


def test_builtin_producers_declare_sizes():
    reg = get_registry()
    for kind, name in BUILTIN_PRODUCERS:
        assert reg.get(kind, name).sizes is not None, f"{kind}:{name}"


def test_sam2_plugin_producers_declare_sizes():
    pytest.importorskip("lisa_kit_sam2", reason="the lisa-kit-sam2 plugin (plugins/lisa-kit-sam2) is not installed")
    reg = get_registry()
    for kind, name in SAM2_PLUGIN_PRODUCERS:
        assert (kind, name) in reg, f"{kind}:{name} not registered although lisa_kit_sam2 imports"
        assert reg.get(kind, name).sizes is not None, f"{kind}:{name}"


# -- the checks catch broken components, with messages that say what broke -----------
class _Proj(Projector):
    def __init__(self, in_dim: int, out_dim: int, bug: str = ""):
        super().__init__()
        self.in_dim, self.out_dim, self.bug = in_dim, out_dim, bug
        self.proj = nn.Linear(in_dim, out_dim + (bug == "shape"))
        if bug == "buffer":  # state that is not saved: the reload gives other outputs
            self.offset = torch.randn(out_dim)
        if bug == "meta":  # derived from a parameter's value at build: fine when built for real, but
            # built without memory (meta parameters) there is no value to derive it from
            self.gain = nn.Parameter(torch.ones(out_dim))
            self.register_buffer("scale", self.gain.detach().sum().reshape(1), persistent=False)

    def forward(self, x):
        y = self.proj(x)
        if self.bug == "meta":
            return y * self.scale
        return y + self.offset if self.bug == "buffer" else y

    def export_config(self) -> dict:
        return {"in_dim": self.in_dim, "out_dim": self.out_dim}


def _spec(bug: str = "", sizes=None) -> ComponentSpec:
    return ComponentSpec("projector", "buggy", _Proj, tiny={"in_dim": 4, "out_dim": 6, "bug": bug},
                         derived=("in_dim", "out_dim"), sizes=sizes)


@pytest.mark.parametrize("spec, match", [
    (_spec("shape"), r"projector:buggy: forward\(\(I, N, in_dim=4\)\) must return \(I, N, out_dim\) = \(2, 5, 6\), "
                     r"got float32 \(2, 5, 7\)"),
    (_spec("buffer"), "projector:buggy: output 0 differs after a safetensors save and load"),
    (_spec("meta"), "projector:buggy: its saved weights do not load into an instance built without memory: "
                    r".*\(e\.g\. scale\)"),
    (_spec(sizes=lambda in_dim, out_dim, bug: {"in_dim": in_dim, "out_dim": 5}),
     "sizes\\(\\) says out_dim=5 but the built component has out_dim=6"),
    (_spec(sizes=lambda **kw: {"hidden": 3}), r"sizes\(\) returned \['hidden'\], which projector does not have"),
    (ComponentSpec("projector", "wrong_kind", lambda: nn.Linear(1, 1)), "is not a Projector"),
])
def test_broken_components_fail_with_a_clear_message(spec, match):
    with pytest.raises(AssertionError, match=match) as info:
        check_component(spec)
    assert isinstance(info.value, ConformanceError)


def test_good_component_with_sizes_passes():
    check_component(_spec(sizes=lambda in_dim, out_dim, bug: {"in_dim": in_dim, "out_dim": out_dim}))


class _Plugin:
    @lisa_kit.hookimpl
    def lisa_kit_components(self):
        return [_spec(), ComponentSpec("seg_head", "other", _Proj)]


def test_plugin_specs_by_distribution_or_entry_point_name():
    reg = Registry.empty()
    reg.register(_Plugin(), "my_heads", distribution="My.Heads-Dist", version="1.0")
    by_dist = plugin_specs("my-heads-dist", reg)
    assert [(s.kind, s.name) for s in by_dist] == [("projector", "buggy"), ("seg_head", "other")]
    assert plugin_specs("my-heads", reg) == by_dist and matching_plugins("MY_HEADS", reg)
    with pytest.raises(PluginError, match="no lisa_kit plugin .* 'nope'; installed: My.Heads-Dist, my_heads"):
        plugin_specs("nope", reg)
