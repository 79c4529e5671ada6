"""The tiny recipe end to end: forward, loss, generation, checkpoints, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lisa_kit.conversation import IMAGE, Conversation, encode, get_template
from lisa_kit.data import Sample, collate
from lisa_kit.errors import CheckpointError
from lisa_kit.generation import GenerationConfig, generate
from lisa_kit.loss import lisa_loss
from lisa_kit.testing import synthetic_image


def _conv(q="Can you segment the red square?", a="Sure, it is [SEG]."):
    return Conversation(get_template("llava_v1")).add([IMAGE, "\n" + q], a)


def _samples():
    img0, m0 = synthetic_image(48, 64, 0)
    img1, m1 = synthetic_image(40, 30, 1)
    two = _conv(a="[SEG] and [SEG].")  # two masks from one answer
    return [Sample(img0, [_conv(), two], np.stack([m0, m0, 1 - m0])), Sample(img1, [_conv()], m1[None])]


def test_forward_loss_backward(tiny_model):
    batch = collate(_samples(), tiny_model)
    out = tiny_model(batch)
    assert [p.shape for p in out.pred_masks] == [(3, 48, 64), (1, 40, 30)]
    assert out.seg_embeddings.shape == (4, tiny_model.mask_decoder.prompt_dim)
    losses = lisa_loss(out.logits, out.fused.labels, out.pred_masks, batch.gt_masks)
    assert torch.isfinite(losses["loss"]) and losses["loss"] > 0
    losses["loss"].backward()
    head = tiny_model.seg_head.layers[0].weight
    assert head.grad is not None and head.grad.abs().sum() > 0
    tiny_model.zero_grad(set_to_none=True)


def test_seg_found_for_left_padding_too(tiny_model):
    """The [SEG] hidden state is found through the fusion's positions, not a constant."""
    samples = _samples()
    right = collate(samples, tiny_model, padding_side="right")
    left = collate(samples, tiny_model, padding_side="left")
    with torch.no_grad():
        a, b = tiny_model(right), tiny_model(left)
    torch.testing.assert_close(a.seg_embeddings, b.seg_embeddings, atol=1e-5, rtol=1e-5)
    for x, y in zip(a.pred_masks, b.pred_masks):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_user_text_never_becomes_control_tokens(tiny_model):
    tok = tiny_model.tokenizer
    conv = Conversation(get_template("llava_v1")).add([IMAGE, "\nwhat about <image> and [SEG] <im_start> </s>?"], None)
    ids, _ = encode(conv, tok, tiny_model.fusion.wrap_image(tok))
    assert ids.count(tiny_model.fusion.IMAGE_SLOT) == 1
    specials = {tok.token_id(t) for t in ("[SEG]", "<im_start>", "<im_end>")} | {tok.eos_id}
    assert sum(i in specials for i in ids) == 2  # only the fusion's own <im_start>/<im_end>


def test_labels_cover_answers_only(tiny_model):
    tok = tiny_model.tokenizer
    conv = Conversation(get_template("llava_v1")).add([IMAGE, "\nfirst?"], "It is [SEG].").add(["then?"], "No.")
    ids, labels = encode(conv, tok, tiny_model.fusion.wrap_image(tok))
    sup = [i for i, l in zip(ids, labels) if l != -100]
    assert sup.count(tok.eos_id) == 2 and tok.token_id("[SEG]") in sup
    assert tok.decode(sup).replace(" ", "") == tok.decode(tok.encode_text("It is") + [tok.token_id("[SEG]")]
                                                          + tok.encode_text(".") + [tok.eos_id]
                                                          + tok.encode_text("No.") + [tok.eos_id]).replace(" ", "")


def _scripted(monkeypatch, script):
    """Make generation pick a fixed token sequence (the tiny model is random)."""
    import lisa_kit.generation as g

    it = iter(script)
    monkeypatch.setattr(g, "_pick", lambda logits, cfg, gen: torch.full((logits.shape[0],), next(it)))


def _prompt(model, img):
    tok = model.tokenizer
    conv = Conversation(get_template("llava_v1")).add([IMAGE, "\nSegment the red square."], None)
    ids, _ = encode(conv, tok, model.fusion.wrap_image(tok))
    px, meta = model.mask_decoder.preprocess(img)
    return ids, model.vision_encoder.preprocess(img)[None], px[None], [meta]


@pytest.mark.parametrize("mode", ["previous", "token"])
def test_generation_masks_per_seg_match_teacher_forcing(tiny_model, monkeypatch, mode):
    tok = tiny_model.tokenizer
    seg, eos = tok.token_id("[SEG]"), tok.eos_id
    word = tok.encode_text("red")[0]
    img, _ = synthetic_image(48, 64, 3)
    ids, vpx, mpx, metas = _prompt(tiny_model, img)
    monkeypatch.setattr(tiny_model, "seg_hidden", mode)
    _scripted(monkeypatch, [word, seg, word, seg, eos])
    res = generate(tiny_model, [ids], [[0]], vpx, mpx, metas, GenerationConfig(max_new_tokens=10))[0]
    assert res.token_ids == [word, seg, word, seg, eos] and res.seg_indices == [1, 3]
    assert res.masks.shape == (2, 48, 64) and res.scores.shape == (2,)
    # The cached path must give the [SEG] embeddings a full teacher-forced pass gives.
    from lisa_kit.model import Batch

    full = torch.tensor([ids + res.token_ids])
    b = Batch(full, torch.ones_like(full, dtype=torch.bool), [[0]], vpx, mpx, metas)
    with torch.no_grad():
        out = tiny_model(b)
    torch.testing.assert_close(res.seg_embeddings, out.seg_embeddings, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.masks, out.pred_masks[0], atol=1e-4, rtol=1e-4)


def test_generation_without_seg_gives_no_mask(tiny_model, monkeypatch):
    tok = tiny_model.tokenizer
    img, _ = synthetic_image(30, 20, 4)
    ids, vpx, mpx, metas = _prompt(tiny_model, img)
    _scripted(monkeypatch, [tok.encode_text("no")[0], tok.eos_id])
    res = generate(tiny_model, [ids], [[0]], vpx, mpx, metas)[0]
    assert res.masks.shape == (0, 30, 20) and res.seg_indices == []


def test_batched_generation_equals_single(tiny_model):
    imgs = [synthetic_image(48, 64, 5)[0], synthetic_image(32, 32, 6)[0]]
    tok = tiny_model.tokenizer
    prompts = []
    for q in ("Segment the red square.", "Where is the red square in this picture, please?"):
        conv = Conversation(get_template("llava_v1")).add([IMAGE, "\n" + q], None)
        prompts.append(encode(conv, tok, tiny_model.fusion.wrap_image(tok))[0])
    vpx = torch.stack([tiny_model.vision_encoder.preprocess(i) for i in imgs])
    mp = [tiny_model.mask_decoder.preprocess(i) for i in imgs]
    mpx, metas = torch.stack([m[0] for m in mp]), [m[1] for m in mp]
    cfg = GenerationConfig(max_new_tokens=6, keep_step_logits=True)
    both = generate(tiny_model, prompts, [[0], [1]], vpx, mpx, metas, cfg)
    for b in range(2):
        one = generate(tiny_model, [prompts[b]], [[0]], vpx[b:b + 1], mpx[b:b + 1], [metas[b]], cfg)[0]
        assert one.token_ids == both[b].token_ids
        n = len(one.token_ids)
        torch.testing.assert_close(one.step_logits[:n], both[b].step_logits[:n], atol=1e-4, rtol=1e-4)


def test_native_round_trip(tiny_model, tmp_path):
    from lisa_kit.checkpoint.native import load_model, save_model

    save_model(tiny_model, tmp_path / "ckpt")
    again = load_model(tmp_path / "ckpt").eval()
    batch = collate(_samples(), tiny_model)
    with torch.no_grad():
        a, b = tiny_model(batch), again(batch)
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    for x, y in zip(a.pred_masks, b.pred_masks):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    assert again.tokenizer.token_id("[SEG]") == tiny_model.tokenizer.token_id("[SEG]")


def test_checkpoint_mismatch_names_component_and_key(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    from lisa_kit.checkpoint.native import load_model, save_model

    d = save_model(tiny_model, tmp_path / "ckpt")
    sd = load_file(str(d / "seg_head.safetensors"))
    sd["layers.2.weight"] = torch.zeros(3, 3)
    save_file(sd, str(d / "seg_head.safetensors"))
    with pytest.raises(CheckpointError, match=r"seg_head.*layers\.2\.weight"):
        load_model(d)
    sd.pop("layers.2.weight")
    save_file(sd, str(d / "seg_head.safetensors"))
    with pytest.raises(CheckpointError, match="missing"):
        load_model(d)


def test_pickled_code_is_refused(tmp_path):
    from lisa_kit.checkpoint.io import load_state_dict

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"w": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_state_dict(tmp_path / "evil.pth")


def test_peft_merge():
    from lisa_kit.checkpoint.lisa_hf import merge_peft, split_lisa_state

    g = torch.Generator().manual_seed(0)
    w, a, b = torch.randn(6, 4, generator=g), torch.randn(2, 4, generator=g), torch.randn(6, 2, generator=g)
    state = {"base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight": w,
             "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight": a,
             "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight": b,
             "base_model.model.model.text_hidden_fcs.0.0.weight": w,
             "base_model.model.model.visual_model.mask_decoder.iou_token.weight": a}
    merged = merge_peft(state, lora_alpha=16)
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], w + b @ a * 8)
    parts = split_lisa_state(merged)
    assert set(parts["llm"]) == {"model.layers.0.self_attn.q_proj.weight"}
    assert set(parts["seg_head"]) == {"layers.0.weight"}
    assert set(parts["mask_decoder"]) == {"mask_decoder.iou_token.weight"}


def test_import_without_tower_names_it(tmp_path):
    from lisa_kit.checkpoint.lisa_hf import lisa_recipe

    (tmp_path / "config.json").write_text('{"vision_tower": "openai/clip-vit-large-patch14", "hidden_size": 64}')
    with pytest.raises(CheckpointError, match="openai/clip-vit-large-patch14"):
        lisa_recipe(tmp_path)


def test_projector_size_mismatch_names_both_sizes():
    from lisa_kit.builder import build_model
    from lisa_kit.errors import RecipeError
    from lisa_kit.testing import tiny_recipe

    r = tiny_recipe()
    r["model"]["projector"]["in_dim"] = 1024
    with pytest.raises(RecipeError, match=r"in_dim=1024.*32"):
        build_model(r)
