"""The hf_vlm components' conformance checks (contract, save/load, build without memory)
for every VLM family, not only the tiny Qwen2.5-VL their specs carry: the same specs with
each family's tiny config."""
from __future__ import annotations

import dataclasses

import pytest

from lisa_kit.components import hf_vlm
from lisa_kit.conformance import check_component

TINY = {"qwen3_vl": (hf_vlm.TINY_QWEN3_VL, hf_vlm.TINY_QWEN3_VL_PROCESSOR),
        "internvl": (hf_vlm.TINY_INTERNVL, hf_vlm.TINY_INTERNVL_PROCESSOR),
        "llava_onevision": (hf_vlm.TINY_LLAVA_ONEVISION, hf_vlm.TINY_LLAVA_ONEVISION_PROCESSOR)}
SPECS = {s.name: s for s in hf_vlm.lisa_kit_components() if s.name.startswith("hf_vlm")}


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("family", sorted(TINY))
def test_family_conforms(family, name):
    config, processor = TINY[family]
    spec = SPECS[name]
    tiny = {**spec.tiny, "config": config}
    if "image_processor" in tiny:
        tiny["image_processor"] = processor
    check_component(dataclasses.replace(spec, tiny=tiny))
