"""Parity with the original LISA code on the reference fixture.

Every expectation is read from the fixture directory (``$LISA_KIT_REFERENCE_FIXTURE``,
default ``seed0`` under ../shared/fixtures/lisa_reference); nothing about its sizes,
number of images or conversations is assumed here. Skips when the fixture is absent.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from lisa_kit.testing import fixture_dir

FX = fixture_dir()
pytestmark = [pytest.mark.parity,
              pytest.mark.skipif(FX is None, reason="LISA reference fixture (../shared) not present")]

# Tolerances (fp32, CPU), from the fixture README's guidance.
EMB_ATOL = 1e-5     # embeddings, hidden states, [SEG] embeddings
LOGIT_ATOL = 1e-4   # LM logits, mask logits (values of O(1)..O(10))
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def fx():
    from safetensors.torch import load_file

    manifest = json.loads((FX / "manifest.json").read_text())
    return {"m": manifest, "t": load_file(str(FX / manifest["tensors_file"]))}


@pytest.fixture(scope="module")
def model(fx):
    from lisa_kit.checkpoint.lisa_hf import import_lisa_hf

    m = fx["m"]
    return import_lisa_hf(FX / m["checkpoint_dir"], vision_tower=str(FX / m["vision_tower_dir"]), sam=m["sam_config"])


def _rgb(path):
    return np.asarray(Image.open(path).convert("RGB"))


def _answer(conversation: str) -> str:
    """The assistant text of a rendered llava_v1 conversation (one round)."""
    from lisa_kit.conversation import get_template

    tpl = get_template("llava_v1")
    return conversation.split(tpl.assistant_prefix, 1)[1].strip().removesuffix("</s>")


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def train(fx, model):
    from lisa_kit.conversation import IMAGE, Conversation, get_template
    from lisa_kit.data import Sample, collate

    m, t = fx["m"], fx["t"]
    tr = m["train"]
    convs = iter(tr["conversation_list"])
    samples = []
    for i, (path, questions) in enumerate(zip(tr["image_paths"], tr["questions_list"])):
        cs = []
        for q in questions:
            assert q.startswith("<image>")  # the dataset's marker: an image slot, then the question
            cs.append(Conversation(get_template("llava_v1")).add([IMAGE, q[len("<image>"):]], _answer(next(convs))))
        samples.append(Sample(_rgb(FX / path), cs, t[f"train.gt_masks.{i}"].numpy()))
    batch = collate(samples, model)
    model.train()
    torch.manual_seed(0)
    out = model(batch)
    from lisa_kit.loss import LossWeights, lisa_loss

    w = tr.get("loss_weights", {"ce": 1.0, "bce": 2.0, "dice": 0.5})
    losses = lisa_loss(out.logits, out.fused.labels, out.pred_masks, batch.gt_masks,
                       LossWeights(w["ce"], w["bce"], w["dice"]))
    losses["loss"].backward()
    return batch, out, losses


def test_collate_matches(fx, train):
    batch, _, _ = train
    t = fx["t"]
    assert torch.equal(batch.input_ids, t["train.input_ids"])
    assert torch.equal(batch.labels, t["train.labels"])
    assert torch.equal(batch.attention_mask, t["train.attention_masks"].bool())
    offset = t["train.offset"].tolist()
    expect_rows = [[i] for i in range(len(offset) - 1) for _ in range(offset[i], offset[i + 1])]
    assert batch.row_images == expect_rows


def test_image_preprocessing_matches(fx, train):
    batch, _, _ = train
    torch.testing.assert_close(batch.vision_pixels, fx["t"]["train.images_clip"], atol=1e-6, rtol=0)
    for i, info in enumerate(fx["m"]["train_sam_images"]):
        assert [batch.metas[i].input_size[0], batch.metas[i].input_size[1]] == info["resize"]
        assert _sha(batch.mask_pixels[i]) == info["sha256_fp32"], "SAM input not bit-exact"


def test_fused_inputs_and_hidden_states(fx, train):
    _, out, _ = train
    t = fx["t"]
    torch.testing.assert_close(out.fused.inputs_embeds, t["train.mm.inputs_embeds"], atol=EMB_ATOL, rtol=0)
    assert torch.equal(out.fused.labels, t["train.mm.labels"])
    valid = t["train.mm.attention_mask"].bool()
    assert torch.equal(out.fused.attention_mask, valid)
    # Outputs at padded (masked) positions are not meaningful and are not compared.
    torch.testing.assert_close(out.hidden[valid], t["train.hidden_states_last"][valid], atol=EMB_ATOL, rtol=0)


def test_seg_positions_match(fx, train):
    _, out, _ = train
    expect = fx["t"]["train.seg_token_mask"].bool().nonzero()
    got = out.seg_index[:, [0, 2]]
    assert torch.equal(got, expect)


def test_logits_match(fx, train):
    _, out, _ = train
    t = fx["t"]
    pos = t["train.label_positions"]
    torch.testing.assert_close(out.logits[pos[:, 0], pos[:, 1]], t["train.logits_at_label_positions"],
                               atol=LOGIT_ATOL, rtol=0)
    v = out.logits.shape[-1]
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, v), out.fused.labels[:, 1:].reshape(-1),
                                           ignore_index=-100, reduction="none").view(out.logits.shape[0], -1)
    torch.testing.assert_close(ce, t["train.ce_per_token"], atol=1e-5, rtol=1e-5)


def test_seg_embeddings_and_masks_match(fx, train, model):
    batch, out, _ = train
    t = fx["t"]
    for i in range(len(batch.metas)):
        torch.testing.assert_close(out.seg_embeddings[out.seg_of_image[i]], t[f"train.pred_embeddings.{i}"],
                                   atol=EMB_ATOL, rtol=0)
        torch.testing.assert_close(out.low_res_masks[i], t[f"train.low_res_masks.{i}"], atol=LOGIT_ATOL, rtol=0)
        torch.testing.assert_close(out.scores[i], t[f"train.iou_predictions.{i}"], atol=LOGIT_ATOL, rtol=0)
        torch.testing.assert_close(out.pred_masks[i], t[f"train.pred_masks.{i}"], atol=LOGIT_ATOL, rtol=0)
    with torch.no_grad():
        emb = model.mask_decoder.encode_image(batch.mask_pixels)["image_embeddings"]
    for i in range(len(batch.metas)):
        torch.testing.assert_close(emb[i:i + 1, :, ::4, ::4], t[f"train.image_embeddings_sub4.{i}"],
                                   atol=LOGIT_ATOL, rtol=0)


def test_losses_match(fx, train):
    _, _, losses = train
    for k, v in fx["m"]["train"]["losses"].items():
        assert losses[k].item() == pytest.approx(v, rel=LOSS_RTOL), k


def test_gradients_match(fx, train, model):
    """Grad norms after ``loss.backward()`` for the tensors LISA trains."""
    ref = fx["m"]["train"]["grad_norms_after_backward"]
    params = dict(model.named_parameters())

    def ours(name):
        if name.startswith("model.visual_model."):
            return "mask_decoder." + name[len("model.visual_model."):]
        if name.startswith("model.text_hidden_fcs.0."):
            return "seg_head.layers." + name[len("model.text_hidden_fcs.0."):]
        return "llm.model." + name

    checked = 0
    for name, norm in ref.items():
        p = params[ours(name)]
        assert p.grad is not None, name
        got = p.grad.norm().item()
        assert got == pytest.approx(norm, rel=1e-3, abs=1e-5), name
        checked += 1
    assert checked == len(ref) > 0


def test_generation_matches(fx, model):
    from lisa_kit.conversation import IMAGE, Conversation, encode, get_template
    from lisa_kit.generation import GenerationConfig, generate

    m, t = fx["m"], fx["t"]
    inf = m["infer"]
    model.eval()
    tok = model.tokenizer
    conv = Conversation(get_template("llava_v1")).add([IMAGE, "\n" + inf["user_text"]], None)
    ids, _ = encode(conv, tok, model.fusion.wrap_image(tok))
    assert ids == t["infer.input_ids"][0].tolist()
    img = _rgb(FX / inf["image_path"])
    sam_px, meta = model.mask_decoder.preprocess(img)
    assert _sha(sam_px) == m["infer_sam_image"]["sha256_fp32"]
    assert list(meta.original_size) == inf["original_size"]
    clip_px = model.vision_encoder.preprocess(img)[None]
    torch.testing.assert_close(clip_px, t["infer.images_clip"], atol=1e-6, rtol=0)
    res = generate(model, [ids], [[0]], clip_px, sam_px[None], [meta],
                   GenerationConfig(max_new_tokens=inf["max_new_tokens"], keep_step_logits=True))[0]
    assert res.token_ids == inf["generated_ids"]
    assert tok.convert_ids_to_tokens(res.token_ids) == inf["generated_tokens"]
    torch.testing.assert_close(res.step_logits, t["infer.step_logits"], atol=LOGIT_ATOL, rtol=0)
    n_seg = sum(1 for x in inf["generated_ids"] if x == tok.token_id("[SEG]"))
    assert res.masks.shape[0] == n_seg == len(res.seg_indices)
    torch.testing.assert_close(res.seg_embeddings, t["infer.pred_embeddings.0"], atol=EMB_ATOL, rtol=0)
    torch.testing.assert_close(res.low_res_masks, t["infer.low_res_masks.0"], atol=LOGIT_ATOL, rtol=0)
    torch.testing.assert_close(res.masks, t["infer.pred_masks.0"], atol=LOGIT_ATOL, rtol=0)
    # The original's chat.py text, less its prompt: the decoded answer.
    assert inf["text_output_chat"].endswith(tok.decode(res.token_ids))


def test_reference_recipe_reproduces_the_original(fx, train):
    """``recipes/lisa-7b.yaml`` pointed at the fixture checkpoint (only the paths and the
    tiny SAM sizes overridden) gives the original's numbers."""
    from lisa_kit.builder import load

    m, t = fx["m"], fx["t"]
    sam = json.dumps({"name": "sam", "variant": "custom", "config": m["sam_config"]})
    model = load("lisa-7b", [f"weights.path={FX / m['checkpoint_dir']}",
                             f"model.vision_encoder.pretrained={FX / m['vision_tower_dir']}",
                             f"model.mask_decoder={sam}"]).eval()
    batch = train[0]
    with torch.no_grad():
        out = model(batch)
    pos = t["train.label_positions"]
    torch.testing.assert_close(out.logits[pos[:, 0], pos[:, 1]], t["train.logits_at_label_positions"],
                               atol=LOGIT_ATOL, rtol=0)
    for i in range(len(batch.metas)):
        torch.testing.assert_close(out.pred_masks[i], t[f"train.pred_masks.{i}"], atol=LOGIT_ATOL, rtol=0)
