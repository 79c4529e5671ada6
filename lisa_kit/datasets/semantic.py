"""LISA's semantic-segmentation training sources (``--sem_seg_data``) in their real layouts.

Five readers, registered as ``ade20k``, ``cocostuff``, ``mapillary`` (one label PNG per
image) and ``paco_lvis``, ``pascal_part`` (COCO-style part annotations). They return what
LISA's ``utils/sem_seg_dataset.py`` (``init_*`` and ``SemSegDataset.__getitem__``, commit
3cb2d43; line numbers below refer to it) trains on, before any random choice:

* label-map sources: the label PNG is remapped exactly as LISA does (ADE20K ``0 -> 255``,
  ``k -> k-1``; COCO-Stuff classes whose name contains ``-`` ``-> 255``; Mapillary as stored),
  and every class id present (255 excluded) becomes one :class:`Target` whose ``text`` is the
  class name and whose mask is ``label == id`` as 0/1 (LISA trains these masks as binary,
  ignored pixels are background there too);
* part sources: one :class:`Target` per annotation of the image (LISA samples annotations,
  not classes), mask = ``annToMask``.

LISA then draws 3 targets per image (``num_classes_per_sample``) and a question template;
that is :mod:`lisa_kit.prompts`' job, not the readers'.
"""
from __future__ import annotations

import json
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from lisa_kit.datasets.base import IGNORE_LABEL, DatasetReader, Record, Target, register_dataset
from lisa_kit.errors import DataError

CLASSES_DIR = Path(__file__).parent / "classes"


@lru_cache(maxsize=None)
def ade20k_classes() -> tuple[str, ...]:
    """The 150 ADE20K class names LISA indexes remapped ids with (``utils/ade20k_classes.json``)."""
    return tuple(json.loads((CLASSES_DIR / "ade20k.json").read_text()))


@lru_cache(maxsize=None)
def cocostuff_classes() -> tuple[str, ...]:
    """The 182 COCO-Stuff names LISA indexes label values with.

    ``utils/cocostuff_classes.txt`` lists ``0: unlabeled`` … ``182: wood``; LISA skips the first
    line (``sem_seg_dataset.py:72-73``), so index ``k`` is the file's ``k+1``-th entry ("person"
    is 0), which is the numbering of COCO-Stuff's ``stuffthingmaps`` PNGs (255 = unlabeled).
    """
    lines = (CLASSES_DIR / "cocostuff.txt").read_text().splitlines(keepends=True)
    return tuple(line.strip().split(": ")[-1] for line in lines[1:])


def read_label_png(path: Path) -> np.ndarray:
    """The stored values of a label PNG as a 2-D integer array (palette PNGs give their indices,
    as ``np.array(Image.open(p))`` does in LISA); :class:`DataError` naming the file otherwise."""
    if not path.is_file():
        raise DataError("label PNG not found", path=path)
    try:
        with Image.open(path) as im:
            arr = np.array(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot decode label PNG: {e}", path=path) from e
    if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise DataError(f"a label PNG must hold one integer id per pixel; got {arr.dtype} {arr.shape}", path=path)
    return arr


class LabelMapReader(DatasetReader):
    """Base of the label-PNG sources: ``images[i]`` and ``labels[i]`` are paired paths,
    ``classes`` the names that remapped ids index.

    Subclasses fill ``images``/``labels``/``classes`` in ``_index`` and may override ``remap``.
    """

    splits: ClassVar[tuple[str, ...]] = ("train",)
    label_meaning: ClassVar[str] = "index into reader.classes; 255 = ignored (never a target)"

    def __init__(self, root: str | Path, split: str | None = None):
        super().__init__(root, split)
        self.images: list[Path] = []
        self.labels: list[Path] = []
        self.classes: tuple[str, ...] = ()
        self._index()
        # LISA finds a sampled name's id with ``classes.tolist().index(name)`` (:290): the FIRST
        # id of that name, which is what the mask compares against when names repeat.
        self._first_id: dict[str, int] = {}
        for k, name in enumerate(self.classes):
            self._first_id.setdefault(name, k)

    def _index(self) -> None:
        raise NotImplementedError

    def remap(self, raw: np.ndarray) -> np.ndarray:
        """Stored label values -> LISA's training label (int64 ``(H, W)``); identity here."""
        return raw.astype(np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def files(self, i: int) -> list[Path]:
        return [self.images[i], self.labels[i]]

    def label_map(self, i: int) -> np.ndarray:
        """LISA's remapped label of record ``i``: ``uint8 (H, W)``, class index or 255.

        A value that is neither 255 nor a class index (LISA: ``IndexError`` at :267) is a
        :class:`DataError` naming the file and the value.
        """
        path = self.labels[i]
        label = self.remap(read_label_png(path))
        bad = np.unique(label[(label != IGNORE_LABEL) & ((label < 0) | (label >= len(self.classes)))])
        if bad.size:
            raise DataError(f"label values {bad[:8].tolist()} are not class ids 0..{len(self.classes) - 1} "
                            f"(nor {IGNORE_LABEL}, ignored) of {self.name}", path=path)
        return label.astype(np.uint8)

    def __getitem__(self, i: int) -> Record:
        label = self.label_map(i)
        targets: list[Target] = []
        by_name: dict[str, Target] = {}
        # np.unique order (ascending id) is the order of LISA's candidate class list (:261-267).
        for label_id in np.unique(label).tolist():
            if label_id == IGNORE_LABEL:
                continue
            name = self.classes[label_id]
            if name in by_name:  # a repeated name is one question in LISA, and one mask (first id)
                by_name[name].meta["label_ids"].append(label_id)
                continue
            class_id = self._first_id[name]
            # LISA lower-cases the name only inside the question template (:283); the names of
            # all three sources are lower-case already.
            t = Target(text=name.lower(), mask=(label == class_id).astype(np.uint8), kind="class",
                       meta={"class_id": class_id, "label_ids": [label_id]})
            by_name[name] = t
            targets.append(t)
        return Record(source=self.name, key=self.images[i].stem, image_path=self.images[i], targets=targets,
                      meta={"label_path": self.labels[i], "label_map": label, "label_meaning": self.label_meaning})


def _require_dir(path: Path) -> Path:
    if not path.is_dir():
        raise DataError("dataset directory not found", path=path)
    return path


@register_dataset("ade20k")
class ADE20K(LabelMapReader):
    """ADEChallengeData2016 under ``root/ade20k``: ``images/training/<id>.jpg`` and
    ``annotations/training/<id>.png`` with raw ids ``0`` (other) … ``150``.

    Images are the ``.jpg`` files of ``images/training``, sorted (``sem_seg_dataset.py:43-60``);
    labels are the same names under ``annotations`` (:61-64; LISA substitutes ``images`` in the
    whole path string, which breaks roots containing "images", we do not).
    """

    name = "ade20k"

    def _index(self) -> None:
        self.classes = ade20k_classes()
        img_dir = _require_dir(self.root / "ade20k" / "images" / "training")
        ids = sorted(p.name[:-4] for p in img_dir.iterdir() if p.name.endswith(".jpg"))
        self.images = [img_dir / f"{s}.jpg" for s in ids]
        self.labels = [self.root / "ade20k" / "annotations" / "training" / f"{s}.png" for s in ids]

    def remap(self, raw: np.ndarray) -> np.ndarray:
        """``0`` (other) and ``255`` -> 255, ``k`` -> ``k - 1`` (:245-248).

        LISA does it in uint8: ``[l == 0] = 255; l -= 1; [l == 254] = 255``; on int64 the same
        steps give the same values (0 never wraps because it was replaced first).
        """
        label = raw.astype(np.int64)
        label[label == 0] = 255
        label -= 1
        label[label == 254] = 255
        return label


@register_dataset("cocostuff")
class COCOStuff(LabelMapReader):
    """COCO-Stuff 164k: labels ``root/cocostuff/train2017/<id>.png`` (``stuffthingmaps``
    values 0..181, 255 unlabeled), images ``root/coco/train2017/<id>.jpg`` (:77-82).

    LISA globs the labels unsorted (filesystem order); we sort by name. Its image path swaps
    every "cocostuff" in the path string for "coco"; we only swap the dataset directory.
    """

    name = "cocostuff"

    def _index(self) -> None:
        self.classes = cocostuff_classes()
        label_dir = _require_dir(self.root / "cocostuff" / "train2017")
        self.labels = sorted(label_dir.glob("*.png"))
        self.images = [self.root / "coco" / "train2017" / f"{p.stem}.jpg" for p in self.labels]
        # LISA's ``{name: index}`` dict (:168-171) keeps the last index of a repeated name; every
        # class whose name contains "-" (the "-other"/"-stuff"/"wall-brick"… stuff classes) is
        # set to 255 (:249-252), so it is never a question nor a target.
        class2index = {c: k for k, c in enumerate(self.classes)}
        self.ignored_ids = sorted(k for c, k in class2index.items() if "-" in c)

    def remap(self, raw: np.ndarray) -> np.ndarray:
        label = raw.astype(np.int64)
        label[np.isin(label, self.ignored_ids)] = IGNORE_LABEL
        return label


@register_dataset("mapillary")
class Mapillary(LabelMapReader):
    """Mapillary Vistas v2.0 under ``root/mapillary``: ``config_v2.0.json`` (class names =
    ``labels[k].readable``, lower-cased), labels ``training/v2.0/labels/<id>.png`` (palette
    PNG, index = class id), images ``training/images/<id>.jpg`` (:20-36).

    No remapping: LISA keeps every id, so "unlabeled" (the config's last class) and the classes
    with ``evaluate: false`` are trained as ordinary classes; only a stored 255 is ignored.
    ``class_meta`` holds each class's config entry (``name``, ``evaluate`` …) for callers that
    want to filter.
    """

    name = "mapillary"

    def _index(self) -> None:
        base = self.root / "mapillary"
        config = base / "config_v2.0.json"
        if not config.is_file():
            raise DataError("Mapillary config not found", path=config)
        try:
            entries = json.loads(config.read_text(encoding="utf-8"))["labels"]
            self.classes = tuple(e["readable"].lower() for e in entries)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"cannot read class names: {e!r}", path=config, field="labels[*].readable") from e
        self.class_meta: list[dict[str, Any]] = [{k: v for k, v in e.items() if k != "color"} for e in entries]
        label_dir = _require_dir(base / "training" / "v2.0" / "labels")
        self.labels = sorted(label_dir.glob("*.png"))
        self.images = [base / "training" / "images" / f"{p.stem}.jpg" for p in self.labels]


class PartReader(DatasetReader):
    """Base of the COCO-style part sources: one record per entry of ``images`` (JSON order, as
    ``COCO.getImgIds``), one target per annotation of that image (JSON order, as
    ``getAnnIds(imgIds=id)``: crowd annotations included), mask = ``annToMask``.

    A part class ``object:part`` gives ``text = "object part"``; LISA asks either that or
    ``"the part of the object"`` with probability 1/2 (:228-233), so both are in
    ``target.meta["phrasings"]`` (with ``object`` and ``part``). LISA's label map for these
    sources is all 255 (only its size is used, :317), so records have no ``label_map``.
    """

    splits: ClassVar[tuple[str, ...]] = ("train",)
    ann_relpath: ClassVar[tuple[str, ...]] = ()

    def __init__(self, root: str | Path, split: str | None = None):
        super().__init__(root, split)
        self.ann_file = self.root.joinpath(*self.ann_relpath)
        if not self.ann_file.is_file():
            raise DataError("annotation file not found", path=self.ann_file)
        try:
            data = json.loads(self.ann_file.read_text(encoding="utf-8"))
            # The indices pycocotools' COCO.createIndex builds (a repeated id: the last entry wins).
            self._imgs = {im["id"]: im for im in data.get("images", [])}
            anns = {a["id"]: a for a in data.get("annotations", [])}
            self._img_anns: dict[Any, list[dict]] = {}
            for a in data.get("annotations", []):
                self._img_anns.setdefault(a["image_id"], []).append(anns[a["id"]])
            cats = data.get("categories", [])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"not a COCO annotation file: {e!r}", path=self.ann_file) from e
        self.class_map: dict[Any, str | tuple[str, str]] = {}
        for k, cat in enumerate(cats):
            try:
                self.class_map[cat["id"]] = self.class_name(cat["name"])
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise DataError(f"bad category name: {e!r}", path=self.ann_file, field=f"categories[{k}].name") from e
        self.img_ids = list(self._imgs)

    @staticmethod
    def class_name(name: str) -> str | tuple[str, str]:
        """A category name -> a whole-object name or ``(object, part)``."""
        raise NotImplementedError

    def image_path(self, file_name: str) -> Path:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.img_ids)

    def _info(self, i: int) -> dict:
        return self._imgs[self.img_ids[i]]

    def files(self, i: int) -> list[Path]:
        return [self.image_path(self._info(i)["file_name"]), self.ann_file]

    def __getitem__(self, i: int) -> Record:
        info = self._info(i)
        targets = [self._target(info, ann) for ann in self._img_anns.get(info["id"], [])]
        # LISA redraws another image when this one has no annotation (:217-218); we keep the record.
        return Record(source=self.name, key=str(info["id"]), image_path=self.image_path(info["file_name"]),
                      targets=targets, meta={"image_id": info["id"], "ann_file": self.ann_file})

    def _target(self, info: dict, ann: dict) -> Target:
        where = f"annotations[id={ann.get('id')}]"
        if ann.get("category_id") not in self.class_map:
            raise DataError("annotation of an unknown category", path=self.ann_file, field=f"{where}.category_id")
        cls = self.class_map[ann["category_id"]]
        meta: dict[str, Any] = {"ann_id": ann.get("id"), "category_id": ann["category_id"]}
        if isinstance(cls, tuple):
            obj, part = cls
            text = f"{obj} {part}"
            meta.update(object=obj, part=part, phrasings=[text.lower(), f"the {part} of the {obj}".lower()])
        else:
            text = cls
        return Target(text=text.lower(), mask=self._ann_to_mask(info, ann, where), kind="class", meta=meta)

    def _ann_to_mask(self, info: dict, ann: dict, where: str) -> np.ndarray:
        """``COCO.annToMask``: polygons, uncompressed or compressed RLE -> ``uint8 (h, w)`` 0/1
        at the size the image entry declares. LISA drops the whole draw when this fails
        (:308-313); we raise :class:`DataError` naming the annotation."""
        try:
            from pycocotools import mask as mask_utils
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise DataError("reading part annotations needs pycocotools (pip install pycocotools)",
                            path=self.ann_file) from e
        try:
            h, w = int(info["height"]), int(info["width"])
            segm = ann["segmentation"]
            if isinstance(segm, list):  # polygons of one object: rasterise each, then union
                rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
            elif isinstance(segm["counts"], list):  # uncompressed RLE
                rle = mask_utils.frPyObjects(segm, h, w)
            else:
                rle = segm
            with warnings.catch_warnings():  # pycocotools' numpy-2 ``copy=`` deprecation noise
                warnings.simplefilter("ignore", DeprecationWarning)
                return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)
        except Exception as e:  # pycocotools raises bare Exception / TypeError for bad input
            raise DataError(f"cannot rasterise segmentation: {e!r}", path=self.ann_file,
                            field=f"{where}.segmentation") from e


@register_dataset("paco_lvis")
class PacoLvis(PartReader):
    """PACO-LVIS: ``root/vlpart/paco/annotations/paco_lvis_v1_train.json``, images
    ``root/coco/<file_name>`` (file names like ``train2017/000000000139.jpg``; :89-93, :204-205).

    Names (:96-106): ``object:part`` -> ``(object, part)``, a plain name is a whole object; in
    both, an LVIS disambiguation suffix from ``_(`` on is cut (``car_(automobile)`` -> ``car``),
    underscores stay (``trash_can``).
    """

    name = "paco_lvis"
    ann_relpath = ("vlpart", "paco", "annotations", "paco_lvis_v1_train.json")

    @staticmethod
    def class_name(name: str) -> str | tuple[str, str]:
        pieces = name.strip().split(":")
        if len(pieces) == 1:
            return pieces[0].split("_(")[0]
        if len(pieces) != 2:  # LISA: AssertionError (:101)
            raise ValueError(f"{name!r} has more than one ':'")
        obj, part = pieces
        return obj.split("_(")[0], part.split("_(")[0]

    def image_path(self, file_name: str) -> Path:
        return self.root / "coco" / file_name


@register_dataset("pascal_part")
class PascalPart(PartReader):
    """PASCAL-Part (VLPart's conversion): ``root/vlpart/pascal_part/train.json``, images
    ``root/vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/<file_name>`` (:113-115, :199-203).

    Every category must be ``object:part`` (LISA unpacks exactly two pieces, :119); names are
    used as stored (only stripped).
    """

    name = "pascal_part"
    ann_relpath = ("vlpart", "pascal_part", "train.json")

    @staticmethod
    def class_name(name: str) -> str | tuple[str, str]:
        pieces = name.strip().split(":")
        if len(pieces) != 2:  # LISA: ValueError unpacking (:119)
            raise ValueError(f"{name!r} is not 'object:part'")
        return pieces[0], pieces[1]

    def image_path(self, file_name: str) -> Path:
        return self.root / "vlpart" / "pascal_part" / "VOCdevkit" / "VOC2010" / "JPEGImages" / file_name
