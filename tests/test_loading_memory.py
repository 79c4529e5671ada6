"""Loading holds no more than the final model: components are built without memory (meta
parameters, real buffers), and a bf16 load's peak resident memory grows by about the
loaded model's size, not the 3x of building in fp32, reading every shard, then casting.

The real-width check (LLaMA-7B widths, CLIP ViT-L/14, SAM ViT-H, one LLM layer: ~6 GB,
minutes) runs only with ``LISA_KIT_REAL_WIDTH=1``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lisa_kit.builder import build_component, build_model
from lisa_kit.checkpoint import io
from lisa_kit.checkpoint.export import export_lisa_hf
from lisa_kit.components.hf_causal_lm import TINY_LLAMA
from lisa_kit.components.hf_clip import TINY_CLIP
from lisa_kit.components.sam import TINY_SAM
from lisa_kit.testing import tiny_recipe, tiny_tokenizer_dir

pytestmark = pytest.mark.filterwarnings("ignore::lisa_kit.checkpoint.export.ExportWarning")

# A LLaMA with ~51M parameters (~107 MB in bf16; its vocabulary is the tiny tokenizer's): big
# enough that the loader's own memory dominates the interpreter's noise, small enough for a test.
MEDIUM_LLAMA = {**TINY_LLAMA, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4,
                "num_attention_heads": 8, "num_key_value_heads": 8}
RSS_GROWTH_LIMIT = 1.3  # peak RSS growth / loaded model bytes; the old build-copy-cast path was ~3


def _buffers(module):
    """The buffers a checkpoint does not hold (non-persistent): the build must make them."""
    held = module.state_dict(keep_vars=True)
    return {k: b for k, b in module.named_buffers(remove_duplicate=False) if k not in held}


@pytest.mark.parametrize("kind,node", [
    ("llm", {"name": "hf_causal_lm", "config": TINY_LLAMA, "tokenizer": "@tiny_tokenizer"}),
    ("vision_encoder", {"name": "hf_clip", "config": TINY_CLIP}),
    ("mask_decoder", {"name": "sam", "variant": "custom", "config": TINY_SAM}),
])
def test_empty_build_has_meta_parameters_and_real_buffers(kind, node):
    empty = build_component(kind, node, empty=True)
    real = build_component(kind, node)
    params = dict(empty.named_parameters())
    assert params and all(p.device.type == "meta" for p in params.values())
    assert {k: (p.shape, p.dtype) for k, p in params.items()} == \
        {k: (p.shape, p.dtype) for k, p in real.named_parameters()}
    a, b = _buffers(empty), _buffers(real)  # rotary inv_freq, CLIP position_ids, SAM pixel_mean/std
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k].device.type != "meta" and torch.equal(a[k], b[k]), k


def test_empty_weights_restores_registration():
    with io.empty_weights():
        inside = torch.nn.Linear(3, 4)
    outside = torch.nn.Linear(3, 4)
    assert inside.weight.is_meta and not outside.weight.is_meta


def test_a_module_left_with_meta_weights_is_refused():
    with io.empty_weights():
        lin = torch.nn.Linear(3, 4)
    with pytest.raises(io.CheckpointError, match="bias"):
        io.load_into(lin, {"weight": torch.ones(4, 3)}, "projector", strict=False)


def test_tied_parameters_stay_tied():
    node = {"name": "hf_causal_lm", "config": {**TINY_LLAMA, "tie_word_embeddings": True},
            "tokenizer": "@tiny_tokenizer"}
    llm = build_component("llm", node, empty=True)
    w = torch.randn(llm.vocab_size, llm.hidden_size)
    state = {k: torch.randn(v.shape) for k, v in llm.model.state_dict().items() if "embed_tokens" not in k
             and k != "lm_head.weight"}
    io.load_into(llm.model, {**state, "model.embed_tokens.weight": w}, "llm", strict=False,
                 dtype=torch.bfloat16)
    emb, head = llm.model.get_input_embeddings().weight, llm.model.get_output_embeddings().weight
    assert emb is head and emb.dtype == torch.bfloat16 and torch.equal(emb, w.to(torch.bfloat16))


_MEASURE = textwrap.dedent("""
    import json, sys, time
    import torch
    from lisa_kit.api import Segmenter

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    kw = dict(vision_tower=sys.argv[1] + "/clip_vision_tower", sam=sys.argv[1] + "/sam_config.json",
              precision="bf16")
    Segmenter.from_checkpoint(sys.argv[2], **kw | {"vision_tower": sys.argv[2] + "/clip_vision_tower",
                                                   "sam": sys.argv[2] + "/sam_config.json"})  # warm imports
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    before = status("VmRSS")
    t = time.perf_counter()
    seg = Segmenter.from_checkpoint(sys.argv[1], **kw)
    secs = time.perf_counter() - t
    with torch.no_grad():  # read every weight: memory-mapped tensors become resident, as in use
        for p in seg.model.parameters():
            p.sum()
    size = sum(p.numel() * p.element_size() for p in seg.model.parameters())
    print(json.dumps({"growth": status("VmHWM") - before, "model_bytes": size, "seconds": secs}))
""")


@pytest.mark.parametrize("shards", ["safetensors", "bin"])
def test_bf16_load_peak_memory_is_about_the_model(tmp_path, shards):
    torch.manual_seed(0)
    medium = build_model(tiny_recipe(llm={"name": "hf_causal_lm", "config": MEDIUM_LLAMA,
                                          "tokenizer": str(tiny_tokenizer_dir())}))
    export_lisa_hf(medium, tmp_path / "medium", dtype="bfloat16", safetensors=shards == "safetensors",
                   max_shard_size=64 * 2**20)
    del medium
    export_lisa_hf(build_model(tiny_recipe()), tmp_path / "tiny")
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "medium"), str(tmp_path / "tiny")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["model_bytes"] > 100 * 2**20  # the measurement is about the LLM, not the interpreter
    assert r["growth"] < RSS_GROWTH_LIMIT * r["model_bytes"], r


# -- real widths (opt-in) ------------------------------------------------------------------
REAL = os.environ.get("LISA_KIT_REAL_WIDTH") == "1"
LLAMA_7B_1_LAYER = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 1,
                    "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
                    "vocab_size": 32000, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
CLIP_VIT_L_14 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                 "image_size": 224, "patch_size": 14, "hidden_act": "quick_gelu", "projection_dim": 768}


@pytest.mark.skipif(not REAL, reason="real-width load (~6 GB, minutes): set LISA_KIT_REAL_WIDTH=1")
def test_real_width_bf16_load_is_bit_identical(tmp_path):
    """LLaMA-7B widths (1 layer; the embedding's rows are the tiny tokenizer's), CLIP
    ViT-L/14, SAM ViT-H, projector 1024->4096, written as a released checkpoint (bf16
    ``.bin``, 1 GiB shards). Every loaded tensor equals what building in fp32,
    copying and casting gave (``tensor.float().to(dtype)``), and the buffers equal those of
    a real build, component by component (the whole old path would not fit beside it)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from lisa_kit.checkpoint.lisa_hf import import_lisa_hf, route_lisa_key
    from lisa_kit.components.sam import build_sam

    ck = tmp_path / "lisa"
    ck.mkdir()
    with io.empty_weights():
        tower = CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_L_14))
    torch.manual_seed(0)
    tower = tower.to_empty(device="cpu")
    for p in tower.parameters():
        p.data.normal_(0, 0.02)
    tower.save_pretrained(tmp_path / "clip")
    del tower
    tok = tiny_tokenizer_dir()
    recipe = tiny_recipe(llm={"name": "hf_causal_lm", "config": LLAMA_7B_1_LAYER, "tokenizer": str(tok)},
                         vision_encoder={"name": "hf_clip", "pretrained": str(tmp_path / "clip")},
                         mask_decoder={"name": "sam", "variant": "vit_h"},
                         seg_head={"name": "mlp2"})
    model = build_model(recipe, empty=("llm", "projector", "mask_decoder", "seg_head"))
    for name, mod in (("llm", model.llm.model), ("projector", model.projector), ("mask_decoder", model.mask_decoder),
                      ("seg_head", model.seg_head)):
        state = {k: torch.randn(v.shape, dtype=torch.bfloat16) * 0.02 for k, v in mod.state_dict().items()}
        io.load_into(mod, state, name, dtype=torch.bfloat16)
    export_lisa_hf(model, ck, vision_tower=str(tmp_path / "clip"), safetensors=False, dtype="bfloat16",
                   max_shard_size=2**30)
    del model, state
    new = import_lisa_hf(ck, vision_tower=str(tmp_path / "clip"), sam="vit_h", dtype=torch.bfloat16)
    targets = {"llm": new.llm.model, "projector": new.projector, "mask_decoder": new.mask_decoder,
               "seg_head": new.seg_head}
    for k, v, _ in io.iter_tensors(ck):
        part, key = route_lisa_key(k)
        if part not in targets:
            continue
        got = targets[part].state_dict()[key]
        want = v.float().to(io.param_dtype(targets[part], key, torch.bfloat16) or torch.float32)
        assert got.dtype == want.dtype and torch.equal(got, want), k
    for got_mod, make in ((new.llm, lambda: build_component("llm", recipe["model"]["llm"])),
                          (new.mask_decoder, lambda: build_sam("vit_h"))):
        ref = _buffers(make())
        for k, b in _buffers(got_mod).items():
            assert torch.equal(b, ref[k]), k
        del ref
