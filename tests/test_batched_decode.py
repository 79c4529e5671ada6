"""Generation decodes every [SEG] of one image in one mask-decoder call, and the result
equals decoding row by row (rejections, rows without a mask, several [SEG] per row)."""
from __future__ import annotations

import pytest
import torch

import lisa_kit.generation as g
from lisa_kit.builder import load
from lisa_kit.components.sam import TINY_SAM, SamMaskDecoder, sam_config
from lisa_kit.conformance import ConformanceError, check_component
from lisa_kit.generation import REJECTED_LOGIT, GenerationConfig
from lisa_kit.interfaces import ComponentSpec
from lisa_kit.testing import generation_inputs

# SAM (reject token on), and the plugin's decoders (the sam2 / hf_sam / sam_hq / edgetam / sam3 recipes).
RECIPES = ["lisa-tiny-reject", "lisa-tiny-sam2", "lisa-tiny-hf-sam", "lisa-tiny-sam-hq", "lisa-tiny-edgetam",
           "lisa-tiny-sam3"]
EXACT = {"atol": 1e-6, "rtol": 1e-6}  # the bar: same masks/scores as row by row


def _model(name):
    torch.manual_seed(0)
    return load(name).eval()


def _inputs(model, questions_per_image: list[int]):
    """One row per question; image ``i`` of odd size gets ``questions_per_image[i]`` rows."""
    return generation_inputs(model, questions_per_image)


def _script_rows(monkeypatch, scripts: list[list[int]], pad: int):
    """Row ``b`` picks ``scripts[b][step]`` (``pad`` once its script is over)."""
    state = {"step": 0}

    def pick(logits, cfg, gen):
        k = state["step"]
        state["step"] += 1
        return torch.tensor([s[k] if k < len(s) else pad for s in scripts], device=logits.device)

    monkeypatch.setattr(g, "_pick", pick)


def _record(monkeypatch, obj, attr, log):
    """Record the arguments of ``obj.attr`` on the instance (the real method still runs)."""
    real = getattr(obj, attr)

    def wrapped(*a, **k):
        log.append(a)
        return real(*a, **k)

    monkeypatch.setattr(obj, attr, wrapped)


@pytest.mark.parametrize("name", RECIPES)
def test_one_decode_call_per_image_equals_row_by_row(name, monkeypatch):
    model = _model(name)
    tok = model.tokenizer
    seg, eos, word = model.seg_token_id, tok.eos_id, tok.encode_text("red")[0]
    rej = model.reject_token_id
    # image 0: rows 0-3, image 1: rows 4-5; several [SEG] in a row, [REJ] between them,
    # a row with no mask at all, an image whose first row is rejected only.
    scripts = [[word, seg, word, seg, eos],
               [rej, eos] if rej is not None else [word, eos],
               [word, word, eos],
               [seg, rej, seg, eos] if rej is not None else [seg, word, seg, eos],
               [rej, seg, eos] if rej is not None else [word, seg, eos],
               [seg, eos]]
    prompts, rows, vis, sam, metas = _inputs(model, [4, 2])
    _script_rows(monkeypatch, scripts, tok.pad_id)
    decodes, heads = [], []
    _record(monkeypatch, model.mask_decoder, "decode", decodes)
    _record(monkeypatch, model.seg_head, "forward", heads)
    res = g.generate(model, prompts, rows, vis, sam, metas, GenerationConfig(max_new_tokens=6))

    assert [r.token_ids for r in res] == scripts
    # One call per image that has a [SEG], with all its prompts in row order.
    assert [a[1].shape[0] for a in decodes] == [4, 2]
    states = heads[0][0]  # (K, D): every kept [SEG] state of the batch, in row order
    assert states.shape[0] == 6

    features = model.encode_masks(sam)
    start = 0
    for b, r in enumerate(res):
        n_seg = scripts[b].count(seg)
        n_rej = scripts[b].count(rej) if rej is not None else 0
        h, w = metas[rows[b][0]].original_size
        assert r.masks.shape == (n_seg + n_rej, h, w) and r.scores.shape == (n_seg + n_rej,)
        assert r.rejected == [t != seg for t in scripts[b] if t == seg or (rej is not None and t == rej)]
        if not n_seg:
            assert r.seg_embeddings.shape[0] == 0
            assert all((r.masks[m] == REJECTED_LOGIT).all() for m in range(n_rej))
            continue
        # Today's path: this row's states through the seg head, then one decode for the row.
        with torch.no_grad():
            p = model.seg_head(states[start:start + n_seg])
            img = rows[b][0]
            low, scores = model.mask_decoder.decode({k: v[img:img + 1] for k, v in features.items()}, p)
            masks = model.mask_decoder.postprocess(low, metas[img])
        start += n_seg
        keep = [m for m, rj in enumerate(r.rejected) if not rj]
        torch.testing.assert_close(r.seg_embeddings, p, **EXACT)
        torch.testing.assert_close(r.low_res_masks, low, **EXACT)
        torch.testing.assert_close(r.masks[keep], masks, **EXACT)
        torch.testing.assert_close(r.scores[keep], scores[:, 0], **EXACT)
        for m, rj in enumerate(r.rejected):
            if rj:
                assert (r.masks[m] == REJECTED_LOGIT).all() and r.scores[m] == 0



class _CoupledSam(SamMaskDecoder):
    """A SAM whose prompts see each other (centred over the call): decoding an image's
    prompts together would change its masks, which the conformance check must catch."""

    def decode(self, features, prompts):
        return super().decode(features, prompts - prompts.mean(0, keepdim=True))


def test_conformance_refuses_a_decoder_whose_prompts_interact():
    spec = ComponentSpec("mask_decoder", "coupled", lambda config: _CoupledSam(sam_config("custom", config)),
                         tiny={"config": TINY_SAM})
    with pytest.raises(ConformanceError, match=r"mask_decoder:coupled: decode: prompt 0 decoded alone differs"):
        check_component(spec)
    check_component(ComponentSpec("mask_decoder", "sam", lambda config: SamMaskDecoder(sam_config("custom", config)),
                                  tiny={"config": TINY_SAM}))
