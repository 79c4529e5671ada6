"""The tiny recipes with other vision towers (another patch count, open_clip, SigLIP, timm
ViT and ConvNeXt): the projector's size follows the tower, [SEG] is found where an
independent count of the spliced image tokens puts it, and generation's [SEG] embedding
equals the teacher-forced one, and lisa_kit's checkpoint format rebuilds each tower.
lisa-tiny-clip336 is the 336 px case at toy size: 36 patches where LISA's code hard-codes
255 (= 256 - 1) extra positions per image."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lisa_kit.generation as gen
from lisa_kit.builder import load
from lisa_kit.conversation import IMAGE, Conversation, encode, get_template
from lisa_kit.data import Sample, collate
from lisa_kit.model import Batch
from lisa_kit.testing import force_generation, synthetic_image

# recipe -> visual tokens per image
TOWER_RECIPES = {"lisa-tiny-clip336": 36, "lisa-tiny-openclip": 16, "lisa-tiny-siglip": 16,
                 "lisa-tiny-timm-vit": 16, "lisa-tiny-timm-convnext": 4}
_MODELS: dict = {}


@pytest.fixture(params=list(TOWER_RECIPES))
def named_model(request):
    name = request.param
    if name not in _MODELS:
        torch.manual_seed(0)
        _MODELS[name] = load(name).eval()
    return name, _MODELS[name]


def _conv(q="Can you segment the red square?", a="Sure, it is [SEG]."):
    return Conversation(get_template("llava_v1")).add([IMAGE, "\n" + q], a)


def test_seg_row_is_where_the_image_tokens_put_it(named_model):
    name, model = named_model
    n = model.vision_encoder.num_tokens
    assert n == TOWER_RECIPES[name]
    assert model.projector.in_dim == model.vision_encoder.feature_dim  # derived, not written
    img0, m0 = synthetic_image(48, 64, 0)
    img1, m1 = synthetic_image(40, 30, 1)
    two = _conv(a="[SEG] and [SEG].")
    batch = collate([Sample(img0, [two], np.stack([m0, 1 - m0])), Sample(img1, [_conv()], m1[None])], model)
    with torch.no_grad():
        out = model(batch)
    seg_id, slot = model.seg_token_id, model.fusion.IMAGE_SLOT
    # Independent count (right padding): every image slot before [SEG] became n rows, so
    # text position t lands on t + (n - 1) * slots; the released models read the row before.
    # (LISA's code adds 255 instead of n - 1, right only for 256-patch towers.)
    expected = []
    for b, row in enumerate(batch.input_ids.tolist()):
        for t, tok in enumerate(row):
            if tok == seg_id and batch.attention_mask[b, t]:
                fused = t + (n - 1) * row[:t].count(slot)
                expected.append([b, t, fused - 1])
                torch.testing.assert_close(out.fused.inputs_embeds[b, fused], model.llm.embed(torch.tensor(seg_id)))
    assert out.seg_index.tolist() == expected and len(expected) == 3
    rows = torch.tensor([e[0] for e in expected]), torch.tensor([e[2] for e in expected])
    with torch.no_grad():
        torch.testing.assert_close(out.seg_embeddings, model.seg_head(out.hidden[rows]), atol=1e-6, rtol=1e-6)
    assert [p.shape for p in out.pred_masks] == [(2, 48, 64), (1, 40, 30)]


def test_generation_seg_matches_teacher_forcing(named_model, monkeypatch):
    _, model = named_model
    tok = model.tokenizer
    seg, eos, word = model.seg_token_id, tok.eos_id, tok.encode_text("red")[0]
    img, _ = synthetic_image(45, 61, 3)
    conv = Conversation(get_template("llava_v1")).add([IMAGE, "\nSegment the red square."], None)
    ids, _ = encode(conv, tok, model.fusion.wrap_image(tok))
    px, meta = model.mask_decoder.preprocess(img)
    vpx, mpx = model.vision_encoder.preprocess(img)[None], px[None]
    force_generation(monkeypatch, {0: word, 1: seg, 2: eos})  # patches gen.generate
    with torch.no_grad():
        res = gen.generate(model, [ids], [[0]], vpx, mpx, [meta], gen.GenerationConfig(max_new_tokens=8))[0]
        assert res.token_ids == [word, seg, eos] and res.masks.shape == (1, 45, 61)
        full = torch.tensor([ids + res.token_ids])
        out = model(Batch(full, torch.ones_like(full, dtype=torch.bool), [[0]], vpx, mpx, [meta]))
    torch.testing.assert_close(res.seg_embeddings, out.seg_embeddings, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.masks, out.pred_masks[0], atol=1e-4, rtol=1e-4)


def test_native_checkpoint_round_trip(named_model, tmp_path):
    """lisa_kit's own format rebuilds each tower from its export_config (open_clip model
    configs, timm names and kwargs, resolved preprocessing) and loads its weights strictly."""
    from lisa_kit.checkpoint.native import load_model, save_model

    _, model = named_model
    save_model(model, tmp_path / "ckpt")
    torch.manual_seed(1)
    again = load_model(tmp_path / "ckpt").eval()
    img, _ = synthetic_image(45, 61, 4)
    assert torch.equal(model.vision_encoder.preprocess(img), again.vision_encoder.preprocess(img))
    assert again.vision_encoder.num_tokens == model.vision_encoder.num_tokens
    px = model.vision_encoder.preprocess(img)[None]
    with torch.no_grad():
        torch.testing.assert_close(again.encode_vision(px), model.encode_vision(px), atol=0, rtol=0)
