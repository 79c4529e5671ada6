"""LISA's mix of training sources, deterministic for a seed and safe to shard.

LISA's ``HybridDataset`` draws a source group by rate (sem_seg 9, refer_seg 3, vqa 3,
reason_seg 1), a dataset uniformly inside the group, an image uniformly inside the
dataset, then questions and answers, all from Python's global RNG, so what a sample is
depends on which worker drew what before it. Here sample ``i`` of epoch ``e`` is a pure
function of ``(seed, e, i)``: each index seeds its own generator. Any sampler over
``range(len(dataset))`` (a ``DistributedSampler`` included) therefore gives every rank
distinct, reproducible samples, and resuming at a position replays exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lisa_kit.conversation import Template
from lisa_kit.data import Sample
from lisa_kit.datasets.base import DatasetReader, open_dataset
from lisa_kit.errors import DataError

# LISA's train_ds.py defaults: --dataset sem_seg||refer_seg||vqa||reason_seg, --sample_rates 9,3,3,1
LISA_SOURCES = {
    "sem_seg": (("ade20k", "cocostuff", "pascal_part", "paco_lvis", "mapillary"), 9.0),
    "refer_seg": (("refclef", "refcoco", "refcoco+", "refcocog"), 3.0),
    "vqa": (("llava_instruct",), 3.0),
    "reason_seg": (("reason_seg",), 1.0),
}


@dataclass
class SourceGroup:
    """Readers drawn from with one rate; a reader inside the group is chosen uniformly."""

    name: str
    readers: list[DatasetReader]
    rate: float


class HybridDataset:
    """``len`` = ``samples_per_epoch``; ``self[i]`` -> :class:`~lisa_kit.data.Sample`.

    ``classes_per_sample`` and ``explanatory`` are LISA's ``--num_classes_per_sample`` and
    ``--explanatory``; ``multi_seg`` (several targets per question) and ``reject_token``
    (answer absent targets with it) go to :func:`lisa_kit.prompts.build_sample`. Records
    without targets or rounds (an image with no labelled class) are skipped by drawing
    again from the same generator.
    """

    MAX_REDRAWS = 20

    def __init__(self, groups: list[SourceGroup], template: Template, samples_per_epoch: int, seed: int = 0,
                 classes_per_sample: int = 3, explanatory: float = 0.1, multi_seg=None,
                 reject_token: str | None = None, explain_first: bool | str = False, phrasing: str = "lisa",
                 geometry=None):
        from lisa_kit.prompts import check_phrasing

        groups = [g for g in groups if g.rate > 0]
        if not groups:
            raise DataError("no data source with a positive rate")
        for g in groups:
            if not g.readers or not any(len(r) for r in g.readers):
                raise DataError(f"data source {g.name!r} has no records")
        self.groups = groups
        rates = np.asarray([g.rate for g in groups], dtype=np.float64)
        self.probs = rates / rates.sum()
        self.template = template
        self.samples_per_epoch = int(samples_per_epoch)
        self.seed = int(seed)
        self.epoch = 0
        self.classes_per_sample = classes_per_sample
        self.explanatory = explanatory
        self.multi_seg = multi_seg
        self.reject_token = reject_token
        self.explain_first = explain_first
        self.phrasing = check_phrasing(phrasing)
        self.geometry = geometry  # prompt_strategy text_geometry: box/point answers (build_sample)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def locate(self, i: int, rng: np.random.Generator | None = None):
        """``(group, reader, record index)`` sample ``i`` is drawn from."""
        rng = rng if rng is not None else self.rng(i)
        g = self.groups[int(rng.choice(len(self.groups), p=self.probs))]
        readers = [r for r in g.readers if len(r)]
        reader = readers[int(rng.integers(len(readers)))]
        return g, reader, int(rng.integers(len(reader)))

    def rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(i)])

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < len(self):
            raise IndexError(i)
        from lisa_kit.prompts import build_sample

        rng = self.rng(i)
        for _ in range(self.MAX_REDRAWS):
            g, reader, k = self.locate(i, rng)
            record = reader[k]
            if record.targets or record.rounds:
                return build_sample(record, rng, self.template, self.classes_per_sample, self.explanatory,
                                    self.multi_seg, self.reject_token, self.explain_first, self.phrasing,
                                    self.geometry)
        raise DataError(f"{self.MAX_REDRAWS} draws in a row found records without targets; check the datasets")


def hybrid_from_config(cfg: dict, template: Template, seed: int = 0, reject_token: str | None = None,
                       geometry=None) -> HybridDataset:
    """Build from a recipe's ``data:`` section::

        data:
          root: /data/dataset                  # LISA README's dataset/ directory
          samples_per_epoch: 50000
          classes_per_sample: 3
          explanatory: 0.1
          multi_seg: {prob: 0.5, max_targets: 3}   # several targets per question (default: off)
          explain_first: false                     # true: "<explanation> [SEG]." (the reason before the mask);
                                                   # after_name: "<Name> [SEG] <rest of the explanation>"
          phrasing: lisa                           # any: noun phrases, imperatives, questions, LISA's templates
          sources:                              # default: LISA's four groups and rates
            reason_seg: {datasets: [reason_seg], rate: 1, split: train}
            synthetic: {datasets: [synthetic], rate: 1, options: {size: 2000}}

    ``reject_token``: the model's (``model.reject_token``), to answer absent targets with.
    ``geometry``: the model's ``text_geometry`` (:mod:`lisa_kit.geometry_answers`), to
    answer with boxes and points instead of ``[SEG]``.
    """
    from lisa_kit.prompts import MultiSeg

    root = cfg.get("root")
    sources = cfg.get("sources") or {k: {"datasets": list(v[0]), "rate": v[1]} for k, v in LISA_SOURCES.items()}
    groups = []
    for name, node in sources.items():
        readers = [open_dataset(ds, root, node.get("split"), **(node.get("options") or {}))
                   for ds in node.get("datasets", [name])]
        groups.append(SourceGroup(name, readers, float(node.get("rate", 1.0))))
    return HybridDataset(groups, template, int(cfg.get("samples_per_epoch", 1000)), seed=seed,
                         classes_per_sample=int(cfg.get("classes_per_sample", 3)),
                         explanatory=float(cfg.get("explanatory", 0.1)),
                         multi_seg=MultiSeg.from_config(cfg.get("multi_seg")), reject_token=reject_token,
                         explain_first=cfg.get("explain_first", False),
                         phrasing=cfg.get("phrasing", "lisa"), geometry=geometry)
