"""Loading without a random full-precision model first (meta build, streamed shards, one cast
per tensor) gives bit-identical weights to the old build-copy-cast path, and damaged or
hostile checkpoints are refused with a CheckpointError naming the file, never a traceback,
a prompt or exhausted memory."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lisa_kit.api import Segmenter, _cast
from lisa_kit.builder import build_model
from lisa_kit.checkpoint import io
from lisa_kit.checkpoint.export import export_lisa_hf
from lisa_kit.checkpoint.lisa_hf import import_lisa_hf, lisa_recipe, split_lisa_state
from lisa_kit.checkpoint.native import load_model, save_model
from lisa_kit.recipes import MAX_YAML_NODES
from lisa_kit.errors import CheckpointError, InsufficientMemoryError
from lisa_kit.testing import fixture_dir, tiny_recipe

pytestmark = pytest.mark.filterwarnings("ignore::lisa_kit.checkpoint.export.ExportWarning")
PARTS = ("llm", "projector", "mask_decoder", "seg_head")
SHARD_BYTES = 200_000  # small enough that the tiny model spans several shards


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(tiny_recipe()).eval()


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    """The tiny model as released-LISA directories: sharded safetensors and sharded .bin (bf16)."""
    root = tmp_path_factory.mktemp("lisa_hf")
    st = export_lisa_hf(tiny_model, root / "st", max_shard_size=SHARD_BYTES)
    pt = export_lisa_hf(tiny_model, root / "pt", safetensors=False, dtype="bfloat16", max_shard_size=SHARD_BYTES)
    return st, pt


def _old_path(ckpt: Path, sam, vision_tower, dtype):
    """Today's loading path before this change: build with random fp32 weights, read every
    shard into one dict, copy into the model, then cast (as the Segmenter did)."""
    recipe = lisa_recipe(ckpt, vision_tower=vision_tower, sam=sam)
    model = build_model(recipe)
    state = {}
    for f in io.checkpoint_files(ckpt):
        state.update(load_file(str(f)) if f.suffix == ".safetensors" else
                     torch.load(str(f), map_location="cpu", weights_only=True))
    parts = split_lisa_state(state)
    model.llm.model.load_state_dict(parts["llm"], strict=True)
    model.projector.load_state_dict(parts["projector"], strict=True)
    model.mask_decoder.load_state_dict(parts["mask_decoder"], strict=True)
    model.seg_head.load_state_dict(parts["seg_head"], strict=True)
    if dtype is not None:
        _cast(model, dtype)
    return model


def _assert_identical(new, old):
    """Every parameter and buffer (non-persistent ones included): same dtype, bit-identical."""
    a = dict(new.named_parameters(remove_duplicate=False)) | dict(new.named_buffers(remove_duplicate=False))
    b = dict(old.named_parameters(remove_duplicate=False)) | dict(old.named_buffers(remove_duplicate=False))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].device.type != "meta", k
        assert a[k].dtype == b[k].dtype, (k, a[k].dtype, b[k].dtype)
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("fmt", ["st", "pt"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_streamed_meta_load_is_bit_identical_to_build_copy_cast(exported, fmt, dtype):
    ckpt = exported[0] if fmt == "st" else exported[1]
    assert len(io.checkpoint_files(ckpt)) > 1  # really sharded
    sam, tower = ckpt / "sam_config.json", ckpt / "clip_vision_tower"
    new = import_lisa_hf(ckpt, vision_tower=str(tower), sam=str(sam), dtype=dtype)
    _assert_identical(new, _old_path(ckpt, str(sam), str(tower), dtype))
    if dtype is not None:
        assert {p.dtype for p in new.llm.parameters()} == {dtype}
        # the one precision rule (io.param_dtype): SAM's image encoder in dtype, what it keeps fp32
        assert {p.dtype for p in new.mask_decoder.image_encoder.parameters()} == {dtype}
        assert {p.dtype for p in new.mask_decoder.mask_decoder.parameters()} == {torch.float32}


def test_fixture_checkpoint_is_bit_identical_in_bf16():
    fx = fixture_dir()
    if fx is None:
        pytest.skip("reference fixture absent")
    ckpt, tower, sam = fx / "lisa_tiny_hf", str(fx / "clip-vit-tiny-patch14"), str(fx / "sam_tiny_config.json")
    new = import_lisa_hf(ckpt, vision_tower=tower, sam=sam, dtype=torch.bfloat16)
    _assert_identical(new, _old_path(ckpt, sam, tower, torch.bfloat16))


def test_native_checkpoint_loads_bit_identical_in_bf16(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "ck")
    new = load_model(tmp_path / "ck", dtype=torch.bfloat16)
    old = load_model(tmp_path / "ck", strict=False)  # built for real, then cast
    _cast(old, torch.bfloat16)
    _assert_identical(new, old)


def test_segmenter_loads_straight_into_the_precision(tiny_model, tmp_path, monkeypatch):
    """No fp32 copy of an LLM weight is ever made: every tensor placed into the LLM is
    already bf16 when the Segmenter asks for bf16."""
    save_model(tiny_model, tmp_path / "ck")
    placed = []
    put = io.Placer.put

    def spy(self, key, value, file=None):
        put(self, key, value, file)
        if self.component == "llm":
            placed.append(self.module.get_parameter(key).dtype)

    monkeypatch.setattr(io.Placer, "put", spy)
    seg = Segmenter.from_checkpoint(tmp_path / "ck", precision="bf16")
    assert placed and set(placed) == {torch.bfloat16}
    assert {p.dtype for p in seg.model.llm.parameters()} == {torch.bfloat16}


# -- damaged files -------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _import(ckpt: Path):
    return import_lisa_hf(ckpt, vision_tower=str(ckpt / "clip_vision_tower"), sam=str(ckpt / "sam_config.json"))


@pytest.mark.parametrize("fmt", ["st", "pt"])
def test_shard_missing_from_index(exported, tmp_path, fmt):
    ckpt = _copy(exported[0] if fmt == "st" else exported[1], tmp_path / "ck")
    shard = io.checkpoint_files(ckpt)[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name) as e:
        _import(ckpt)
    assert "index.json" in str(e.value)


@pytest.mark.parametrize("fmt", ["st", "pt"])
def test_truncated_shard(exported, tmp_path, fmt):
    ckpt = _copy(exported[0] if fmt == "st" else exported[1], tmp_path / "ck")
    shard = io.checkpoint_files(ckpt)[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=shard.name):
        _import(ckpt)


def test_index_that_is_not_json(exported, tmp_path):
    ckpt = _copy(exported[0], tmp_path / "ck")
    (ckpt / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="index"):
        _import(ckpt)


@pytest.mark.parametrize("stored", [torch.int32, torch.complex64])
def test_dtype_the_model_cannot_take(tiny_model, tmp_path, stored):
    save_model(tiny_model, tmp_path / "ck")
    f = tmp_path / "ck" / "projector.safetensors"
    state = load_file(str(f))
    state["proj.weight"] = state["proj.weight"].to(stored)
    save_file(state, str(f))
    with pytest.raises(CheckpointError, match="proj.weight") as e:
        Segmenter.from_checkpoint(tmp_path / "ck")
    assert str(stored).removeprefix("torch.") in str(e.value)


# -- hostile or broken recipe.yaml / sam_config.json ---------------------------------------
@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "", "name: x\n", "model: [1, 2]\n",
                                  "model:\n  llm: 3\n", ": : :\n  - [\n"])
def test_bad_native_recipe(tiny_model, tmp_path, text):
    save_model(tiny_model, tmp_path / "ck")
    (tmp_path / "ck" / "recipe.yaml").write_text(text)
    with pytest.raises(CheckpointError, match="recipe.yaml"):
        Segmenter.from_checkpoint(tmp_path / "ck")


def test_native_recipe_failing_validation_names_the_problem(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "ck")
    f = tmp_path / "ck" / "recipe.yaml"
    f.write_text(f.read_text().replace("name: mlp2", "name: no_such_head"))
    with pytest.raises(CheckpointError, match="no_such_head"):
        load_model(tmp_path / "ck")


def test_yaml_alias_bomb_is_refused_quickly(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "ck")
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    (tmp_path / "ck" / "recipe.yaml").write_text("\n".join(lines) + "\nmodel: *a9\n")
    t = time.perf_counter()
    with pytest.raises(CheckpointError, match="alias"):
        load_model(tmp_path / "ck")
    assert time.perf_counter() - t < 5  # 9**10 values if expanded: never walked
    assert MAX_YAML_NODES < 9 ** 10


@pytest.mark.parametrize("content", ["{broken", "[1, 2]", '{"image_size": "big"}', '{"no_such_key": 1}'])
def test_bad_sam_config_json(exported, tmp_path, content):
    ckpt = _copy(exported[0], tmp_path / "ck")
    (ckpt / "sam_config.json").write_text(content)
    with pytest.raises(CheckpointError, match="sam_config.json"):
        Segmenter.from_checkpoint(ckpt, vision_tower=str(ckpt / "clip_vision_tower"))


# -- code from a file ------------------------------------------------------------------------
class NotATensor:  # a pickled global: weights_only refuses to import it
    pass


def test_pickled_tower_with_code_is_a_checkpoint_error(exported, tmp_path):
    ckpt = _copy(exported[0], tmp_path / "ck")
    tower = ckpt / "clip_vision_tower"
    for f in tower.glob("*.safetensors*"):
        f.unlink()
    torch.save({"vision_model.embeddings.class_embedding": NotATensor()}, tower / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="clip_vision_tower"):
        _import(ckpt)


@pytest.mark.parametrize("where", ["clip_vision_tower/config.json", "tokenizer_config.json"])
def test_remote_code_is_refused_without_a_prompt(exported, tmp_path, where):
    """In a subprocess with stdin closed: transformers would prompt "Do you wish to run the
    custom code? [y/N]" (and fail on EOF) if asked with trust_remote_code unset."""
    ckpt = _copy(exported[0], tmp_path / "ck")
    f = ckpt / where
    cfg = json.loads(f.read_text()) if f.exists() else {}
    cfg["auto_map"] = {"AutoModel": "evil.Model", "AutoConfig": "evil.Config", "AutoTokenizer": ["evil.Tok", None]}
    f.write_text(json.dumps(cfg))
    (f.parent / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    code = ("import sys\nfrom lisa_kit.checkpoint.lisa_hf import import_lisa_hf\nfrom lisa_kit.errors import "
            "CheckpointError\ntry:\n    import_lisa_hf(sys.argv[1], vision_tower=sys.argv[1] + '/clip_vision_tower', "
            "sam=sys.argv[1] + '/sam_config.json')\nexcept CheckpointError as e:\n    print('REFUSED', e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(ckpt)], stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=120)
    assert "REFUSED" in out.stdout, out.stdout + out.stderr
    assert "auto_map" in out.stdout and Path(where).name in out.stdout
    assert "remote code ran" not in out.stdout + out.stderr


# -- memory ------------------------------------------------------------------------------------
def test_too_little_memory_is_refused_before_reading(exported, monkeypatch):
    ckpt = exported[0]
    needed = io.estimate_bytes(ckpt, lambda k: torch.float32)
    assert needed > 0
    monkeypatch.setattr(io, "available_bytes", lambda device: needed // 2)

    def no_reading(*a, **kw):
        raise AssertionError("weights were read before the memory check")

    monkeypatch.setattr(io, "_file_tensors", no_reading)
    with pytest.raises(InsufficientMemoryError, match="GiB"):
        Segmenter.from_checkpoint(ckpt, vision_tower=str(ckpt / "clip_vision_tower"))


def test_estimate_counts_the_target_dtype(exported):
    ckpt = exported[1]  # .bin, bf16 (the rotary tables fp32)
    tensors = [t for _, t, _ in io.iter_tensors(ckpt)]
    assert {t.dtype for t in tensors} >= {torch.bfloat16}
    stored = sum(t.numel() * t.element_size() for t in tensors)
    as_fp32 = sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in tensors)
    assert io.estimate_bytes(ckpt) == stored
    assert io.estimate_bytes(ckpt, lambda k: torch.float32) == as_fp32 > stored
    assert io.available_bytes("cpu") > 0  # /proc/meminfo read
