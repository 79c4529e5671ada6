"""The data path against what LISA's own readers and collate produced on the mini
datasets of ``eval_seed0`` (``reader_reference.json``): the phrasings, the token ids and
labels (truncation included) of every conversation of every source, and the samples
our readers and prompt builder make from the same records."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from lisa_kit import prompts
from lisa_kit.conversation import IMAGE, Conversation, encode, get_template
from lisa_kit.testing import eval_fixture_dir, fixture_dir

EV, FX = eval_fixture_dir(), fixture_dir()
pytestmark = [pytest.mark.parity,
              pytest.mark.skipif(EV is None or FX is None, reason="LISA fixtures (../shared) not present")]

ROUND = re.compile(r"USER: (.*?) ASSISTANT: (.*?)</s>", re.S)


@pytest.fixture(scope="module")
def ref():
    return json.loads((EV / "reader_reference.json").read_text())


@pytest.fixture(scope="module")
def tok():
    from lisa_kit.tokenizer import load_tokenizer

    manifest = json.loads((FX / "manifest.json").read_text())
    return load_tokenizer(FX / manifest["checkpoint_dir"])


def _conversation(text: str) -> Conversation:
    """A rendered LISA conversation -> ours: the image marker becomes the image part."""
    conv = Conversation(get_template("llava_v1"))
    for r, (q, a) in enumerate(ROUND.findall(text)):
        if r == 0:
            q = q.replace("<im_start><image><im_end>", "<image>")
            assert q.startswith("<image>")
            conv.add([IMAGE, q[len("<image>"):]], a)
        else:
            conv.add([q], a)
    return conv


@pytest.mark.parametrize("source", ["sem_seg", "refer_seg", "vqa", "reason_seg"])
def test_collate_ids_and_labels(ref, tok, source):
    from lisa_kit.data import truncate

    col = ref["sources"][source]["collate"]
    image = [tok.token_id("<im_start>"), -200, tok.token_id("<im_end>")]
    max_len = tok.model_max_length - 255  # LISA's training cap for its 256-patch tower
    truncated = 0
    for text, want_ids, want_labels in zip(col["conversation_list"], col["input_ids"], col["labels"]):
        ids, labels = encode(_conversation(text), tok, image)
        ids, labels, was = truncate(ids, labels, max_len)
        truncated += was
        assert ids == want_ids
        assert labels == want_labels
    assert bool(truncated) == col["truncated"]


def test_every_phrasing_is_ours(ref):
    """Each question LISA asked is one of our phrasings of the sampled text."""
    forms = [q.format(class_name="{t}") for q in prompts.SHORT_QUESTIONS]
    forms += [q.format(sent="{t}") for q in prompts.LONG_QUESTIONS]
    forms += ["{t} " + e for e in prompts.EXPLANATORY_QUESTIONS] + ["{t}"]
    for source in ("sem_seg", "refer_seg", "reason_seg"):
        for draw in ref["sources"][source]["draws"]:
            for q, text in zip(draw["questions"], draw["sampled_classes"]):
                body = q.removeprefix("<image>\n")
                assert any(body in (f.replace("{t}", text), f.replace("{t}", text.lower())) for f in forms), body
            for conv in draw["conversations"]:
                answer = ROUND.findall(conv)[0][1]
                assert any(answer == a or answer.startswith(a + " ") for a in prompts.ANSWERS) or \
                    draw.get("branch") == "text_only", answer


def test_reason_seg_samples_from_our_reader(ref):
    """Our reader + prompt builder make the same kind of sample LISA drew: its texts,
    its masks (target = 1, ignore trains as background) and its three answer branches."""
    from lisa_kit.datasets import open_dataset
    from PIL import Image

    reader = open_dataset("reason_seg", EV / "dataset", "train")
    by_name = {r.image_path.name: r for r in reader}
    tpl = get_template("llava_v1")
    for draw in ref["sources"]["reason_seg"]["draws"]:
        rec = by_name[draw["image_path"].rsplit("/", 1)[1]]
        assert set(draw["sampled_classes"]) <= {t.text for t in rec.targets}
        want = [np.asarray(Image.open(EV / p)) for p in draw["mask_png"]]
        for w in want:
            assert np.array_equal(prompts.train_mask(rec.targets[0].mask), (w > 0).astype(np.float32))
    # all three branches come out of seg_turns for a record with an explanation
    rec = next(r for r in reader if r.explanation)
    branches = set()
    for seed in range(40):
        turns = prompts.seg_turns(rec, np.random.default_rng(seed), explanatory=0.3)
        kinds = {("text" if t.target is None else "seg+explanation" if rec.explanation in t.answer else "seg")
                 for t in turns}
        assert len(kinds) == 1  # one branch per sample, as LISA
        branches |= kinds
        s = prompts.turns_to_sample(rec, turns, tpl, image=np.zeros((*rec.targets[0].mask.shape, 3), np.uint8))
        assert s.masks.shape[0] == sum("[SEG]" in t.answer for t in turns)
    assert branches == {"seg", "seg+explanation", "text"}


def test_vqa_samples_from_our_reader(ref, tok):
    """Reader + prompt builder give the token ids LISA's VQA reader + collate gave."""
    from lisa_kit.data import truncate
    from lisa_kit.datasets import open_dataset

    reader = open_dataset("llava_instruct", EV / "dataset")
    by_image = {r.image_path.name: r for r in reader}
    col = ref["sources"]["vqa"]["collate"]
    image = [tok.token_id("<im_start>"), -200, tok.token_id("<im_end>")]
    draws = ref["sources"]["vqa"]["draws"]
    assert len(draws) == len(col["input_ids"])
    for draw, want in zip(draws, col["input_ids"]):
        conv = prompts.vqa_conversation(by_image[draw["image_path"].rsplit("/", 1)[1]], get_template("llava_v1"))
        ids, _, _ = truncate(*encode(conv, tok, image), tok.model_max_length - 255)
        assert ids == want
