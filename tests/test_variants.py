"""LISA's successors as recipe options, each off by default: several [SEG] per answer
(LISA++/GLaMM), a reject token [REJ] (GSVA), and the [SEG] state read from a chosen LLM
layer or a learned mix of layers. Per variant recipe: forward, loss, generation, native
save/load and a short ``lisa-kit train`` (CPU, tiny models)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lisa_kit.builder import build_model, load
from lisa_kit.conversation import IMAGE, Conversation, Tok, encode, get_template
from lisa_kit.data import Sample, collate
from lisa_kit.datasets.synthetic import SyntheticReasoningSet
from lisa_kit.errors import CheckpointError, RecipeError
from lisa_kit.generation import GenerationConfig
from lisa_kit.loss import bce_loss, lisa_loss
from lisa_kit.model import Batch
from lisa_kit.prompts import MultiSeg, build_sample, seg_turns, turns_to_sample
from lisa_kit.recipes import load_recipe, validate_recipe
from lisa_kit.testing import force_generation, synthetic_image, tiny_recipe

TPL = get_template("llava_v1")
VARIANTS = ["lisa-tiny-multiseg", "lisa-tiny-reject", "lisa-tiny-seg-mix", "lisa-tiny-seg-token"]
_BUILT: dict = {}


def _model(name: str):
    """A variant recipe's model, built once per session with seed 0 (tests must not change
    its weights). Only the seg path (seg head, seg-layer mix) takes gradients: a backward
    pass then stays cheap on a shared CPU."""
    if name not in _BUILT:
        torch.manual_seed(0)
        model = load(name).eval().requires_grad_(False)
        model.seg_head.requires_grad_(True)
        model.seg_layers.requires_grad_(True)
        _BUILT[name] = model
    return _BUILT[name]


def _data_cfg(name: str) -> dict:
    return OmegaConf.to_container(load_recipe(name).cfg, resolve=True).get("data")


def _prompt(model, img, q="Segment the red circle and the blue square."):
    ids, _ = encode(Conversation(TPL).add([IMAGE, "\n" + q], None), model.tokenizer,
                    model.fusion.wrap_image(model.tokenizer))
    px, meta = model.mask_decoder.preprocess(img)
    return ids, model.vision_encoder.preprocess(img)[None], px[None], [meta]


def _generate_and_teacher(model, monkeypatch, script):
    """Generate with ``script`` forced, then run the same tokens teacher-forced; returns
    (generated, teacher-forced output)."""
    img, _ = synthetic_image(40, 56, 7)
    ids, vpx, mpx, metas = _prompt(model, img)
    force_generation(monkeypatch, dict(enumerate(script)))
    import lisa_kit.generation as g

    res = g.generate(model, [ids], [[0]], vpx, mpx, metas, GenerationConfig(max_new_tokens=len(script)))[0]
    assert res.token_ids == list(script)
    full = torch.tensor([ids + res.token_ids])
    with torch.no_grad():
        out = model(Batch(full, torch.ones_like(full, dtype=torch.bool), [[0]], vpx, mpx, metas))
    return res, out


# -- conformance of every variant recipe ---------------------------------------------------

@pytest.mark.parametrize("name", VARIANTS)
def test_variant_forward_loss_generation_save_load(name, tmp_path, monkeypatch):
    from lisa_kit.checkpoint.native import load_model, save_model
    from lisa_kit.datasets.hybrid import hybrid_from_config

    model = _model(name)
    cfg = {**(_data_cfg(name) or _data_cfg("lisa-tiny-synthetic")), "samples_per_epoch": 4}
    cfg["sources"]["synthetic"]["options"]["size"] = 20
    ds = hybrid_from_config(cfg, TPL, reject_token=model.reject_token)
    batch = collate([ds[i] for i in range(3)], model, max_length=256)
    out = model(batch)
    n_seg = int((batch.input_ids == model.seg_token_id).sum())
    assert sum(p.shape[0] for p in out.pred_masks) == n_seg == sum(g.shape[0] for g in batch.gt_masks)
    losses = lisa_loss(out.logits, out.fused.labels, out.pred_masks, batch.gt_masks)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    trained = [model.seg_head.layers[0].weight, *model.seg_layers.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    model.zero_grad(set_to_none=True)

    # generation: one mask per [SEG] (and [REJ]), the same [SEG] states as teacher forcing
    tok = model.tokenizer
    word, seg, eos = tok.encode_text("red")[0], model.seg_token_id, tok.eos_id
    rej = model.reject_token_id
    script = [word, seg, word, seg, eos] if rej is None else [seg, word, rej, seg, eos]
    res, teacher = _generate_and_teacher(model, monkeypatch, script)
    assert res.masks.shape == (3 if rej is not None else 2, 40, 56)
    assert res.rejected == ([False, False] if rej is None else [False, True, False])
    torch.testing.assert_close(res.seg_embeddings, teacher.seg_embeddings, atol=1e-5, rtol=1e-5)
    decoded = res.masks[[k for k, r in enumerate(res.rejected) if not r]]
    torch.testing.assert_close(decoded, teacher.pred_masks[0], atol=1e-4, rtol=1e-4)

    # lisa_kit's own format keeps every setting and weight
    save_model(model, tmp_path / "ckpt")
    again = load_model(tmp_path / "ckpt").eval()
    assert (again.seg_layers.spec, again.reject_token, again.seg_hidden) == (
        model.seg_layers.spec, model.reject_token, model.seg_hidden)
    assert again.reject_token_id == model.reject_token_id
    with torch.no_grad():
        a, b = model(batch), again(batch)
    torch.testing.assert_close(a.seg_embeddings, b.seg_embeddings, atol=0, rtol=0)
    for x, y in zip(a.pred_masks, b.pred_masks):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["lisa-tiny-multiseg", "lisa-tiny-reject", "lisa-tiny-seg-mix"])
def test_lisa_kit_train_runs(name, tmp_path):
    from lisa_kit.cli import main
    from lisa_kit.train.checkpointing import load_trained_model

    quick = ["train.warmup_steps=0", "train.batch_size=2", "train.grad_accumulation=1", "train.val=null",
             "train.workers=0", "train.steps=1", "data.samples_per_epoch=2", "data.sources.synthetic.options.size=8",
             "data.explanatory=-1"]
    extra = {"lisa-tiny-multiseg": ["data.multi_seg.prob=1.0"],
             "lisa-tiny-reject": ["data.sources.synthetic.options.absent_ratio=0.5"]}.get(name, [])
    run = tmp_path / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: one thread is as fast and sharing cores does not hurt
    try:
        assert main(["train", name, *quick, *extra, "--out", str(run), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(n)
    log = [json.loads(line) for line in (run / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1] and np.isfinite(log[0]["loss"])
    if name == "lisa-tiny-seg-mix":  # the mix weights are trained and come back with the checkpoint
        model = load_trained_model(run)
        assert model.seg_layers.logits.abs().sum() > 0


# -- several [SEG] per answer ----------------------------------------------------------------

def _attribute_record(absent_ratio=0.0, i=0):
    ds = SyntheticReasoningSet(None, "train", size=50, seed=3, question_types=["attribute"], absent_ratio=absent_ratio)
    return next(r for r in (ds[k] for k in range(i, 50)) if len(r.targets) == 3)


def test_multi_seg_question_pairs_each_seg_with_its_target_in_order():
    rec = _attribute_record()
    turns = seg_turns(rec, np.random.default_rng(0), 3, multi_seg=MultiSeg(prob=1.0, max_targets=3))
    multi = turns[0]
    k = multi.answer.count("[SEG]")
    assert k >= 2 and multi.mask_targets() == multi.seg_targets and len(multi.seg_targets) == k
    for t in multi.seg_targets:  # the question names every target it asks for
        assert rec.targets[t].text.lower().removeprefix("the ") in multi.question.lower()
    sample = turns_to_sample(rec, turns, TPL)
    order = [t for turn in turns for t in turn.mask_targets()]
    assert sample.masks.shape[0] == len(order) == sum(c.rounds[0][1].count(Tok("[SEG]"))
                                                       for c in sample.conversations)
    for m, t in zip(sample.masks, order):
        np.testing.assert_array_equal(m, rec.targets[t].mask.astype(np.float32))


def test_multi_seg_config():
    assert MultiSeg.from_config(None) is None and MultiSeg.from_config(True) == MultiSeg()
    assert MultiSeg.from_config({"prob": 1, "max_targets": 2}) == MultiSeg(1.0, 2)
    with pytest.raises(RecipeError, match=r"data\.multi_seg\.prob"):
        MultiSeg.from_config({"prob": 2})
    with pytest.raises(RecipeError, match=r"data\.multi_seg\.max_targets"):
        MultiSeg.from_config({"max_targets": 1})
    with pytest.raises(RecipeError, match=r"data\.multi_seg\.targets"):
        MultiSeg.from_config({"targets": 3})


def test_loss_pairs_each_seg_with_its_own_mask(tiny_model):
    img, m = synthetic_image(32, 40, 2)
    a, b, c = m, 1 - m, np.roll(m, 5, axis=1)
    convs = [Conversation(TPL).add([IMAGE, "\nthe red square and the rest?"], "[SEG] and [SEG]."),
             Conversation(TPL).add([IMAGE, "\nthe shifted one?"], "It is [SEG].")]
    batch = collate([Sample(img, convs, np.stack([a, b, c]))], tiny_model)
    with torch.no_grad():
        out = tiny_model(batch)
    rows_cols = out.seg_index[:, :2].tolist()
    assert rows_cols == sorted(rows_cols) and out.seg_of_image == [[0, 1, 2]]
    gt = batch.gt_masks[0]
    losses = lisa_loss(out.logits, out.fused.labels, out.pred_masks, batch.gt_masks)
    pairs = sum(bce_loss(out.pred_masks[0][k:k + 1], gt[k:k + 1]) for k in range(3)) / 3
    torch.testing.assert_close(losses["mask_bce_loss"], 2.0 * pairs, rtol=1e-5, atol=1e-6)
    swapped = lisa_loss(out.logits, out.fused.labels, out.pred_masks, [gt[[1, 0, 2]]])
    assert not torch.isclose(swapped["mask_bce_loss"], losses["mask_bce_loss"])


def test_truncation_between_two_segs_keeps_the_first_mask(tiny_model):
    img, m = synthetic_image(32, 32, 3)
    conv = Conversation(TPL).add([IMAGE, "\nthe square and the rest?"], "Sure, [SEG] and then [SEG].")
    ids, _ = encode(conv, tiny_model.tokenizer, tiny_model.fusion.wrap_image(tiny_model.tokenizer))
    second = [i for i, t in enumerate(ids) if t == tiny_model.seg_token_id][1]
    with pytest.warns(UserWarning, match=r"1 \[SEG\] target"):
        batch = collate([Sample(img, [conv], np.stack([m, 1 - m]))], tiny_model, max_length=second)
    assert int((batch.input_ids == tiny_model.seg_token_id).sum()) == 1
    np.testing.assert_array_equal(batch.gt_masks[0].numpy(), m[None].astype(np.float32))


# -- the reject token ------------------------------------------------------------------------

def test_reject_token_in_vocabulary_labels_and_no_mask(tiny_model):
    model = _model("lisa-tiny-reject")
    tok = model.tokenizer
    assert tok.has_token("[REJ]") and model.reject_token_id == len(tok) - 1
    # added after LISA's tokens: their ids are unchanged
    for t in ("[SEG]", "<im_start>", "<im_end>"):
        assert tok.token_id(t) == tiny_model.tokenizer.token_id(t)
    ds = SyntheticReasoningSet(None, "train", size=5, absent_ratio=1.0, questions_per_image=2)
    sample = build_sample(ds[0], np.random.default_rng(0), TPL, reject_token="[REJ]")
    assert sample.masks.shape[0] == 0
    batch = collate([sample], model)
    rej = model.reject_token_id
    assert int((batch.input_ids == rej).sum()) == len(sample.conversations)
    assert int((batch.labels == rej).sum()) == len(sample.conversations)  # CE supervises [REJ]
    with torch.no_grad():
        out = model(batch)
    assert int((out.fused.labels == rej).sum()) == len(sample.conversations) and out.seg_embeddings.shape[0] == 0
    losses = lisa_loss(out.logits, out.fused.labels, out.pred_masks, batch.gt_masks)
    assert torch.isfinite(losses["ce_loss"]) and float(losses["mask_loss"]) == 0.0


def test_reject_off_or_unused_draws_like_lisa():
    """No absent target: a reject token changes nothing, not even the random draws."""
    rec = _attribute_record()
    for seed in range(5):
        a = build_sample(rec, np.random.default_rng(seed), TPL, explanatory=0.3)
        b = build_sample(rec, np.random.default_rng(seed), TPL, explanatory=0.3, reject_token="[REJ]")
        assert [c.rounds for c in a.conversations] == [c.rounds for c in b.conversations]
        np.testing.assert_array_equal(a.masks, b.masks)


def test_api_rejected_target_gives_an_empty_flagged_mask(monkeypatch):
    from lisa_kit.api import Segmenter

    seg = Segmenter.from_recipe("lisa-tiny-reject")
    s, rej, eos = seg.model.seg_token_id, seg.model.reject_token_id, seg.tokenizer.eos_id
    img, _ = synthetic_image(37, 45, 1)
    force_generation(monkeypatch, {0: rej, 1: eos})
    r = seg.seg(img, "Segment the purple triangle.")
    assert r.masks.shape == (1, 37, 45) and not r.masks.any() and r.rejected == [True] and r.scores == [0.0]
    assert [r.text[a:b] for a, b in r.seg_spans] == ["[REJ]"]
    assert r.to_dict()["masks"] == [{"area": 0, "score": 0.0, "rejected": True}]

    force_generation(monkeypatch, {0: s, 1: rej, 2: eos})
    both = seg.seg(img, "Segment the red square and the purple triangle.")
    assert both.rejected == [False, True] and both.masks.shape == (2, 37, 45) and not both.masks[1].any()
    assert [both.text[a:b] for a, b in both.seg_spans] == ["[SEG]", "[REJ]"]
    force_generation(monkeypatch, {0: s, 1: eos})
    alone = seg.seg(img, "Segment the red square and the purple triangle.")
    np.testing.assert_array_equal(alone.masks[0], both.masks[0])  # the [SEG] mask is the same
    assert alone.rejected == [False]
    # the model's own earlier answers keep [REJ] a token
    assert rej in seg.prompt_ids("and now?", history=[("Segment the purple triangle.", r)])


def test_generate_mode_scores_a_rejected_absent_target_as_iou_one(monkeypatch):
    from lisa_kit.evaluate import Evaluator

    model = _model("lisa-tiny-reject")
    reader = SyntheticReasoningSet(None, "val", size=2, absent_ratio=1.0, questions_per_image=2)
    force_generation(monkeypatch, {0: model.reject_token_id, 1: model.tokenizer.eos_id})
    res = Evaluator(model, reader, modes=("generate",), progress=False).run()["generate"]["all"]
    assert res["n_queries"] == 4 and res["giou"] == pytest.approx(1.0, abs=1e-4)


# -- the [SEG] state from a chosen layer or a learned mix ------------------------------------

@pytest.mark.parametrize("seg_hidden", ["previous", "token"])
@pytest.mark.parametrize("layers", [-2, "mix", [0, 2]])
def test_generated_seg_states_equal_teacher_forced(layers, seg_hidden, monkeypatch):
    torch.manual_seed(0)
    model = build_model(tiny_recipe(seg_layers=layers, seg_hidden=seg_hidden)).eval()
    if model.seg_layers.mix:
        with torch.no_grad():  # an uneven mix, so every layer's weight matters
            model.seg_layers.logits.copy_(torch.linspace(-1, 1, len(model.seg_layers.indices)))
    tok = model.tokenizer
    word, seg = tok.encode_text("red")[0], model.seg_token_id
    res, teacher = _generate_and_teacher(model, monkeypatch, [word, seg, word, seg])  # [SEG] last: token mode
    assert res.seg_embeddings.shape == (2, model.mask_decoder.prompt_dim)
    torch.testing.assert_close(res.seg_embeddings, teacher.seg_embeddings, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.masks, teacher.pred_masks[0], atol=1e-4, rtol=1e-4)


def test_layer_choice_takes_effect_and_minus_one_is_last(tiny_model):
    img, m = synthetic_image(32, 32, 4)
    conv = Conversation(TPL).add([IMAGE, "\nthe square?"], "Sure, [SEG].")
    batch = collate([Sample(img, [conv], m[None])], tiny_model)
    outs = {}
    for layers in ("last", -1, -2):
        torch.manual_seed(0)
        model = build_model(tiny_recipe(seg_layers=layers)).eval()
        with torch.no_grad():
            outs[layers] = model(batch).seg_embeddings
    torch.testing.assert_close(outs[-1], outs["last"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(outs["last"], tiny_model(batch).seg_embeddings, atol=0, rtol=0)
    assert not torch.allclose(outs[-2], outs["last"])


def test_seg_mix_trains_saves_loads_and_refuses_lisa_export(tmp_path):
    from safetensors.torch import load_file

    from lisa_kit.checkpoint.export import export_lisa_hf
    from lisa_kit.checkpoint.native import load_model, save_model
    from lisa_kit.train.config import TrainConfig
    from lisa_kit.train.trainable import set_trainable

    torch.manual_seed(0)
    model = build_model(tiny_recipe(seg_layers="mix"))
    assert model.seg_layers.indices == [1, 2] and tuple(model.seg_layers.logits.shape) == (2,)
    assert "seg_layers.logits" in set_trainable(model, TrainConfig.from_recipe({"train": {"lora": {"r": 0}}}))
    with torch.no_grad():
        model.seg_layers.logits.copy_(torch.tensor([0.3, -0.7]))
    d = save_model(model, tmp_path / "ckpt")
    assert torch.equal(load_file(str(d / "seg_layers.safetensors"))["logits"], model.seg_layers.logits.detach())
    assert torch.equal(load_model(d).seg_layers.logits, model.seg_layers.logits)
    (d / "seg_layers.safetensors").unlink()
    with pytest.raises(CheckpointError, match="seg_layers.safetensors"):
        load_model(d)
    with pytest.raises(CheckpointError, match="seg_layers"):
        export_lisa_hf(model, tmp_path / "lisa")
    with pytest.raises(CheckpointError, match="reject_token"):
        export_lisa_hf(_model("lisa-tiny-reject"), tmp_path / "lisa")
    assert not (tmp_path / "lisa").exists()


def test_bad_settings_name_the_key():
    problems = validate_recipe(tiny_recipe(seg_layers="top", reject_token=3))
    assert any("model.seg_layers" in p for p in problems) and any("model.reject_token" in p for p in problems)
    assert validate_recipe(tiny_recipe(seg_layers=[0, -1], reject_token="[REJ]")) == []
    with pytest.raises(RecipeError, match=r"model\.seg_layers.*out of range.*2 layers"):
        build_model(tiny_recipe(seg_layers=3))
    with pytest.raises(RecipeError, match=r"model\.seg_layers.*repeat"):
        build_model(tiny_recipe(seg_layers=[2, -1]))
    with pytest.raises(RecipeError, match=r"model\.reject_token"):
        build_model(tiny_recipe(reject_token="[SEG]"))
