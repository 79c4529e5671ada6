"""What every dataset reader returns, and the registry of readers.

A reader opens one dataset in its real on-disk layout (``root`` is the ``dataset/``
directory of LISA's README) and yields :class:`Record` objects: one image with its
targets (referring expressions, questions or class names, each with a ground-truth
mask) or its VQA rounds. Turning a record into conversations (question and answer
phrasings, sampling) is :mod:`lisa_kit.prompts`' job, not the reader's, so training,
evaluation and ``lisa-kit data check`` all see the same masks.

Masks are ``uint8 (H, W)`` at the image's size: ``0`` background, ``1`` target and
``255`` ignored (not scored, not trained). A target whose mask has no ``1`` pixel is
kept and marked (:attr:`Target.empty`), never dropped silently.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from lisa_kit.errors import UnknownComponentError
from lisa_kit.images import load_image

IGNORE_LABEL = 255


@dataclass
class Target:
    """One thing to segment in a record's image.

    ``text``: a referring expression, a ReasonSeg instruction or a class name (as
    stored, stripped of surrounding blanks); ``mask``: ``uint8 (H, W)`` 0/1/255 or
    ``None`` when the reader could not build one; ``kind``: ``"class"`` (semantic
    datasets), ``"phrase"`` (referring expressions, short ReasonSeg queries) or
    ``"sentence"`` (long ReasonSeg queries, ``is_sentence``).
    """

    text: str
    mask: np.ndarray | None
    kind: str = "phrase"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """No target pixel (an absent object, an all-ignored mask, or no mask at all)."""
        return self.mask is None or not bool((self.mask == 1).any())


@dataclass
class Record:
    """One image of a dataset.

    ``targets`` share the image's size. VQA records have no targets but ``rounds``:
    ``(question, answer)`` pairs as stored (the first question may contain ``<image>``,
    which :mod:`lisa_kit.prompts` replaces by an image slot). ``explanation`` is
    ReasonSeg's explanatory answer when one exists. ``key`` is a stable id.
    """

    source: str
    key: str
    image_path: Path
    targets: list[Target] = field(default_factory=list)
    rounds: list[tuple[str, str]] = field(default_factory=list)
    explanation: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def image(self) -> np.ndarray:
        """RGB ``uint8 (H, W, 3)``; :class:`~lisa_kit.errors.ImageError` names the file."""
        return load_image(self.image_path)

    def masks(self) -> np.ndarray:
        """``uint8 (M, H, W)`` of every target (``M`` may be 0)."""
        ms = [t.mask for t in self.targets if t.mask is not None]
        if not ms:
            return np.zeros((0, 0, 0), np.uint8)
        return np.stack(ms)


@dataclass
class CheckReport:
    """What :meth:`DatasetReader.check` found: counts and problems (path, message)."""

    dataset: str
    split: str
    root: Path
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class DatasetReader:
    """Base of the readers: index the layout in ``__init__`` (cheap: file lists and
    annotation indices), decode masks lazily in ``__getitem__``.

    Subclasses set ``name`` and ``splits`` and implement ``__len__``,
    ``__getitem__`` and ``files(i)`` (the files record ``i`` needs, for ``check``).
    """

    name: ClassVar[str] = ""
    splits: ClassVar[tuple[str, ...]] = ()
    default_split: ClassVar[str] = "train"

    def __init__(self, root: str | Path, split: str | None = None):
        from lisa_kit.errors import DataError

        self.root = Path(root)
        self.split = split or self.default_split
        if self.splits and self.split not in self.splits:
            raise DataError(f"{self.name} has no split {self.split!r}; splits: {', '.join(self.splits)}")

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> Record:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Record]:
        for i in range(len(self)):
            yield self[i]

    def files(self, i: int) -> list[Path]:
        """The files record ``i`` reads (image first)."""
        raise NotImplementedError

    def check(self, decode: bool = True) -> CheckReport:
        """Every record's files exist and (``decode``) its image and masks can be read."""
        from lisa_kit.errors import DataError

        rep = CheckReport(self.name, self.split, self.root)
        rep.counts["records"] = len(self)
        targets = empty = 0
        for i in range(len(self)):
            missing = [p for p in self.files(i) if not Path(p).is_file()]
            for p in missing:
                rep.problems.append((str(p), "missing"))
            if missing or not decode:
                continue
            try:
                rec = self[i]
                rec.image()
            except DataError as e:
                rep.problems.append((e.path or str(self.files(i)[0]), str(e)))
                continue
            targets += len(rec.targets)
            empty += sum(t.empty for t in rec.targets)
        if decode:
            rep.counts["targets"] = targets
            rep.counts["empty_targets"] = empty
        return rep


DATASETS: dict[str, Callable[..., DatasetReader]] = {}


def register_dataset(*names: str):
    """Class decorator: make a reader available to :func:`open_dataset` under ``names``."""

    def deco(cls):
        for n in names:
            DATASETS[n] = cls
        return cls

    return deco


def dataset_names() -> list[str]:
    _import_readers()
    return sorted(DATASETS)


def open_dataset(name: str, root: str | Path, split: str | None = None, **options) -> DatasetReader:
    """The reader of dataset ``name`` (see :func:`dataset_names`) on ``root``."""
    _import_readers()
    if name not in DATASETS:
        raise UnknownComponentError("dataset", name, DATASETS)
    cls = DATASETS[name]
    return cls(root, split, dataset=name, **options) if getattr(cls, "takes_name", False) else cls(root, split, **options)


def _import_readers() -> None:
    import importlib

    for mod in ("reason_seg", "refer", "semantic", "vqa", "synthetic", "synthetic_describe"):
        try:
            importlib.import_module(f"lisa_kit.datasets.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"lisa_kit.datasets.{mod}":
                raise
