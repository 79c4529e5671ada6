"""The hybrid sampler (rates, determinism, sharding) and collate's truncation rule."""
from __future__ import annotations

import numpy as np
import pytest

from lisa_kit.conversation import IMAGE, Conversation, get_template
from lisa_kit.data import Sample, collate
from lisa_kit.datasets import open_dataset
from lisa_kit.datasets.hybrid import HybridDataset, SourceGroup, hybrid_from_config
from lisa_kit.errors import DataError
from lisa_kit.testing import synthetic_image

TPL = get_template("llava_v1")


def _text(sample: Sample) -> list[str]:
    return [repr(c.rounds) for c in sample.conversations]


def _hybrid(seed=0, n=64):
    a = open_dataset("synthetic", None, "train", size=40, seed=1)
    b = open_dataset("synthetic", None, "val", size=40, seed=2)
    return HybridDataset([SourceGroup("a", [a], 3.0), SourceGroup("b", [b], 1.0)], TPL, n, seed=seed)


def test_sample_is_a_function_of_seed_epoch_index():
    h1, h2 = _hybrid(), _hybrid()
    for i in (0, 5, 63):
        s1, s2 = h1[i], h2[i]  # two "ranks"/workers load index i independently
        assert _text(s1) == _text(s2)
        assert np.array_equal(s1.image, s2.image) and np.array_equal(s1.masks, s2.masks)
    before = [_text(h1[i]) for i in range(8)]
    h1.set_epoch(1)
    assert [_text(h1[i]) for i in range(8)] != before
    assert [_text(_hybrid(seed=3)[i]) for i in range(8)] != before


def test_rates_and_masks_pair_with_seg_tokens():
    h = _hybrid(n=400)
    groups = [h.locate(i)[0].name for i in range(len(h))]
    assert abs(groups.count("a") / len(groups) - 0.75) < 0.07
    for i in range(10):
        s = h[i]
        n_seg = sum(str(p) == "Tok(text='[SEG]')" for c in s.conversations for _, a in c.rounds for p in (a or []))
        assert s.masks.shape[0] == n_seg and s.masks.shape[1:] == s.image.shape[:2]
        assert set(np.unique(s.masks)) <= {0.0, 1.0}


def test_config_and_errors():
    h = hybrid_from_config({"samples_per_epoch": 5, "sources": {
        "synthetic": {"datasets": ["synthetic"], "rate": 1, "options": {"size": 10}}}}, TPL)
    assert len(h) == 5 and h[4].masks is not None
    with pytest.raises(DataError, match="positive rate"):
        HybridDataset([], TPL, 3)
    with pytest.raises(IndexError):
        h[5]


def test_truncation_drops_the_masks_of_cut_seg_tokens(tiny_model):
    img, m = synthetic_image(32, 32, 0)
    long_q = "\n" + "please segment the red square " * 12
    short = Conversation(TPL).add([IMAGE, "\nthe red square?"], "It is [SEG].")
    long = Conversation(TPL).add([IMAGE, long_q], "[SEG] and [SEG].")
    masks = np.stack([m, 1 - m, m * 0])
    sample = Sample(img, [short, long], masks)
    full = collate([sample], tiny_model)
    cap = int(full.attention_mask[0].sum())  # the short row fits; the long row loses its answer
    with pytest.warns(UserWarning, match=r"1 of 2 conversations truncated .* 2 \[SEG\] target"):
        batch = collate([sample], tiny_model, max_length=cap)
    seg = tiny_model.seg_token_id
    assert int((batch.input_ids == seg).sum()) == 1
    assert batch.gt_masks[0].shape[0] == 1 and np.array_equal(batch.gt_masks[0][0].numpy(), m)


def test_explain_first_puts_the_reason_before_seg_and_is_off_by_default():
    from lisa_kit.conversation import Tok

    cfg = {"samples_per_epoch": 30, "explanatory": 0.0,
           "sources": {"s": {"datasets": ["synthetic"], "split": "train", "options": {"size": 30}}}}
    plain, first = hybrid_from_config(cfg, TPL), hybrid_from_config({**cfg, "explain_first": True}, TPL)
    seen = 0
    for i in range(10):
        a, b = plain[i], first[i]
        assert [m.shape for m in a.masks] == [m.shape for m in b.masks]  # same targets, same order
        for conv, mask in zip(b.conversations, b.masks):
            answer = conv.rounds[0][1]
            # "<explanation> [SEG]." with the target named, and the mask still that target's
            assert answer[-2:] == [Tok("[SEG]"), "."] and answer[0].strip().startswith("The ")
            seen += 1
        for conv in a.conversations:  # LISA's answers: [SEG] first (then maybe the explanation)
            assert not conv.rounds[0][1][0].strip().startswith("The ")
        np.testing.assert_array_equal(np.asarray(a.masks), np.asarray(b.masks))
    assert seen >= 10
