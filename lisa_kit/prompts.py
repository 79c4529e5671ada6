"""LISA's question and answer phrasings, and records -> training conversations.

Every phrasing LISA trains and evaluates with lives here (``utils/utils.py`` of the
original, ReasonSeg's explanatory forms of ``reason_seg_dataset.py``). The image slot is
not part of these strings: :func:`build_sample` puts an image part (``IMAGE``) before
the first question, where LISA writes ``<image>\\n``.

:func:`build_sample` draws everything from a ``numpy.random.Generator``, so a sample is a
pure function of its generator's seed (see :class:`lisa_kit.datasets.hybrid.HybridDataset`).

Two options go beyond LISA (both off by default, and then no extra random draw is
made, so samples stay LISA's):

* **several targets per answer** (LISA++/GLaMM; :class:`MultiSeg`, recipe
  ``data.multi_seg: {prob, max_targets}``): with probability ``prob`` 2 to
  ``max_targets`` of a sample's drawn targets are asked in one question ("Segment the red
  circle and the blue square.") and answered with one ``[SEG]`` each, in the question's
  order ("Sure, [SEG] and [SEG]." or "The red circle is [SEG], the blue square is
  [SEG]."); the sample's masks follow the ``[SEG]`` tokens in that order.
* **a reject token** (GSVA's ``[REJ]``, recipe ``model.reject_token``): a target that is
  not in the image (synthetic ``meta["absent"]``, gRefCOCO ``meta["no_target"]``) is
  answered with the reject token instead of ``[SEG]`` -- alone "There is no such object,
  [REJ].", "Sorry, the image has no such object: [REJ]." or "[REJ].", in a multi-target
  answer in its target's place -- and gets no mask (the token loss alone supervises it).
  Without a reject token such targets keep LISA's ``[SEG]`` with an empty mask.
* **the reason before the mask** (recipe ``data.explain_first``):
  a ``[SEG]`` answer for a record with an explanation is ``"<explanation> [SEG]."``, so the
  answer names its target before ``[SEG]`` ("The blue square is the largest shape,
  covering 412 pixels. [SEG]."). LISA puts the explanation after ``[SEG]``; a model trained
  from scratch (the shipped demo model) learns far faster to put the target's identity
  into the ``[SEG]`` state this way. With a reject token, an absent target with an
  explanation is answered the same way: "There is no purple triangle in the image. [REJ]."
  ``explain_first: after_name`` puts the mask right after the target's name where the
  target says how its explanation splits (``meta["name"]`` and ``meta["predicate"]``, as
  synthetic records do): "The blue square [SEG] is the largest shape." The ``[SEG]`` state
  then sits next to the words that identify its target, not after the anchors and
  comparisons an explanation goes on to mention ("... left of the red circle"), which a
  small model otherwise confuses with the target. Targets without that split fall back
  to ``true``.
* **any phrasing** (recipe ``data.phrasing: any``; default ``lisa``): each target's
  question is drawn from one of :data:`PHRASING_KINDS` -- a bare noun phrase ("the blue
  square"), an imperative ("Show me the blue square."), a question ("Where is the blue
  square?"), LISA's templates with their "Please output segmentation mask." suffix, or
  without it (a sentence as itself: "Which shape is the largest?") -- so a model does not
  learn that only the suffix asks for a mask. Noun-phrase forms need a phrase: the text
  of a ``phrase`` target, or ``meta["phrase"]`` of a sentence (synthetic records carry
  one); a sentence without one is asked as itself, with or without the suffix. Plain ``[SEG]`` answers of a
  target whose ``meta["name"]`` names the shape say it ("The blue square [SEG].").
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lisa_kit.conversation import IMAGE, Conversation, Template
from lisa_kit.data import Sample
from lisa_kit.datasets.base import IGNORE_LABEL, Record, Target
from lisa_kit.errors import RecipeError

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
#: ``data.explain_first`` value: the mask right after the target's name (module docstring).
EXPLAIN_AFTER_NAME = "after_name"
REJ = "[REJ]"  # stands for the model's reject token in the phrasings below
REJECT_ANSWERS = (
    "There is no such object, [REJ].",
    "Sorry, the image has no such object: [REJ].",
    "[REJ].",
)
# Several targets in one question. ``{names}``: "the red circle and the blue square";
# ``{sents}``: the targets' sentences (a phrase becomes "Segment the <phrase>.").
MULTI_SHORT_QUESTIONS = (
    "Can you segment {names} in this image?",
    "Please segment {names} in this image.",
    "Segment {names}.",
    "What are {names} in this image? Please output segmentation masks.",
)
MULTI_LONG_QUESTIONS = (
    "{sents} Please respond with segmentation masks.",
    "{sents} Please output segmentation masks.",
)
# ``{marks}``: "[SEG], [SEG] and [SEG]"; ``{named}``: "the red circle is [SEG], the blue square is [SEG]".
MULTI_ANSWERS = (
    "{marks}.",
    "Sure, {marks}.",
    "Sure, they are {marks}.",
    "Sure, the segmentation results are {marks}.",
)
MULTI_NAMED_ANSWERS = (
    "{named}.",
    "Sure, {named}.",
)
#: ``data.phrasing`` values: LISA's question templates only, or the mix below.
PHRASINGS = ("lisa", "any")
#: How a question is put under ``data.phrasing: any`` (:func:`any_question`).
PHRASING_KINDS = ("noun", "imperative", "question", "lisa", "lisa_plain")
# ``{np}``: a noun phrase with its article ("the blue square", "the largest shape").
IMPERATIVES = ("Segment {np}.", "Show me {np}.", "Highlight {np}.", "Find {np}.", "Mark {np} in the image.")
WHERE_QUESTIONS = ("Where is {np}?", "Where is {np} in this image?", "Can you show me {np}?",
                   "Which one is {np}?")
#: LISA's short questions without their "respond with segmentation mask" request.
SHORT_PLAIN_QUESTIONS = ("Can you segment the {class_name} in this image?",
                         "Please segment the {class_name} in this image.", "What is {class_name} in this image?")
# Plain [SEG] answers that name the target (``{name}``: "the blue square").
NAMED_ANSWERS = ("{Name} [SEG].", "It is {name}, [SEG].", "Sure, {name}: [SEG].", "Here is {name}: [SEG].")


@dataclass(frozen=True)
class MultiSeg:
    """Several targets per question (recipe ``data.multi_seg``): with probability ``prob``
    a sample's first 2 to ``max_targets`` drawn targets (uniform count) share one question."""

    prob: float = 0.5
    max_targets: int = 3

    @classmethod
    def from_config(cls, node, key: str = "data.multi_seg") -> MultiSeg | None:
        """``None``/``false`` -> off; ``true`` -> defaults; a mapping -> checked values."""
        if node is None or node is False:
            return None
        if node is True:
            return cls()
        if not isinstance(node, dict):
            raise RecipeError(f"must be a mapping {{prob, max_targets}}, true or null, got {node!r}", key=key)
        unknown = sorted(set(node) - {"prob", "max_targets"})
        if unknown:
            raise RecipeError("unknown key; multi_seg takes prob, max_targets", key=f"{key}.{unknown[0]}")
        prob, most = node.get("prob", cls.prob), node.get("max_targets", cls.max_targets)
        if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
            raise RecipeError(f"must be a probability in [0, 1], got {prob!r}", key=f"{key}.prob")
        if isinstance(most, bool) or not isinstance(most, int) or most < 2:
            raise RecipeError(f"must be an integer >= 2 (targets in one question), got {most!r}",
                              key=f"{key}.max_targets")
        return cls(float(prob), int(most))


@dataclass
class Turn:
    """One question/answer about a record's image; ``target``: the record's target the
    answer is about (``None``: a text-only answer; the first one for several);
    ``seg_targets``: the record's target of each ``[SEG]`` of the answer, in order
    (``None``: ``[target]`` when the answer has a ``[SEG]``, else none)."""

    question: str
    answer: str
    target: int | None
    seg_targets: list[int] | None = None

    def mask_targets(self) -> list[int]:
        """The record targets whose masks this turn's ``[SEG]`` tokens predict, in order."""
        if self.seg_targets is not None:
            return list(self.seg_targets)
        return [self.target] if self.target is not None and SEG in self.answer else []


def is_absent(target: Target) -> bool:
    """A target that is not in the image: synthetic ``absent``, gRefCOCO ``no_target``."""
    return bool(target.meta.get("absent") or target.meta.get("no_target"))


def _the(name: str) -> str:
    return name if name.lower().startswith(("the ", "a ", "an ")) else "the " + name


def _join(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _sentence(text: str, kind: str) -> str:
    if kind == "sentence":
        return text if text.endswith((".", "?", "!")) else text + "."
    return f"Segment {_the(text.lower())}."


def _sentence_start(text: str) -> str:
    """``text`` with its first letter upper-cased (the rest kept: "the LCD" -> "The LCD")."""
    return text[:1].upper() + text[1:]


def multi_turn(record: Record, picked: list[int], texts: list[str], rng: np.random.Generator,
               reject_token: str | None = None) -> Turn:
    """One question about several targets (``picked``: record target indices; ``texts``:
    how each is named), answered with one ``[SEG]`` each in order (the reject token for an
    absent target when there is one)."""
    tgts = [record.targets[t] for t in picked]
    marks = [reject_token if reject_token and is_absent(t) else SEG for t in tgts]
    if all(t.kind != "sentence" for t in tgts):
        names = [_the(x.lower()) for x in texts]
        q = MULTI_SHORT_QUESTIONS[rng.integers(len(MULTI_SHORT_QUESTIONS))].format(names=_join(names))
        if rng.integers(2):  # name each target in the answer
            named = ", ".join(f"{n} is {m}" for n, m in zip(names, marks))
            a = MULTI_NAMED_ANSWERS[rng.integers(len(MULTI_NAMED_ANSWERS))].format(named=named)
        else:
            a = MULTI_ANSWERS[rng.integers(len(MULTI_ANSWERS))].format(marks=_join(marks))
    else:
        sents = " ".join(_sentence(x, t.kind) for x, t in zip(texts, tgts))
        q = MULTI_LONG_QUESTIONS[rng.integers(len(MULTI_LONG_QUESTIONS))].format(sents=sents)
        a = MULTI_ANSWERS[rng.integers(len(MULTI_ANSWERS))].format(marks=_join(marks))
    a = _sentence_start(a)
    return Turn(q, a, int(picked[0]), [int(t) for t, m in zip(picked, marks) if m == SEG])


def seg_question(text: str, kind: str, rng: np.random.Generator) -> str:
    """LISA's question for a target: long form for sentences, short form (lower-cased
    name) for class names and phrases."""
    if kind == "sentence":
        return LONG_QUESTIONS[rng.integers(len(LONG_QUESTIONS))].format(sent=text)
    return SHORT_QUESTIONS[rng.integers(len(SHORT_QUESTIONS))].format(class_name=text.lower())


def check_phrasing(value, key: str = "data.phrasing") -> str:
    """``value`` if it is one of :data:`PHRASINGS`, else :class:`RecipeError`."""
    if value not in PHRASINGS:
        raise RecipeError(f"must be one of {', '.join(PHRASINGS)}, got {value!r}", key=key)
    return value


def noun_phrase(tgt: Target, text: str | None = None) -> str | None:
    """A noun phrase with its article for ``tgt`` ("the blue square"): ``text`` (default
    ``tgt.text``) of a phrase target, ``meta["phrase"]`` of a sentence, else ``None``."""
    if tgt.kind != "sentence":
        return _the((text if text is not None else tgt.text).strip().rstrip(".?!").lower())
    phrase = tgt.meta.get("phrase")
    return _the(phrase) if isinstance(phrase, str) and phrase else None


def phrasing_kinds(tgt: Target) -> tuple[str, ...]:
    """The :data:`PHRASING_KINDS` ``tgt`` can be asked in (every kind needs a noun phrase
    except LISA's, which ask a sentence as itself)."""
    if noun_phrase(tgt) is not None:
        return PHRASING_KINDS
    return ("lisa", "lisa_plain")


def any_question(tgt: Target, how: str, rng: np.random.Generator, text: str | None = None) -> str:
    """``tgt`` asked in phrasing kind ``how`` (one of :func:`phrasing_kinds`), wording drawn
    from ``rng``. ``text``: the target's text to use (default ``tgt.text``)."""
    text = tgt.text if text is None else text
    np_ = noun_phrase(tgt, text)
    sentence = tgt.kind == "sentence"
    if how == "lisa":
        return seg_question(text, tgt.kind, rng)
    if how == "lisa_plain":  # a sentence as itself ("Which shape is the largest?"), no suffix
        if sentence:
            return text
        return SHORT_PLAIN_QUESTIONS[rng.integers(len(SHORT_PLAIN_QUESTIONS))].format(class_name=text.lower())
    if np_ is None:
        raise ValueError(f"phrasing {how!r} needs a noun phrase; {tgt.text!r} has none")
    if how == "noun":
        return np_ if rng.integers(2) else np_.removeprefix("the ")
    if how == "imperative":
        return IMPERATIVES[rng.integers(len(IMPERATIVES))].format(np=np_)
    if how == "question":
        return WHERE_QUESTIONS[rng.integers(len(WHERE_QUESTIONS))].format(np=np_)
    raise ValueError(f"unknown phrasing kind {how!r} (known: {', '.join(PHRASING_KINDS)})")


def eval_question(text: str, kind: str, lower: bool = False) -> str:
    """LISA's validation question (``ValDataset``): the last short form for names and
    phrases, the last long form for sentences, after a space (LISA writes
    ``"<image>\n " + question``). ``lower``: refCOCO texts are lower-cased there, ReasonSeg's
    are not."""
    text = text.lower() if lower else text
    if kind == "sentence":
        return " " + LONG_QUESTIONS[1].format(sent=text)
    return " " + SHORT_QUESTIONS[3].format(class_name=text)


def _answer(rng: np.random.Generator, tgt: Target, reject_token: str | None, named: bool = False) -> str:
    """A one-target answer: LISA's ``[SEG]`` phrasings, or a reject phrasing for an
    absent target when the model has a reject token. ``named`` (``data.phrasing: any``):
    the answer names the target when its meta knows the shape ("The blue square [SEG].")
    and a reject says what is missing when its explanation does."""
    if reject_token and is_absent(tgt):
        why = tgt.meta.get("explanation")
        if named and why:
            return f"{why} {reject_token}."
        return REJECT_ANSWERS[rng.integers(len(REJECT_ANSWERS))].replace(REJ, reject_token)
    name = tgt.meta.get("name") if named else None
    if isinstance(name, str) and name:
        return NAMED_ANSWERS[rng.integers(len(NAMED_ANSWERS))].format(name=name, Name=_sentence_start(name))
    return ANSWERS[rng.integers(len(ANSWERS))]


def seg_turns(record: Record, rng: np.random.Generator, classes_per_sample: int = 3,
              explanatory: float = -1.0, multi_seg: MultiSeg | None = None,
              reject_token: str | None = None, explain_first: bool | str = False,
              phrasing: str = "lisa") -> list[Turn]:
    """Up to ``classes_per_sample`` targets drawn without replacement, one turn each.

    ``explanatory`` (LISA's ``--explanatory``, -1 = off): for a record with an
    explanation, with this probability every turn is a text-only answer (the
    explanation, no mask); otherwise, with even odds, plain ``[SEG]`` answers or
    ``[SEG]`` followed by the explanation (the question then asks for one).
    ``multi_seg``: plain ``[SEG]`` turns may merge into one several-target turn
    (:func:`multi_turn`); ``reject_token``: absent targets are answered with it.
    ``phrasing``: ``"lisa"`` (LISA's questions) or ``"any"`` (:func:`any_question`, each
    target in a kind drawn uniformly from those it allows; named plain answers).
    """
    check_phrasing(phrasing)
    n = len(record.targets)
    picked = list(rng.choice(n, size=classes_per_sample, replace=False)) if n >= classes_per_sample else list(range(n))
    mode = "seg"
    if explanatory >= 0 and record.explanation:
        mode = "text" if rng.random() < explanatory else ("seg", "seg+explanation")[int(rng.integers(2))]
    together = 1
    if multi_seg is not None and mode == "seg" and len(picked) >= 2 and rng.random() < multi_seg.prob:
        together = int(rng.integers(2, min(multi_seg.max_targets, len(picked)) + 1))
    turns, group, texts = [], [], []
    for t in picked:
        tgt = record.targets[int(t)]
        text = tgt.text
        if tgt.meta.get("phrasings"):  # part names: LISA picks "obj part" or "the part of the obj"
            text = tgt.meta["phrasings"][int(rng.integers(len(tgt.meta["phrasings"])))]
        why = tgt.meta.get("explanation") or record.explanation  # per target where several differ
        if together > 1:  # the first `together` targets share one question
            group.append(int(t))
            texts.append(text)
            if len(group) == together:
                turns.append(multi_turn(record, group, texts, rng, reject_token))
                together = 1
        elif explain_first and why and mode in ("seg", "seg+explanation") and (
                not is_absent(tgt) or (reject_token and tgt.meta.get("explanation"))):
            # The reason first, then the mask: the answer names its target before [SEG]
            # (data.explain_first; not LISA's order, see the module docstring); an absent
            # target's reason ("There is no ...") comes before the reject token.
            mark = reject_token if is_absent(tgt) else SEG
            name, predicate = tgt.meta.get("name"), tgt.meta.get("predicate")
            if explain_first == EXPLAIN_AFTER_NAME and mark == SEG and name and predicate:
                answer = f"{_sentence_start(name)} {SEG} {predicate}"
            else:
                answer = f"{why} {mark}."
            turns.append(Turn(_question(tgt, text, rng, phrasing), answer, int(t)))
        elif mode == "seg":
            turns.append(Turn(_question(tgt, text, rng, phrasing),
                              _answer(rng, tgt, reject_token, named=phrasing == "any"), int(t)))
        elif mode == "seg+explanation":
            q = f"{tgt.text} {EXPLANATORY_QUESTIONS[rng.integers(len(EXPLANATORY_QUESTIONS))]}"
            turns.append(Turn(q, f"{_answer(rng, tgt, reject_token)} {why}", int(t)))
        else:
            turns.append(Turn(text, why, None))
    return turns


def _question(tgt: Target, text: str, rng: np.random.Generator, phrasing: str) -> str:
    """A segmentation question for ``tgt``: LISA's (:func:`seg_question`) or, under
    ``phrasing="any"``, one of the target's :func:`phrasing_kinds` drawn uniformly."""
    if phrasing == "lisa":
        return seg_question(text, tgt.kind, rng)
    kinds = phrasing_kinds(tgt)
    return any_question(tgt, kinds[int(rng.integers(len(kinds)))], rng, text)


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


def turns_to_sample(record: Record, turns: list[Turn], template: Template, image: np.ndarray | None = None,
                    reject_token: str | None = None) -> Sample:
    """One conversation per turn (LISA's layout), masks in ``[SEG]`` order
    (:meth:`Turn.mask_targets`). ``reject_token``: also a token in the answers."""
    image = record.image() if image is None else image
    markers = (SEG, reject_token) if reject_token else (SEG,)
    convs = [Conversation(template).add([IMAGE, "\n" + t.question], t.answer, markers=markers) for t in turns]
    h, w = image.shape[:2]
    masks = [train_mask(record.targets[k].mask) for t in turns for k in t.mask_targets()]
    return Sample(image, convs, np.stack(masks) if masks else np.zeros((0, h, w), np.float32))


def build_sample(record: Record, rng: np.random.Generator, template: Template, classes_per_sample: int = 3,
                 explanatory: float = -1.0, multi_seg: MultiSeg | None = None,
                 reject_token: str | None = None, explain_first: bool | str = False,
                 phrasing: str = "lisa", geometry=None) -> Sample:
    """A training :class:`~lisa_kit.data.Sample` from a record: VQA rounds as one
    conversation, segmentation targets as sampled question/answer turns (``multi_seg``,
    ``reject_token``, ``explain_first``, ``phrasing``: see the module docstring).
    ``geometry`` (a :class:`~lisa_kit.geometry_answers.TextGeometry`, ``prompt_strategy:
    text_geometry``): each mask answer is rewritten as its targets' boxes and points in that
    format, and the sample has no mask targets (token loss only)."""
    if record.rounds:
        image = record.image()
        h, w = image.shape[:2]
        return Sample(image, [vqa_conversation(record, template)], np.zeros((0, h, w), np.float32))
    turns = seg_turns(record, rng, classes_per_sample, explanatory, multi_seg, reject_token, explain_first,
                      phrasing)
    if geometry is not None:
        from lisa_kit.geometry_answers import geometry_turns

        turns = geometry_turns(record, turns, geometry)
    return turns_to_sample(record, turns, template, reject_token=reject_token)
