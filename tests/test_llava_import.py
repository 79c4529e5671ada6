"""Starting from a transformers LLaVA checkpoint (LLaVA-1.5 bases): the split into
hf_clip + mlp2x_gelu + hf_causal_lm reproduces transformers' own LLaVA forward."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lisa_kit.builder import load
from lisa_kit.errors import CheckpointError
from lisa_kit.testing import synthetic_image, tiny_recipe, tiny_tokenizer_dir

IMAGE_TOKEN = 390  # a padding row of the tiny LLaVA's 400-row embedding (tokenizer: 384)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("llava")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=56, patch_size=14, projection_dim=32, hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=400, max_position_embeddings=512, tie_word_embeddings=False)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                      image_token_index=IMAGE_TOKEN))
    model.eval().save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(out)
    for f in tiny_tokenizer_dir().iterdir():
        shutil.copy(f, out / f.name)
    return out, model


def _recipe(path):
    r = tiny_recipe()
    m = r["model"]
    for k in ("vision_encoder", "projector", "llm"):
        m[k] = {"name": m[k]["name"]}
    m["projector"] = {"name": "mlp2x_gelu"}
    m["fusion"] = {"name": "llava_splice", "use_im_start_end": False}
    r["weights"] = {"format": "llava_hf", "path": str(path)}
    return r


def _logits_both(model, hf):
    img, _ = synthetic_image(60, 80, 3)
    tok = model.tokenizer
    before, after = tok.encode_text("USER: what is red?"), tok.encode_text("ASSISTANT: a square")
    pixels = model.vision_encoder.preprocess(img)[None]
    n = model.vision_encoder.num_tokens
    with torch.no_grad():
        hf_ids = torch.tensor([[tok.bos_id, *before, *[IMAGE_TOKEN] * n, *after]])
        ref = hf(input_ids=hf_ids, pixel_values=pixels, attention_mask=torch.ones_like(hf_ids)).logits
        ids = torch.tensor([[tok.bos_id, *before, model.fusion.IMAGE_SLOT, *after]])
        fused = model.fusion.fuse(ids, torch.ones_like(ids, dtype=torch.bool), None, model.encode_vision(pixels),
                                  [[0]], model.llm.embed)
        ours = model.llm(fused.inputs_embeds, attention_mask=fused.attention_mask.long(),
                         position_ids=fused.position_ids).logits
    return ref, ours


def test_llava_import_matches_transformers(llava_dir):
    path, hf = llava_dir
    model = load(_recipe(path))
    assert model.projector.export_config()["depth"] == 2
    assert model.vision_encoder.num_tokens == 16 and model.vision_encoder.crop_size == 56
    ref, ours = _logits_both(model, hf)
    n_base = 384
    assert ours.shape[:2] == ref.shape[:2]
    torch.testing.assert_close(ours[..., :n_base], ref[..., :n_base], atol=1e-5, rtol=1e-5)
    # [SEG] is a new row started at the mean of the tokenizer's rows, not a padding row
    seg = model.seg_token_id
    assert seg >= n_base
    emb = model.llm.model.get_input_embeddings().weight
    torch.testing.assert_close(emb[seg], hf.get_input_embeddings().weight[:n_base].mean(0))


def test_hub_layout_with_vision_model_prefix(llava_dir, tmp_path):
    """Hub checkpoints store ``vision_tower.vision_model.*``; newer saves ``model.language_model.*``."""
    path, hf = llava_dir
    hub = tmp_path / "hub"
    shutil.copytree(path, hub)
    state = load_file(hub / "model.safetensors")
    renamed = {}
    for k, v in state.items():
        if k.startswith("vision_tower."):
            k = "model.vision_tower.vision_model." + k[len("vision_tower."):]
        elif k.startswith("language_model.model."):
            k = "model.language_model." + k[len("language_model.model."):]
        elif k == "language_model.lm_head.weight":
            k = "lm_head.weight"
        elif k.startswith("multi_modal_projector."):
            k = "model." + k
        renamed[k] = v.contiguous()
    save_file(renamed, hub / "model.safetensors")
    model = load(_recipe(hub))
    ref, ours = _logits_both(model, hf)
    torch.testing.assert_close(ours[..., :384], ref[..., :384], atol=1e-5, rtol=1e-5)


def test_foreign_keys_and_configs_are_named(llava_dir, tmp_path):
    path, _ = llava_dir
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    state = load_file(bad / "model.safetensors")
    state["image_newline"] = torch.zeros(64)
    save_file({k: v.contiguous() for k, v in state.items()}, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match="image_newline"):
        load(_recipe(bad))
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "llama"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="lisa_hf"):
        load(_recipe(bad))
