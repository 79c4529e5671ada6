"""Questions about one image share the image's prefill (issue 12): the prompt prefix
common to rows about the same image (system text + the image's features) runs through
the LLM once, and each row's own tokens run on top of its KV cache. The result equals
the full per-row prefill (``GenerationConfig(share_prefix=False)``): same greedy tokens,
step logits / masks within 1e-5 (fp32)."""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

import lisa_kit.generation as g
from lisa_kit.builder import load
from lisa_kit.conversation import IMAGE, Conversation, encode, get_template
from lisa_kit.generation import GenerationConfig, generate
from lisa_kit.testing import generation_inputs, synthetic_image

RECIPES = ["lisa-tiny", "lisa-tiny-seg-mix", "lisa-tiny-seg-token", "lisa-tiny-qwen2", "lisa-tiny-reject"]
CLOSE = {"atol": 1e-5, "rtol": 0}  # the bar for fp32


@functools.cache
def _model(name):
    torch.manual_seed(0)
    return load(name).eval()


def _inputs(model, questions_per_image: list[int], text_row: bool = False):
    """One row per question (each a different length); image ``i`` gets
    ``questions_per_image[i]`` rows. ``text_row``: one more row without an image."""
    return generation_inputs(model, questions_per_image, text_row=text_row,
                             questions=("Segment the red square", "Where is the dog?",
                                        "Which one is the largest object here"))


def _both(model, inputs, max_new_tokens=6):
    cfg = {"max_new_tokens": max_new_tokens, "keep_step_logits": True}
    full = generate(model, *inputs, GenerationConfig(share_prefix=False, **cfg))
    shared = generate(model, *inputs, GenerationConfig(share_prefix=True, **cfg))
    return full, shared


def _assert_same(full, shared):
    for b, (f, s) in enumerate(zip(full, shared)):
        assert s.token_ids == f.token_ids, b
        assert s.seg_indices == f.seg_indices and s.rejected == f.rejected and s.finished == f.finished, b
        torch.testing.assert_close(s.step_logits, f.step_logits, **CLOSE)
        for attr in ("masks", "scores", "seg_embeddings", "low_res_masks"):
            a, e = getattr(s, attr), getattr(f, attr)
            assert a.shape == e.shape, (b, attr)
            torch.testing.assert_close(a, e, **CLOSE)


class _Fed:
    """Forward pre-hook on the LLM: how many times an image's feature vectors are fed
    as (unmasked) queries, and how many LLM calls take more than one position."""

    def __init__(self, model, vis):
        self.feats = model.encode_vision(vis)  # (I, N, D): what the fusion splices in
        self.per_image = [0] * len(self.feats)
        self.multi_token_calls = 0
        self.handle = model.llm.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        emb = args[0] if args else kwargs["inputs_embeds"]  # (B, L, D)
        mask = kwargs["attention_mask"][:, -emb.shape[1]:].bool()  # the query columns
        if emb.shape[1] > 1:
            self.multi_token_calls += 1
        for i, f in enumerate(self.feats):
            is_feat = (emb[:, :, None, :] == f[None, None]).all(-1).any(-1)  # (B, L)
            self.per_image[i] += int((is_feat & mask).sum())


@pytest.mark.parametrize("questions", [[8], [3, 2]])
def test_image_features_run_once_per_image(questions):
    model = _model("lisa-tiny")
    inputs = _inputs(model, questions)
    fed = _Fed(model, inputs[2])
    try:
        generate(model, *inputs, GenerationConfig(max_new_tokens=2))
    finally:
        fed.handle.remove()
    n_feat = fed.feats.shape[1]
    # each image's N feature vectors reach the LLM once, however many rows ask about it
    # (the full prefill feeds them once per row: 8 N for 8 questions)
    assert fed.per_image == [n_feat] * len(questions)


@pytest.mark.parametrize("name", RECIPES)
def test_greedy_answers_equal_full_prefill(name):
    model = _model(name)
    # two images, rows of different lengths, several rows per image
    inputs = _inputs(model, [3, 2])
    fed = _Fed(model, inputs[2])
    try:
        full, shared = _both(model, inputs, max_new_tokens=8)
    finally:
        fed.handle.remove()
    assert fed.multi_token_calls == 1 + 2  # full: one prefill; shared: the prefixes, then the rows' own tokens
    _assert_same(full, shared)


@pytest.mark.parametrize("name", RECIPES)
def test_seg_masks_equal_full_prefill(name, monkeypatch):
    """Answers with [SEG] (and [REJ]) forced, so masks come from the seg layers /
    ``seg_hidden`` choice of each recipe; the very first [SEG] takes its ``previous``
    state from the last prompt position, which lies in the rows' own run."""
    model = _model(name)
    tok = model.tokenizer
    seg, eos, word = model.seg_token_id, tok.eos_id, tok.encode_text("red")[0]
    rej = model.reject_token_id if model.reject_token_id is not None else word
    scripts = [[seg, word, seg, eos], [word, rej, eos], [word, word, seg, eos], [seg, rej, seg, eos], [word, eos]]
    step = {"k": 0}

    def pick(logits, cfg, gen):
        k = step["k"]
        step["k"] += 1
        return torch.tensor([s[k] if k < len(s) else tok.pad_id for s in scripts], device=logits.device)

    monkeypatch.setattr(g, "_pick", pick)
    inputs = _inputs(model, [3, 2])
    full = generate(model, *inputs, GenerationConfig(max_new_tokens=6, keep_step_logits=True, share_prefix=False))
    step["k"] = 0
    shared = generate(model, *inputs, GenerationConfig(max_new_tokens=6, keep_step_logits=True))
    assert sum(len(f.seg_embeddings) for f in full) == sum(s.count(seg) for s in scripts)  # all decoded
    _assert_same(full, shared)


@pytest.mark.parametrize("questions, text_row", [([1], False), ([1, 1], False), ([4], True)])
def test_nothing_shared_runs_one_full_prefill(questions, text_row):
    """One row, one row per image, or a row without an image: today's single prefill."""
    model = _model("lisa-tiny")
    inputs = _inputs(model, questions, text_row)
    fed = _Fed(model, inputs[2])
    try:
        full, shared = _both(model, inputs, max_new_tokens=3)
    finally:
        fed.handle.remove()
    assert fed.multi_token_calls == 2  # one prefill per generate call
    _assert_same(full, shared)


class _OpaqueCache:
    """A cache as a non-transformers LLM might return it: no ``reorder_cache``."""

    def __init__(self, inner):
        self.inner = inner


def test_cache_without_reorder_falls_back_to_full_prefill(monkeypatch):
    model = _model("lisa-tiny")
    real = model.llm.forward

    def forward(*a, cache=None, **k):
        out = real(*a, cache=cache.inner if cache is not None else None, **k)
        return out if out.cache is None else dataclasses.replace(out, cache=_OpaqueCache(out.cache))

    inputs = _inputs(model, [3])
    full = generate(model, *inputs, GenerationConfig(max_new_tokens=3, keep_step_logits=True, share_prefix=False))
    monkeypatch.setattr(model.llm, "forward", forward)
    fed = _Fed(model, inputs[2])
    try:
        shared = generate(model, *inputs, GenerationConfig(max_new_tokens=3, keep_step_logits=True))
    finally:
        fed.handle.remove()
    assert fed.multi_token_calls == 2  # the prefix, found uncopiable, then the full prompts
    _assert_same(full, shared)


def test_two_image_rows_and_shared_question_text():
    """Rows with two images each (grouped by both), and rows whose questions start alike
    (the shared prefix runs on past the image into the common words)."""
    model = _model("lisa-tiny")
    tok, tpl = model.tokenizer, get_template("llava_v1")
    slot_ids = model.fusion.wrap_image(tok)
    vis, sam, metas = [], [], []
    for i in range(2):
        img, _ = synthetic_image(40 + 7 * i, 56 - 5 * i, i)
        vis.append(model.vision_encoder.preprocess(img))
        px, meta = model.mask_decoder.preprocess(img)
        sam.append(px)
        metas.append(meta)
    texts = ["Segment the red square.", "Segment the red square please.", "Segment the red one."]
    prompts, rows = [], []
    for images in ([0, 1], [1, 0]):
        for t in texts:
            conv = Conversation(tpl).add([IMAGE, "\n", IMAGE, "\n" + t], None)
            prompts.append(encode(conv, tok, slot_ids)[0])
            rows.append(images)
    plan = g._prefix_plan(prompts, rows, model.fusion.IMAGE_SLOT)
    assert plan is not None and plan[0] == [0, 0, 0, 1, 1, 1]
    last_slot = max(t for t, i in enumerate(prompts[0]) if i == model.fusion.IMAGE_SLOT)
    assert min(plan[1]) > last_slot + 1  # "\nSegment the red" is shared too
    inputs = (prompts, rows, torch.stack(vis), torch.stack(sam), metas)
    fed = _Fed(model, inputs[2])
    try:
        full, shared = _both(model, inputs, max_new_tokens=4)
    finally:
        fed.handle.remove()
    assert fed.multi_token_calls == 1 + 2
    assert fed.per_image == [6 * fed.feats.shape[1] + 2 * fed.feats.shape[1]] * 2  # full: 6 rows; shared: 2 groups
    _assert_same(full, shared)
