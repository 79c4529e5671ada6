"""LISA's question and answer phrasings, and records -> training conversations.

Every phrasing LISA trains and evaluates with lives here (``utils/utils.py`` of the
original, ReasonSeg's explanatory forms of ``reason_seg_dataset.py``). The image slot is
not part of these strings: :func:`build_sample` puts an image part (``IMAGE``) before
the first question, where LISA writes ``<image>\\n``.

:func:`build_sample` draws everything from a ``numpy.random.Generator``, so a sample is a
pure function of its generator's seed (see :class:`lisa_kit.datasets.hybrid.HybridDataset`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lisa_kit.conversation import IMAGE, Conversation, Template
from lisa_kit.data import Sample
from lisa_kit.datasets.base import IGNORE_LABEL, Record

SHORT_QUESTIONS = (
    "Can you segment the {class_name} in this image?",
    "Please segment the {class_name} in this image.",
    "What is {class_name} in this image? Please respond with segmentation mask.",
    "What is {class_name} in this image? Please output segmentation mask.",
)
LONG_QUESTIONS = (
    "{sent} Please respond with segmentation mask.",
    "{sent} Please output segmentation mask.",
)
EXPLANATORY_QUESTIONS = (
    "Please output segmentation mask and explain why.",
    "Please output segmentation mask and explain the reason.",
    "Please output segmentation mask and give some explanation.",
)
ANSWERS = (
    "It is [SEG].",
    "Sure, [SEG].",
    "Sure, it is [SEG].",
    "Sure, the segmentation result is [SEG].",
    "[SEG].",
)
EVAL_ANSWER = "[SEG]."  # LISA's validation answer (teacher mode)
SEG = "[SEG]"


@dataclass
class Turn:
    """One question/answer about a record's image; ``target``: the record's target the
    answer's ``[SEG]`` segments (``None``: a text-only answer)."""

    question: str
    answer: str
    target: int | None


def seg_question(text: str, kind: str, rng: np.random.Generator) -> str:
    """LISA's question for a target: long form for sentences, short form (lower-cased
    name) for class names and phrases."""
    if kind == "sentence":
        return LONG_QUESTIONS[rng.integers(len(LONG_QUESTIONS))].format(sent=text)
    return SHORT_QUESTIONS[rng.integers(len(SHORT_QUESTIONS))].format(class_name=text.lower())


def eval_question(text: str, kind: str, lower: bool = False) -> str:
    """LISA's validation question (``ValDataset``): the last short form for names and
    phrases, the last long form for sentences, after a space (LISA writes
    ``"<image>\n " + question``). ``lower``: refCOCO texts are lower-cased there, ReasonSeg's
    are not."""
    text = text.lower() if lower else text
    if kind == "sentence":
        return " " + LONG_QUESTIONS[1].format(sent=text)
    return " " + SHORT_QUESTIONS[3].format(class_name=text)


def seg_turns(record: Record, rng: np.random.Generator, classes_per_sample: int = 3,
              explanatory: float = -1.0) -> list[Turn]:
    """Up to ``classes_per_sample`` targets drawn without replacement, one turn each.

    ``explanatory`` (LISA's ``--explanatory``, -1 = off): for a record with an
    explanation, with this probability every turn is a text-only answer (the
    explanation, no mask); otherwise, with even odds, plain ``[SEG]`` answers or
    ``[SEG]`` followed by the explanation (the question then asks for one).
    """
    n = len(record.targets)
    picked = list(rng.choice(n, size=classes_per_sample, replace=False)) if n >= classes_per_sample else list(range(n))
    mode = "seg"
    if explanatory >= 0 and record.explanation:
        mode = "text" if rng.random() < explanatory else ("seg", "seg+explanation")[int(rng.integers(2))]
    turns = []
    for t in picked:
        tgt = record.targets[int(t)]
        text = tgt.text
        if tgt.meta.get("phrasings"):  # part names: LISA picks "obj part" or "the part of the obj"
            text = tgt.meta["phrasings"][int(rng.integers(len(tgt.meta["phrasings"])))]
        why = tgt.meta.get("explanation") or record.explanation  # per target where several differ
        if mode == "seg":
            turns.append(Turn(seg_question(text, tgt.kind, rng), ANSWERS[rng.integers(len(ANSWERS))], int(t)))
        elif mode == "seg+explanation":
            q = f"{tgt.text} {EXPLANATORY_QUESTIONS[rng.integers(len(EXPLANATORY_QUESTIONS))]}"
            turns.append(Turn(q, f"{ANSWERS[rng.integers(len(ANSWERS))]} {why}", int(t)))
        else:
            turns.append(Turn(text, why, None))
    return turns


def train_mask(mask: np.ndarray) -> np.ndarray:
    """A stored mask (0/1/255, or LISA's 2 where refCOCO polygons overlap) -> float 0/1
    training target. Ignored pixels train as background, as in LISA; overlaps count once
    (LISA would feed the value 2 to its BCE)."""
    return ((mask != 0) & (mask != IGNORE_LABEL)).astype(np.float32)


def vqa_conversation(record: Record, template: Template) -> Conversation:
    """All rounds in one conversation. A turn holding ``<image>`` gets the image slot in
    front, the marker removed (LLaVA's ``preprocess_multimodal``); a record without the
    marker gets its image before the first question."""
    conv = Conversation(template)
    marked = any("<image>" in q for q, _ in record.rounds)
    for r, (q, a) in enumerate(record.rounds):
        if "<image>" in q or (r == 0 and not marked):
            user = [IMAGE, "\n" + q.replace("<image>", "").strip()]
        else:
            user = [q]
        conv.add(user, [template.answer_lead + a])
    return conv


def turns_to_sample(record: Record, turns: list[Turn], template: Template, image: np.ndarray | None = None) -> Sample:
    """One conversation per turn (LISA's layout), masks in ``[SEG]`` order."""
    image = record.image() if image is None else image
    convs = [Conversation(template).add([IMAGE, "\n" + t.question], t.answer) for t in turns]
    h, w = image.shape[:2]
    masks = [train_mask(record.targets[t.target].mask) for t in turns if t.target is not None and SEG in t.answer]
    return Sample(image, convs, np.stack(masks) if masks else np.zeros((0, h, w), np.float32))


def build_sample(record: Record, rng: np.random.Generator, template: Template, classes_per_sample: int = 3,
                 explanatory: float = -1.0) -> Sample:
    """A training :class:`~lisa_kit.data.Sample` from a record: VQA rounds as one
    conversation, segmentation targets as sampled question/answer turns."""
    if record.rounds:
        image = record.image()
        h, w = image.shape[:2]
        return Sample(image, [vqa_conversation(record, template)], np.zeros((0, h, w), np.float32))
    return turns_to_sample(record, seg_turns(record, rng, classes_per_sample, explanatory), template)
