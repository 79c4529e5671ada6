"""Scoring a model on ReasonSeg and the refCOCO family with LISA's protocol.

Two modes:

* ``teacher`` (LISA's ``validate()``): each query is asked with the answer given as
  ``"[SEG]."``; one teacher-forced forward per image covers all its queries; the mask of
  each ``[SEG]`` is scored. The prompt is LISA's validation question
  (:func:`lisa_kit.prompts.eval_question`). For ReasonSeg LISA asks ``text[0]`` only; so
  does this mode unless ``all_texts`` is set.
  With ``model.prompt_strategy: text_geometry`` (:mod:`lisa_kit.geometry_answers`) the
  given answer is the ground truth's box and point in the model's format, and the mask
  comes from the model's greedy token at every answer position, read back as an answer
  (:func:`~lisa_kit.geometry_answers.teacher_answers`).
* ``generate``: what users live with. The model answers by itself; the first ``[SEG]``
  of the answer gives the query's mask, and a query answered without ``[SEG]`` scores an
  empty mask. A model with a reject token (``model.reject_token``, GSVA's ``[REJ]``)
  that answers ``[REJ]`` first scores an empty mask as well -- so a target that is not in
  the image (gRefCOCO no-target, synthetic absent), answered ``[REJ]``, scores IoU 1 by
  LISA's empty-union rule.

Teacher mode asks every query with LISA's ``"[SEG]."``, also gRefCOCO's no-target
expressions and with a reject-token model: the answer is given, so it cannot measure
rejection; the mask of that ``[SEG]`` is scored against the empty ground truth (use
``generate`` to score rejections).

**Beyond LISA's numbers** (both additions; ``all`` and ReasonSeg's subsets are unchanged):

* *per question family*: records whose targets carry ``meta["type"]`` (the synthetic set)
  are also scored per family (:func:`question_family`: colour, kind, colour+kind, size,
  corners, position, relations, absent) as subsets ``family:<name>``; with
  ``phrasing="any"`` the questions are put in the varied phrasings of
  :func:`lisa_kit.prompts.any_question` (kind ``k`` of a target's kinds for query ``k``
  of record ``i``: ``(i + k) mod n``, so the kinds are balanced and the run is
  deterministic) and scored per kind as subsets ``phrasing:<kind>``.
* *answer-mask consistency* (generate mode, records with shapes and a label map): does
  the answer name the shape its mask paints? :func:`answer_consistency` gives each query
  a verdict; :attr:`Evaluator.consistency` holds the counts and the rate after
  :meth:`Evaluator.run`.

Predictions are ``mask_logits > 0`` at the original image size; metrics are
:class:`lisa_kit.metrics.SegMetrics` (bit-exact with ``validate()``). Under ``torchrun``
each rank scores records ``rank, rank + world, ...`` and the per-query statistics are
gathered (one ``all_gather_object`` per :meth:`Evaluator.run`, entered identically on
every rank whatever its share holds), so every query counts exactly once and the numbers
do not depend on the number of ranks.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from lisa_kit.conversation import IMAGE, Conversation, encode, recipe_template
from lisa_kit.data import Sample, collate
from lisa_kit.datasets.base import DatasetReader, Record
from lisa_kit.datasets.synthetic import CORNERS, PALETTE
from lisa_kit.errors import EvaluationError, UnknownComponentError
from lisa_kit.interfaces import move_input
from lisa_kit.metrics import SegMetrics
from lisa_kit.prompts import EVAL_ANSWER, any_question, check_phrasing, eval_question, phrasing_kinds

EVAL_SPLITS = {
    "reason_seg": ("val", "test"),
    "refcoco": ("val", "testA", "testB"),
    "refcoco+": ("val", "testA", "testB"),
    "refcocog": ("val", "test"),
    "refclef": ("val", "testA", "testB", "test"),
    "grefcoco": ("val", "testA", "testB"),
    "synthetic": ("val", "test"),
}
MODES = ("teacher", "generate")


def parse_dataset(spec: str) -> tuple[str, str]:
    """``"reason_seg:val"`` -> ``("reason_seg", "val")`` (split defaults to ``val``)."""
    name, _, split = spec.partition(":")
    split = split or "val"
    if name not in EVAL_SPLITS:
        raise UnknownComponentError("evaluation dataset", name, EVAL_SPLITS)
    if split not in EVAL_SPLITS[name]:
        raise UnknownComponentError(f"{name} split", split, EVAL_SPLITS[name])
    return name, split


@dataclass
class Query:
    """One scored question: ``text``/``kind`` as the reader gives them, the ground truth
    ``gt`` (``uint8 (H, W)``, 0/1/255) and a ``key`` unique in the dataset."""

    text: str
    kind: str
    gt: np.ndarray
    key: str
    subset: str
    family: str | None = None  # :func:`question_family` of the target (synthetic records)
    question: str | None = None  # the question to ask; None: LISA's eval_question
    phrasing: str | None = None  # the phrasing kind of ``question``
    meta: dict = field(default_factory=dict, repr=False)


def queries_of(record: Record, all_texts: bool = False) -> list[Query]:
    """The queries LISA's validation asks about a record."""
    targets = record.targets
    if record.source == "reason_seg" and not all_texts:
        targets = targets[:1]
    subset = lambda t: "long" if t.kind == "sentence" else "short"  # noqa: E731  (ReasonSeg's split)
    return [Query(t.text, t.kind, t.mask, f"{record.key}#{k}", subset(t), question_family(t.meta), meta=t.meta)
            for k, t in enumerate(targets) if t.mask is not None]


#: Synthetic question types -> the question families reported (``extreme`` asks about
#: position; ``relation``, ``nearest`` and ``same`` relate the target to an anchor).
FAMILIES = {"size": "size", "corners": "corners", "extreme": "position", "relation": "relations",
            "nearest": "relations", "same": "relations", "absent": "absent"}


def question_family(meta: dict) -> str | None:
    """The family of a target's question from its ``meta`` (``None``: not a synthetic
    target). ``attribute`` lookups split by what they name: ``colour`` ("the blue
    shape"), ``kind`` ("the square") or ``colour+kind`` ("the blue square")."""
    qtype = meta.get("type")
    if qtype == "attribute":
        q = meta.get("query") or {}
        return "colour+kind" if q.get("color") and q.get("kind") else "colour" if q.get("color") else "kind"
    return FAMILIES.get(qtype)


# Every colour and kind word of the synthetic world: an answer naming one the scene lacks
# ("the purple triangle") still names a shape, just not the painted one.
_PALETTE_NAMES, _KIND_NAMES = set(PALETTE), set(CORNERS)
CONSISTENCY_VERDICTS = ("consistent", "wrong_shape", "empty_mask", "rejected_with_mask", "unnamed")
# "There is no purple triangle in the image.", "The purple triangle is not in the image.",
# "no such object", "Sorry, nothing ...".
_REJECTION = re.compile(r"\b(there is no|there's no|there are no|no such|nothing|(is|are) not in the image)\b",
                        re.IGNORECASE)


def is_rejection(answer: str) -> bool:
    """Whether an answer says that nothing matches ("There is no purple triangle in the
    image.", "The purple triangle is not in the image.", "no such object", "nothing ...")."""
    return _REJECTION.search(answer) is not None


def named_shape(text: str, colors, kinds) -> tuple[str, str] | None:
    """The first "<colour> <kind>" an answer names (``("blue", "square")``), or ``None``."""
    pattern = r"\b(%s)\s+(%s)s?\b" % ("|".join(map(re.escape, colors)), "|".join(map(re.escape, kinds)))
    m = re.search(pattern, text, re.IGNORECASE)
    return (m.group(1).lower(), m.group(2).lower()) if m else None


def painted_shape(pred: np.ndarray | None, labels: np.ndarray, n_shapes: int) -> int | None:
    """The shape a predicted mask ``(H, W)`` mostly covers: index ``j`` of the highest IoU
    with ``labels == j + 1`` (``labels``: ``(H, W)``, 0 background); ``None`` when the mask
    is empty or overlaps no shape."""
    if pred is None or not pred.any():
        return None
    pred = pred.astype(bool)
    ious = [np.logical_and(pred, labels == j + 1).sum() / np.logical_or(pred, labels == j + 1).sum()
            for j in range(n_shapes)]
    return int(np.argmax(ious)) if ious and max(ious) > 0 else None


def answer_consistency(answer: str, pred: np.ndarray | None, labels: np.ndarray, shapes: list[dict],
                       rejected: bool = False) -> str:
    """Whether ``answer`` names what ``pred`` paints (one of :data:`CONSISTENCY_VERDICTS`).

    ``shapes``: the record's shapes (``color``, ``kind``; shape ``j`` is ``labels == j + 1``);
    ``rejected``: the model answered its reject token. A rejection ("There is no ...",
    ``[REJ]``) is consistent with an empty mask (``rejected_with_mask`` otherwise); an
    answer naming "the <colour> <kind>" is consistent when that is the shape the mask
    mostly covers (:func:`painted_shape`), ``wrong_shape`` when another is, ``empty_mask``
    when it paints none; an answer that names no shape is ``unnamed`` (it cannot be
    checked, and counts against the rate)."""
    painted = painted_shape(pred, labels, len(shapes))
    if rejected or is_rejection(answer):
        return "consistent" if painted is None else "rejected_with_mask"
    colors = sorted({s["color"] for s in shapes} | _PALETTE_NAMES)
    kinds = sorted({s["kind"] for s in shapes} | _KIND_NAMES)
    named = named_shape(answer, colors, kinds)
    if named is None:
        return "unnamed"
    if painted is None:
        return "empty_mask"
    s = shapes[painted]
    return "consistent" if (s["color"], s["kind"]) == named else "wrong_shape"


def consistency_summary(verdicts: dict) -> dict:
    """``{query key: (family, verdict[, present, rejected])}`` -> counts, rate (consistent /
    all) and per family. Where ``present`` (the target is in the image) and ``rejected``
    (the answer said nothing matches) are given, ``present`` counts the queries with a
    target and ``rejected_present`` those among them that were rejected: a rejection with an
    empty mask is *consistent* (the answer says what the mask shows) but wrong for a shape
    that is there, so it is counted apart."""
    def summary(items):
        counts = Counter(x[1] for x in items)
        n = sum(counts.values())
        present = [x for x in items if len(x) > 3 and x[2]]
        return {"n": n, "consistent": counts["consistent"], "rate": counts["consistent"] / n if n else None,
                "verdicts": {v: counts[v] for v in CONSISTENCY_VERDICTS}, "present": len(present),
                "rejected_present": sum(bool(x[3]) for x in present)}

    items = [verdicts[k] for k in sorted(verdicts, key=str)]
    out = summary(items)
    out["families"] = {f: summary([x for x in items if x[0] == f])
                       for f in sorted({x[0] for x in items if x[0] is not None})}
    return out


def _lower(record: Record) -> bool:
    return record.source.startswith("ref") or record.source == "grefcoco"  # LISA lower-cases referring texts


class Evaluator:
    """Scores ``model`` on ``reader`` in the given ``modes``; :meth:`run` returns
    ``{mode: {"all": result, "short": ..., "long": ..., "family:<f>": ..., "phrasing:<p>": ...}}``
    (subsets only when present) and sets :attr:`consistency` (``{mode: summary}``,
    generate mode on records with shapes; see :func:`consistency_summary`).
    ``phrasing``: ``"lisa"`` (LISA's validation question) or ``"any"`` (module docstring)."""

    def __init__(self, model, reader: DatasetReader, modes=("teacher",), template: str | None = None,
                 all_texts: bool = False, max_new_tokens: int = 32, limit: int | None = None, progress: bool = True,
                 phrasing: str = "lisa"):
        bad = [m for m in modes if m not in MODES]
        if bad:
            raise UnknownComponentError("evaluation mode", bad[0], MODES)
        self.phrasing = check_phrasing(phrasing, key="phrasing")
        self.model = model
        self.reader = reader
        self.modes = tuple(modes)
        self.template = recipe_template(model.recipe, model.tokenizer, name=template)
        self.all_texts = all_texts
        self.max_new_tokens = max_new_tokens
        self.limit = limit
        self.progress = progress
        self.answers: dict[str, dict[str, str]] = {m: {} for m in self.modes}
        self.rejected: dict[str, dict[str, bool]] = {m: {} for m in self.modes}
        self.consistency: dict[str, dict] = {}

    def _conv(self, record: Record, q: Query, answer: str | None) -> Conversation:
        question = q.question if q.question is not None else eval_question(q.text, q.kind, _lower(record))
        geometry = getattr(self.model, "text_geometry", None)  # text box/point answers: its instruction
        if geometry is not None:
            question = geometry.ask(question)
        return Conversation(self.template).add([IMAGE, "\n" + question], answer)

    def queries(self, record: Record, i: int) -> list[Query]:
        """Record ``i``'s queries, each with its question under :attr:`phrasing`."""
        qs = queries_of(record, self.all_texts)
        if self.phrasing == "any":
            targets = {f"{record.key}#{k}": t for k, t in enumerate(record.targets)}
            for k, q in enumerate(qs):
                tgt = targets[q.key]
                kinds = phrasing_kinds(tgt)
                q.phrasing = kinds[(i + k) % len(kinds)]
                q.question = any_question(tgt, q.phrasing, np.random.default_rng([i, k]))
        return qs

    @torch.inference_mode()
    def teacher(self, record: Record, image: np.ndarray, qs: list[Query]) -> list[torch.Tensor]:
        """Mask logits ``(H, W)`` per query from one teacher-forced forward."""
        geometry = getattr(self.model, "text_geometry", None)
        if geometry is not None:  # box/point answers: the ground truth's, read back greedily token by token
            from lisa_kit.geometry_answers import teacher_answers

            convs = [self._conv(record, q, geometry.write_masks([q.gt], q.gt.shape[:2])) for q in qs]
            batch = collate([Sample(image, convs, None)], self.model).to(self._device())
            return [a["masks"][0] for a in teacher_answers(self.model, batch)]
        convs = [self._conv(record, q, EVAL_ANSWER) for q in qs]
        batch = collate([Sample(image, convs, None)], self.model).to(self._device())
        return list(self.model(batch).pred_masks[0])

    @torch.inference_mode()
    def generate(self, record: Record, image: np.ndarray, qs: list[Query]) -> list[torch.Tensor | None]:
        """Mask logits of the first generated ``[SEG]`` (or ``[REJ]``: all negative) per query
        (``None``: neither)."""
        from lisa_kit.generation import GenerationConfig, generate

        m = self.model
        slot_ids = m.fusion.wrap_image(m.tokenizer)
        prompts = [encode(self._conv(record, q, None), m.tokenizer, slot_ids)[0] for q in qs]
        dev = self._device()
        pixels, meta = m.mask_decoder.preprocess(image)
        vision = move_input(m.vision_encoder.collate([m.vision_encoder.preprocess(image)]), dev)
        outs = generate(m, prompts, [[0]] * len(qs), vision,
                        pixels[None].to(dev), [meta], GenerationConfig(max_new_tokens=self.max_new_tokens))
        for q, o in zip(qs, outs):
            self.answers["generate"][q.key] = o.text
            self.rejected["generate"][q.key] = bool(o.rejected and o.rejected[0])
        return [o.masks[0] if len(o.masks) else None for o in outs]

    def _device(self):
        return next(self.model.parameters()).device

    def run(self) -> dict:
        """Score this rank's share, gather every rank's per-query statistics, reduce.

        Under ``torch.distributed`` this is exactly one collective per call, whatever
        this rank's share holds: which subsets (ReasonSeg's short/long) a rank saw
        depends on its records, so the subsets are unioned after the gather instead of
        being gathered one by one (ranks would disagree on the number of calls).
        """
        rank, world = _rank_world()
        try:
            local = self.collect(rank, world)
        except Exception as e:
            _agree(e)  # every rank raises: none waits in the gather below for one that failed
            raise  # one process: as it is
        _agree(None)
        states = {mode: {name: m.state() for name, m in subsets.items()} for mode, subsets in local.items()}
        merged: dict[str, dict[str, SegMetrics]] = {mode: {} for mode in self.modes}
        verdicts: dict[str, dict] = {}
        for part, part_verdicts in _all_gather_object((states, self._verdicts), world):
            for mode, v in part_verdicts.items():
                verdicts.setdefault(mode, {}).update(v)
            for mode, subsets in part.items():
                for name, state in subsets.items():
                    shard = SegMetrics.from_state(state)
                    target = merged[mode].setdefault(
                        name, SegMetrics(ignore_index=shard.ignore_index, on_duplicate=shard.on_duplicate))
                    target.merge(shard)
        self.consistency = {mode: consistency_summary(v) for mode, v in sorted(verdicts.items())}
        return {mode: {name: m.result() for name, m in sorted(subsets.items())} for mode, subsets in merged.items()}

    def collect(self, rank: int = 0, world: int = 1) -> dict[str, dict[str, SegMetrics]]:
        """Per-query statistics of records ``rank, rank + world, ...`` (keyed by record
        index, so shards merge into exactly the single-process numbers)."""
        from tqdm import tqdm

        n = len(self.reader) if self.limit is None else min(self.limit, len(self.reader))
        metrics = {m: {"all": SegMetrics()} for m in self.modes}
        self._verdicts: dict[str, dict] = {}  # mode -> query key -> (family, verdict), this rank's
        self.model.eval()
        for i in tqdm(range(rank, n, world), desc=f"eval {self.reader.name}:{self.reader.split}", unit="img",
                      disable=not self.progress or rank != 0):
            record = self.reader[i]
            qs = self.queries(record, i)
            if not qs:
                continue
            image = record.image()
            for mode in self.modes:
                logits = self.teacher(record, image, qs) if mode == "teacher" else self.generate(record, image, qs)
                preds = [np.zeros(q.gt.shape, bool) if lg is None else (lg > 0).cpu().numpy()
                         for q, lg in zip(qs, logits)]
                gts = [q.gt for q in qs]
                metrics[mode]["all"].add_sample(preds, gts, keys=[q.key for q in qs], sample_key=i)
                for sub in {s for q in qs for s in _subsets(record, q)}:
                    idx = [k for k, q in enumerate(qs) if sub in _subsets(record, q)]
                    metrics[mode].setdefault(sub, SegMetrics()).add_sample(
                        [preds[k] for k in idx], [gts[k] for k in idx], keys=[qs[k].key for k in idx],
                        sample_key=i)
                shapes = (record.meta or {}).get("shapes")
                labels = getattr(record, "labels", None)
                if mode == "generate" and shapes and labels is not None:
                    for q, lg, p in zip(qs, logits, preds):
                        answer, rejected = self.answers[mode].get(q.key, ""), self.rejected[mode].get(q.key, False)
                        verdict = answer_consistency(answer, None if lg is None else p, labels, shapes, rejected)
                        self._verdicts.setdefault(mode, {})[q.key] = (
                            q.family, verdict, bool((q.gt == 1).any()), rejected or is_rejection(answer))
        return metrics


def _subsets(record: Record, q: Query) -> list[str]:
    """The subsets query ``q`` is also scored in: ReasonSeg's short/long, the question
    family and the phrasing kind (when known)."""
    out = [q.subset] if record.source == "reason_seg" else []
    if q.family is not None:
        out.append(f"family:{q.family}")
    if q.phrasing is not None:
        out.append(f"phrasing:{q.phrasing}")
    return out


def _all_gather_object(obj, world: int) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (collective; ``[obj]`` in one process)."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    gathered: list = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def _agree(failure: Exception | None) -> None:
    """Under ``torch.distributed``, in place of the next collective after this rank's share:
    every rank learns which ranks failed and raises a typed error (the failed rank its own,
    a :class:`~lisa_kit.errors.LisaKitError` as it is, another error as an
    :class:`~lisa_kit.errors.EvaluationError` chained to it; the others
    :class:`~lisa_kit.errors.RankFailedError`), so none is left waiting in the gather."""
    from lisa_kit.train.distributed import group_env, raise_on_any_failure

    env = group_env()
    if not env.distributed:
        return
    raise_on_any_failure(
        failure, env,
        wrap=lambda e: EvaluationError(f"evaluation failed on rank {env.rank}: {type(e).__name__}: {e}"),
        others=lambda ranks: f"evaluation failed on rank {', '.join(map(str, ranks))} (its error says why)")


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def markdown_table(results: dict, title: str, consistency: dict | None = None) -> str:
    """``results`` of :meth:`Evaluator.run` as a markdown table; ``consistency``
    (:attr:`Evaluator.consistency`) adds a table of answer-mask consistency."""
    lines = [f"### {title}", "", "| mode | subset | gIoU | cIoU | queries | images |", "| --- | --- | --- | --- | --- | --- |"]
    for mode, subsets in results.items():
        for sub, r in subsets.items():
            lines.append(f"| {mode} | {sub} | {r['giou']:.4f} | {r['ciou']:.4f} | {r['n_queries']} | {r['n_samples']} |")
    for mode, c in (consistency or {}).items():
        lines += ["", f"Answer-mask consistency ({mode}): does the answer name the shape its mask paints?", "",
                  "| family | rate | consistent | queries | " + " | ".join(CONSISTENCY_VERDICTS[1:])
                  + " | present target rejected |",
                  "| --- " * (5 + len(CONSISTENCY_VERDICTS) - 1) + "|"]
        for name, row in [("all", c), *c["families"].items()]:
            rate = "-" if row["rate"] is None else f"{row['rate']:.3f}"
            rest = " | ".join(str(row["verdicts"][v]) for v in CONSISTENCY_VERDICTS[1:])
            lines.append(f"| {name} | {rate} | {row['consistent']} | {row['n']} | {rest} | "
                         f"{row['rejected_present']}/{row['present']} |")
    return "\n".join(lines) + "\n"
