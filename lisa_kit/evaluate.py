"""Scoring a model on ReasonSeg and the refCOCO family with LISA's protocol.

Two modes:

* ``teacher`` (LISA's ``validate()``): each query is asked with the answer given as
  ``"[SEG]."``; one teacher-forced forward per image covers all its queries; the mask of
  each ``[SEG]`` is scored. The prompt is LISA's validation question
  (:func:`lisa_kit.prompts.eval_question`). For ReasonSeg LISA asks ``text[0]`` only; so
  does this mode unless ``all_texts`` is set.
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

Predictions are ``mask_logits > 0`` at the original image size; metrics are
:class:`lisa_kit.metrics.SegMetrics` (bit-exact with ``validate()``). Under ``torchrun``
each rank scores records ``rank, rank + world, ...`` and the per-query statistics are
gathered (one ``all_gather_object`` per :meth:`Evaluator.run`, entered identically on
every rank whatever its share holds), so every query counts exactly once and the numbers
do not depend on the number of ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lisa_kit.conversation import IMAGE, Conversation, encode, get_template
from lisa_kit.data import Sample, collate
from lisa_kit.datasets.base import DatasetReader, Record
from lisa_kit.errors import UnknownComponentError
from lisa_kit.metrics import SegMetrics
from lisa_kit.prompts import EVAL_ANSWER, eval_question

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


def queries_of(record: Record, all_texts: bool = False) -> list[Query]:
    """The queries LISA's validation asks about a record."""
    targets = record.targets
    if record.source == "reason_seg" and not all_texts:
        targets = targets[:1]
    subset = lambda t: "long" if t.kind == "sentence" else "short"  # noqa: E731  (ReasonSeg's split)
    return [Query(t.text, t.kind, t.mask, f"{record.key}#{k}", subset(t)) for k, t in enumerate(targets)
            if t.mask is not None]


def _lower(record: Record) -> bool:
    return record.source.startswith("ref") or record.source == "grefcoco"  # LISA lower-cases referring texts


class Evaluator:
    """Scores ``model`` on ``reader`` in the given ``modes``; :meth:`run` returns
    ``{mode: {"all": result, "short": ..., "long": ...}}`` (subsets only when present)."""

    def __init__(self, model, reader: DatasetReader, modes=("teacher",), template: str | None = None,
                 all_texts: bool = False, max_new_tokens: int = 32, limit: int | None = None, progress: bool = True):
        bad = [m for m in modes if m not in MODES]
        if bad:
            raise UnknownComponentError("evaluation mode", bad[0], MODES)
        self.model = model
        self.reader = reader
        self.modes = tuple(modes)
        name = template or ((model.recipe or {}).get("conversation") or {}).get("template", "llava_v1")
        self.template = get_template(name, model.tokenizer)
        self.all_texts = all_texts
        self.max_new_tokens = max_new_tokens
        self.limit = limit
        self.progress = progress
        self.answers: dict[str, dict[str, str]] = {m: {} for m in self.modes}

    def _conv(self, record: Record, q: Query, answer: str | None) -> Conversation:
        return Conversation(self.template).add([IMAGE, "\n" + eval_question(q.text, q.kind, _lower(record))], answer)

    @torch.inference_mode()
    def teacher(self, record: Record, image: np.ndarray, qs: list[Query]) -> list[torch.Tensor]:
        """Mask logits ``(H, W)`` per query from one teacher-forced forward."""
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
        outs = generate(m, prompts, [[0]] * len(qs), m.vision_encoder.preprocess(image)[None].to(dev),
                        pixels[None].to(dev), [meta], GenerationConfig(max_new_tokens=self.max_new_tokens))
        for q, o in zip(qs, outs):
            self.answers["generate"][q.key] = o.text
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
        local = self.collect(rank, world)
        states = {mode: {name: m.state() for name, m in subsets.items()} for mode, subsets in local.items()}
        merged: dict[str, dict[str, SegMetrics]] = {mode: {} for mode in self.modes}
        for part in _all_gather_object(states, world):
            for mode, subsets in part.items():
                for name, state in subsets.items():
                    shard = SegMetrics.from_state(state)
                    target = merged[mode].setdefault(
                        name, SegMetrics(ignore_index=shard.ignore_index, on_duplicate=shard.on_duplicate))
                    target.merge(shard)
        return {mode: {name: m.result() for name, m in sorted(subsets.items())} for mode, subsets in merged.items()}

    def collect(self, rank: int = 0, world: int = 1) -> dict[str, dict[str, SegMetrics]]:
        """Per-query statistics of records ``rank, rank + world, ...`` (keyed by record
        index, so shards merge into exactly the single-process numbers)."""
        from tqdm import tqdm

        n = len(self.reader) if self.limit is None else min(self.limit, len(self.reader))
        metrics = {m: {"all": SegMetrics()} for m in self.modes}
        self.model.eval()
        for i in tqdm(range(rank, n, world), desc=f"eval {self.reader.name}:{self.reader.split}", unit="img",
                      disable=not self.progress or rank != 0):
            record = self.reader[i]
            qs = queries_of(record, self.all_texts)
            if not qs:
                continue
            image = record.image()
            for mode in self.modes:
                logits = self.teacher(record, image, qs) if mode == "teacher" else self.generate(record, image, qs)
                preds = [np.zeros(q.gt.shape, bool) if lg is None else (lg > 0).cpu().numpy()
                         for q, lg in zip(qs, logits)]
                gts = [q.gt for q in qs]
                metrics[mode]["all"].add_sample(preds, gts, keys=[q.key for q in qs], sample_key=i)
                if record.source == "reason_seg":
                    for sub in {q.subset for q in qs}:
                        idx = [k for k, q in enumerate(qs) if q.subset == sub]
                        metrics[mode].setdefault(sub, SegMetrics()).add_sample(
                            [preds[k] for k in idx], [gts[k] for k in idx], keys=[qs[k].key for k in idx],
                            sample_key=i)
        return metrics


def _all_gather_object(obj, world: int) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (collective; ``[obj]`` in one process)."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    gathered: list = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def markdown_table(results: dict, title: str) -> str:
    """``results`` of :meth:`Evaluator.run` as a markdown table."""
    lines = [f"### {title}", "", "| mode | subset | gIoU | cIoU | queries | images |", "| --- | --- | --- | --- | --- | --- |"]
    for mode, subsets in results.items():
        for sub, r in subsets.items():
            lines.append(f"| {mode} | {sub} | {r['giou']:.4f} | {r['ciou']:.4f} | {r['n_queries']} | {r['n_samples']} |")
    return "\n".join(lines) + "\n"
