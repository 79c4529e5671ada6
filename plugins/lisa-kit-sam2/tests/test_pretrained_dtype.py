"""The plugin decoders read ``pretrained`` weights straight into the requested precision
(issue 12): built with ``dtype=bf16`` from a tiny random ``save_pretrained`` directory, every
tensor is in the dtype the component's rule (``lisa_kit.checkpoint.io.param_dtype``) gives
it and bit-identical to the old path (read in fp32, then cast by that rule), and the reader
is asked for the dtype, so no fp32 copy of what ends up in bf16 is made."""
from __future__ import annotations

import gc
import os
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("lisa_kit_sam2", reason="the plugin distribution lisa-kit-sam2 is not installed "
                    "(pip install -e plugins/lisa-kit-sam2)")

from lisa_kit.checkpoint.io import cast_component, param_dtype  # noqa: E402
from lisa_kit_sam2 import _hf, edgetam, hf_sam, sam2, sam3, sam_hq  # noqa: E402

LOW = torch.bfloat16
# name -> (build, tiny config, config maker, transformers model class name)
DECODERS = {
    "hf_sam": (hf_sam.build_hf_sam, hf_sam.TINY_HF_SAM, hf_sam.sam_config, "SamModel"),
    "sam_hq": (sam_hq.build_sam_hq, sam_hq.TINY_SAM_HQ, sam_hq.sam_hq_config, "SamHQModel"),
    "sam2": (sam2.build_sam2, sam2.TINY_SAM2, sam2.sam2_config, "Sam2Model"),
    "edgetam": (edgetam.build_edgetam, edgetam.TINY_EDGETAM, edgetam.edgetam_config, "EdgeTamModel"),
    "sam3": (sam3.build_sam3, sam3.TINY_SAM3, sam3.sam3_config, "Sam3Model"),
}
# Weights spread wide so that bf16 rounding changes most of them (the comparisons then see
# a tensor read in the wrong precision).
SPREAD = 0.2


class MixedRule(torch.nn.Module):
    """A component rule that keeps only the prompt side fp32 (the built-in ``sam``'s split),
    to read every SAM-family class mixed: their own components keep all of themselves fp32."""

    fp32_prefixes = ("model.prompt_encoder.", "model.mask_decoder.")

    def __init__(self, model):
        super().__init__()
        self.model = model


@pytest.fixture(scope="module")
def saved(save_spread_models):
    """name -> directory of a tiny random transformers model (``save_pretrained``, fp32)."""
    return save_spread_models(DECODERS, SPREAD)


@pytest.fixture
def read_dtypes(monkeypatch):
    """The ``dtype`` each ``from_pretrained`` through lisa_kit's checked loader was asked for."""
    from lisa_kit.checkpoint import safe

    asked, real = [], safe.hf_load

    def spy(fn, path, **kwargs):
        asked.append(kwargs.get("dtype"))
        return real(fn, path, **kwargs)

    monkeypatch.setattr(safe, "hf_load", spy)
    return asked


def _old_path(name, path, owner=None):
    """What a bf16 load did before: read in fp32, then cast by the rule (``owner``'s, or the
    component's)."""
    import transformers

    build, _, _, cls_name = DECODERS[name]
    if owner is None:
        comp = build(pretrained=str(path))
    else:
        comp = owner(_hf.load_pretrained(getattr(transformers, cls_name), str(path), name))
    cast_component(comp, LOW)
    return comp


def _assert_same(new, old):
    """Every tensor (parameters, persistent and non-persistent buffers) in the dtype of the
    rule and bit-identical to the old path's; the configs say the same. A tensor shared by
    two names (SAM's positional matrix, one module under the image embedding and the prompt
    encoder) is cast once, by its first name, as ``cast_component`` always did."""
    state = new.state_dict(keep_vars=True)
    names: dict[int, int] = {}
    for t in state.values():
        names[id(t)] = names.get(id(t), 0) + 1
    for k, t in state.items():
        if t.is_floating_point() and names[id(t)] == 1:
            assert t.dtype == (param_dtype(new, k, LOW) or torch.float32), k
    old_tensors = dict(old.named_parameters()) | dict(old.named_buffers())
    new_tensors = dict(new.named_parameters()) | dict(new.named_buffers())
    assert new_tensors.keys() == old_tensors.keys()
    for k, t in new_tensors.items():
        assert t.dtype == old_tensors[k].dtype and torch.equal(t, old_tensors[k]), k
    assert new.model.config.to_dict() == old.model.config.to_dict()


@pytest.mark.parametrize("name", list(DECODERS))
def test_pretrained_is_read_by_the_components_rule(saved, read_dtypes, name):
    build = DECODERS[name][0]
    new = build(pretrained=str(saved[name]), dtype=LOW)
    _assert_same(new, _old_path(name, saved[name]))
    # Every decoder puts its image encoder in bf16 (SAM's and SAM-HQ's ViT, SAM2's Hiera,
    # EdgeTAM's RepViT, SAM 3's ViT and text encoder), so the file is asked for in bf16.
    assert any(param_dtype(new, k, LOW) is not None for k in new.state_dict())
    assert any(param_dtype(new, k, LOW) is None for k in new.state_dict())  # and keeps its prompt side
    assert read_dtypes[0] == LOW


@pytest.mark.parametrize("name", [n for n in DECODERS if n != "sam3"])
def test_a_mixed_rule_reads_every_sam_class_exactly(saved, read_dtypes, name):
    """The reader, with a rule that splits each SAM-family model, gives the fp32-and-cast
    result (buffers and tied embeddings included) from a single bf16 read."""
    import transformers

    cls = getattr(transformers, DECODERS[name][3])
    new = MixedRule(_hf.load_pretrained(cls, str(saved[name]), name, dtype=LOW, owner=MixedRule))
    assert type(new.model) is cls
    dtypes = {t.dtype for t in new.parameters()}
    assert dtypes == {LOW, torch.float32}
    _assert_same(new, _old_path(name, saved[name], owner=MixedRule))
    assert read_dtypes[0] == LOW


def test_no_fp32_copy_of_the_low_precision_part(saved, monkeypatch):
    """Every tensor transformers materialises for SAM 3 comes out in its final dtype: the
    fp32 elements read are exactly the detector's (what the rule keeps), none of the ViT's."""
    from transformers import core_model_loading

    made, real = [], core_model_loading._materialize_copy

    def spy(tensor, device=None, dtype=None):
        out = real(tensor, device, dtype)
        made.append((out.dtype, out.numel()))
        return out

    monkeypatch.setattr(core_model_loading, "_materialize_copy", spy)
    comp = sam3.build_sam3(pretrained=str(saved["sam3"]), dtype=LOW)
    held: dict[torch.dtype, int] = {}
    for t in comp.state_dict().values():
        held[t.dtype] = held.get(t.dtype, 0) + t.numel()
    read: dict[torch.dtype, int] = {}
    for dt, n in made:
        read[dt] = read.get(dt, 0) + n
    assert held[torch.float32] and held[LOW]  # both precisions are there to be told apart
    assert read[torch.float32] == held[torch.float32] and read[LOW] == held[LOW]


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's list of mapped files")
def test_the_checkpoint_is_not_kept_mapped(saved, tmp_path):
    """transformers hands back a tensor it need not cast as a view of the memory-mapped
    file; the fp32 detector is copied out, so once loaded nothing keeps the file (and the
    ViT's fp32 pages with it) mapped."""
    d = shutil.copytree(saved["sam3"], tmp_path / "sam3")  # a file no other test's model maps
    comp = sam3.build_sam3(pretrained=str(d), dtype=LOW)
    gc.collect()
    assert str(d / "model.safetensors") not in Path("/proc/self/maps").read_text()
    assert {p.dtype for p in comp.parameters()} == {LOW, torch.float32}


def test_random_weights_stay_fp32_and_dtype_names_are_checked(saved):
    comp = sam3.build_sam3(config=sam3.TINY_SAM3, dtype="bf16")
    assert {p.dtype for p in comp.parameters()} == {torch.float32}
    assert {p.dtype for p in sam3.build_sam3(pretrained=str(saved["sam3"]), dtype="bf16").parameters()} == \
        {LOW, torch.float32}
    with pytest.raises(ValueError, match="unknown dtype"):
        sam2.build_sam2(pretrained=str(saved["sam2"]), dtype="int3")


def test_recipe_in_bf16_reads_the_decoder_into_it(saved, read_dtypes):
    """``Segmenter.from_recipe(precision="bf16")`` passes the dtype to the decoder's build
    (it names its own weights): the loaded SAM 3 is the old path's, tensor for tensor."""
    from lisa_kit.api import Segmenter

    seg = Segmenter.from_recipe("lisa-tiny-sam3", [f"model.mask_decoder.pretrained={saved['sam3']}",
                                                   "model.mask_decoder.config=null"], precision="bf16")
    assert LOW in read_dtypes
    _assert_same(seg.model.mask_decoder, _old_path("sam3", saved["sam3"]))
