"""Referring-segmentation readers: refCOCO, refCOCO+, refCOCOg, refCLEF and gRefCOCO.

Layout (LISA README, ``dataset/refer_seg/``)::

    refer_seg/<dataset>/refs(<split_by>).p     refcoco, refcoco+, refcocog, refclef
    refer_seg/grefcoco/grefs(<split_by>).p     or grefs(<split_by>).json
    refer_seg/<dataset>/instances.json         COCO-style images/annotations/categories
    refer_seg/images/mscoco/images/train2014/  images of refcoco, refcoco+, refcocog, grefcoco
    refer_seg/images/saiapr_tc-12/             images of refclef

``root`` is the ``dataset/`` directory; the ``refer_seg/`` directory itself is accepted
too (LISA's validation needs ``--dataset_dir <root>/refer_seg``, ``utils/dataset.py:297``,
while training reads ``<root>/refer_seg``, ``utils/refer_seg_dataset.py:51``).

One :class:`Record` per image of the split, with one :class:`Target` per sentence of
every ref of that image, in the order of LISA's ``ValDataset`` (``utils/dataset.py:
368-376``): refs in the order of the refs file, sentences in stored order. ``Target.text``
is the sentence's ``sent`` field stripped of surrounding blanks; LISA's evaluation also
lower-cases it (``:372``) and its training lower-cases it inside the question template,
which is the prompt builder's business, so the case is kept here.

Masks follow LISA exactly (``utils/dataset.py:430-445``, ``utils/refer_seg_dataset.py:237-250``):
the annotation's polygons (or RLEs) are decoded one map each and **summed**, then cast to
``uint8``. Where two polygons of one annotation overlap the mask is therefore ``2``: neither
a target nor ignored for LISA's metric, a BCE/dice target of 2.0 in training. Pass
``overlap="union"`` to clip such pixels to ``1`` instead. LISA decodes RLE only as a list of
compressed dicts (refclef); a bare COCO RLE dict (crowd annotations) or uncompressed
``counts`` make it crash, here they decode. Refs files are pickles; they hold only dicts,
lists, strings and numbers, so they are read by :class:`DataOnlyUnpickler`, which refuses
every class and callable: a tampered file raises :class:`DataError` and runs nothing.

gRefCOCO follows LISA's training reader (``ReferSegDataset`` with ``G_REFER``; LISA's
``ValDataset`` cannot open it): a ref's ``ann_id`` may be a list, whose masks are OR-ed
(crowd annotations included, as there), and ``[-1]`` means no target: an all-zero mask and
``meta["no_target"] = True``.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from lisa_kit.datasets.base import DatasetReader, Record, Target, register_dataset
from lisa_kit.errors import DataError

_COCO_IMAGES = "images/mscoco/images/train2014"
# dataset -> (LISA's default split_by, image directory under refer_seg/); splitBy defaults
# from refer_seg_dataset.py:57-60, image directories from REFER.__init__ / dataset.py:310-315.
# G_REFER would look in images/train2014, but LISA overrides it with the mscoco path.
LAYOUT = {
    "refcoco": ("unc", _COCO_IMAGES),
    "refcoco+": ("unc", _COCO_IMAGES),
    "refcocog": ("umd", _COCO_IMAGES),
    "refclef": ("unc", "images/saiapr_tc-12"),
    "grefcoco": ("unc", _COCO_IMAGES),
}
# Split names REFER.getRefIds accepts (utils/refer.py); anything else makes it sys.exit.
REFER_SPLITS = ("train", "val", "test", "testA", "testB", "testC", "testAB", "testBC", "testAC")


class DataOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain data only (dict, list, tuple, str, bytes, numbers, bool, None).

    Those are built by pickle opcodes alone; anything else (a class, a function such as
    ``os.system`` named by ``__reduce__``) needs :meth:`find_class`, which is refused here,
    so a hostile pickle raises before any of its code could run.
    """

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: refs files hold plain data only")


def load_data_pickle(path: Path) -> Any:
    """The plain data in the pickle ``path`` (:class:`DataOnlyUnpickler`; :class:`DataError` if
    refused or unreadable). Decoding options are pickle's defaults, as LISA's ``pickle.load``."""
    try:
        with open(path, "rb") as f:
            return DataOnlyUnpickler(f).load()
    except Exception as e:  # UnpicklingError, EOFError, ValueError ... from arbitrary bytes
        raise DataError(f"cannot read refs: {type(e).__name__}: {e}", path=path) from None


def _in_split(ref_split: str, split: str) -> bool:
    """REFER.getRefIds' split filter: ``testA`` also takes ``testAB`` refs,
    ``test`` takes every ``test*`` ref, the others match exactly."""
    if split in ("testA", "testB", "testC"):
        return split[-1] in ref_split
    if split == "test":
        return "test" in ref_split
    return ref_split == split


def _as_list(x) -> list:
    return x if isinstance(x, list) else [x]


def annotation_mask(segmentation, height: int, width: int, *, path=None, field: str | None = None) -> np.ndarray:
    """LISA's mask of one annotation: ``uint8 (height, width)``.

    ``segmentation``: COCO polygons (list of flat ``[x, y, ...]`` lists), an RLE dict
    (compressed ``str``/``bytes`` counts or uncompressed ``list`` counts) or a list of RLE
    dicts (refclef). Every polygon/RLE is decoded to its own 0/1 map and the maps are
    summed (so overlaps count twice, as in LISA), then cast to ``uint8``. An empty
    segmentation gives zeros. Problems raise :class:`DataError` with ``path``/``field``.
    """
    try:
        from pycocotools import mask as coco_mask
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise DataError("reading refCOCO-style masks needs pycocotools (pip install pycocotools)",
                        path=path, field=field) from e

    if isinstance(segmentation, (list, tuple)) and len(segmentation) == 0:
        return np.zeros((height, width), np.uint8)
    try:
        if isinstance(segmentation, dict):
            rles: Any = _rle(segmentation, coco_mask)
        elif isinstance(segmentation[0], dict):
            rles = [_rle(s, coco_mask) for s in segmentation]
        else:
            rles = coco_mask.frPyObjects([list(map(float, p)) for p in segmentation], height, width)
        m = coco_mask.decode(rles)
    except DataError:
        raise
    except Exception as e:  # pycocotools raises bare Exception/TypeError on bad input
        raise DataError(f"cannot decode segmentation: {e}", path=path, field=field) from e
    if m.ndim == 3:
        # The sum, not a union: exactly LISA's np.sum(m, axis=2) (utils/dataset.py:442-445).
        m = m.sum(axis=2)
    if m.shape != (height, width):
        raise DataError(f"segmentation is {m.shape[0]}x{m.shape[1]} but the image is {height}x{width}",
                        path=path, field=field)
    return m.astype(np.uint8)


def _rle(d: dict, coco_mask) -> dict:
    """An RLE dict pycocotools can decode, without mutating ``d`` (LISA encodes in place)."""
    if "counts" not in d or "size" not in d:
        raise DataError("an RLE segmentation needs 'counts' and 'size'")
    counts = d["counts"]
    if isinstance(counts, list):  # uncompressed (standard COCO crowd annotations)
        return coco_mask.frPyObjects({"size": list(d["size"]), "counts": counts}, *d["size"])
    return {"size": list(d["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}


@register_dataset(*LAYOUT)
class ReferReader(DatasetReader):
    """Reader of one referring dataset (``dataset``, one of :data:`LAYOUT`).

    Options: ``split_by`` (refs file variant, default LISA's: ``umd`` for refcocog, else
    ``unc``); ``image_order`` ``"lisa"`` (default: ``list(set(image_ids))`` as
    ``REFER.getImgIds`` returns them, refer.py:208-209, i.e. CPython's set order) or
    ``"sorted"`` (by image id); ``overlap`` ``"sum"`` (default, LISA) or ``"union"``.

    Splits: ``train``, ``val``, ``test``, ``testA/B/C``, ``testAB/BC/AC`` as REFER filters
    them (gRefCOCO: exact match); a split without refs raises :class:`DataError` listing
    the splits the refs file has (refcoco/refcoco+ unc: train/val/testA/testB; refcocog
    umd: train/val/test; refclef unc: train/val/testA/testB/testC).
    """

    name = "refer"
    takes_name = True
    splits = ()  # validated against the refs file instead (depends on dataset and split_by)

    def __init__(self, root, split: str | None = None, *, dataset: str = "refcoco", split_by: str | None = None,
                 image_order: str = "lisa", overlap: str = "sum"):
        super().__init__(root, split)
        if dataset not in LAYOUT:
            raise DataError(f"unknown referring dataset {dataset!r}; one of: {', '.join(LAYOUT)}")
        if image_order not in ("lisa", "sorted"):
            raise DataError(f"image_order must be 'lisa' or 'sorted', not {image_order!r}")
        if overlap not in ("sum", "union"):
            raise DataError(f"overlap must be 'sum' or 'union', not {overlap!r}")
        self.name = dataset
        self.split_by = split_by or LAYOUT[dataset][0]
        self.overlap = overlap
        self.refer_root = self._find_refer_root()
        self.image_dir = self.refer_root / LAYOUT[dataset][1]
        self.instances_file = self.refer_root / dataset / "instances.json"

        refs = self._load_refs()
        images, self._anns = self._load_instances()
        split_refs = self._select_split(refs)

        # Group refs by image in file order (ValDataset's img2refs).
        by_image: dict[int, list[dict]] = {}
        for ref in split_refs:
            by_image.setdefault(ref["image_id"], []).append(ref)
        if image_order == "lisa":
            # getImgIds: list(set([...])) over the refs in file order (refer.py:208-209).
            ids = list(set([ref["image_id"] for ref in split_refs]))
        else:
            ids = sorted(by_image)
        for image_id in ids:
            if image_id not in images:
                ref = by_image[image_id][0]
                raise DataError(f"ref {ref.get('ref_id')} points at image id {image_id}, which "
                                f"{self.instances_file.name} does not list", path=self.refs_file,
                                field=f"ref_id={ref.get('ref_id')}.image_id")
        self._images = [images[i] for i in ids]
        self._refs = [by_image[i] for i in ids]

    # -- loading ---------------------------------------------------------------------------

    def _find_refer_root(self) -> Path:
        for cand in (self.root / "refer_seg", self.root):
            if (cand / self.name).is_dir():
                return cand
        return self.root / "refer_seg"  # the missing refs file below names the expected path

    def _load_refs(self) -> list[dict]:
        """The refs list (pickle; gRefCOCO: ``.p`` if present, else ``.json``, as G_REFER.__init__)."""
        stem = "grefs" if self.name == "grefcoco" else "refs"
        pkl = self.refer_root / self.name / f"{stem}({self.split_by}).p"
        path = pkl
        if stem == "grefs" and not pkl.is_file():
            path = pkl.with_suffix(".json")
        self.refs_file = path
        if not path.is_file():
            raise DataError("refs file not found", path=pkl if path.suffix == ".p" else f"{pkl} (or .json)")
        if path.suffix == ".json":
            try:
                refs = json.loads(path.read_bytes())
            except Exception as e:
                raise DataError(f"cannot read refs: {e}", path=path) from e
        else:
            refs = load_data_pickle(path)
        if not isinstance(refs, list):
            raise DataError(f"refs must be a list of refs, got {type(refs).__name__}", path=path)
        for k, ref in enumerate(refs):
            for key in ("ref_id", "ann_id", "image_id", "split", "sentences"):
                if not isinstance(ref, dict) or key not in ref:
                    raise DataError(f"ref {k} has no {key!r}", path=path, field=f"[{k}].{key}")
        return refs

    def _load_instances(self) -> tuple[dict[int, dict], dict[int, dict]]:
        """``({image_id: image}, {ann_id: ann})`` of ``instances.json``."""
        path = self.instances_file
        if not path.is_file():
            raise DataError("instances file not found", path=path)
        try:
            inst = json.loads(path.read_bytes())
        except Exception as e:
            raise DataError(f"cannot read instances: {e}", path=path) from e
        for key in ("images", "annotations"):
            if not isinstance(inst, dict) or key not in inst:
                raise DataError(f"instances has no {key!r}", path=path, field=key)
        try:
            images = {im["id"]: im for im in inst["images"]}
            anns = {a["id"]: a for a in inst["annotations"]}
        except (KeyError, TypeError) as e:
            raise DataError(f"an image or annotation has no id: {e}", path=path) from e
        return images, anns

    def _select_split(self, refs: list[dict]) -> list[dict]:
        """The refs of ``self.split`` in file order; every ann id they use must exist."""
        if self.name == "grefcoco":
            selected = [r for r in refs if r["split"] == self.split]  # G_REFER.getRefIds: exact
        elif self.split not in REFER_SPLITS:
            raise DataError(f"{self.name} has no split {self.split!r}; REFER splits: {', '.join(REFER_SPLITS)}")
        else:
            selected = [r for r in refs if _in_split(r["split"], self.split)]
        if not selected:
            present = sorted({str(r["split"]) for r in refs})
            raise DataError(f"{self.name} ({self.split_by}) has no refs of split {self.split!r}; "
                            f"splits in the file: {', '.join(present) or '(none)'}", path=self.refs_file)
        for ref in selected:
            ann_ids = _as_list(ref["ann_id"])
            for a in ann_ids:
                if a == -1 and self.name == "grefcoco":
                    if ann_ids != [-1]:  # grefcoco.py asserts a no-target ref has only -1
                        raise DataError(f"ref {ref['ref_id']} mixes the no-target id -1 with annotations",
                                        path=self.refs_file, field=f"ref_id={ref['ref_id']}.ann_id")
                elif a not in self._anns:
                    raise DataError(f"ref {ref['ref_id']} points at annotation id {a}, which "
                                    f"{self.instances_file.name} does not contain", path=self.refs_file,
                                    field=f"ref_id={ref['ref_id']}.ann_id")
        return selected

    # -- DatasetReader ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._images)

    def image_path(self, i: int) -> Path:
        return self.image_dir / self._images[i]["file_name"]

    def files(self, i: int) -> list[Path]:
        return [self.image_path(i), self.refs_file, self.instances_file]

    def __getitem__(self, i: int) -> Record:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        image = self._images[i]
        h, w = int(image["height"]), int(image["width"])
        targets = []
        for ref in self._refs[i]:
            mask, meta = self._ref_mask(ref, h, w)
            for sent in ref["sentences"]:
                text = sent.get("sent")
                if not isinstance(text, str):
                    raise DataError(f"ref {ref['ref_id']} has a sentence without 'sent'", path=self.refs_file,
                                    field=f"ref_id={ref['ref_id']}.sentences.sent")
                # One mask array per ref, copied per sentence so a consumer may edit it.
                targets.append(Target(text.strip(), mask.copy(), "phrase",
                                      {**meta, "sent_id": sent.get("sent_id")}))
        return Record(source=self.name, key=Path(image["file_name"]).stem, image_path=self.image_path(i),
                      targets=targets,
                      meta={"image_id": image["id"], "split": self.split, "split_by": self.split_by,
                            "height": h, "width": w})

    def _ref_mask(self, ref: dict, h: int, w: int) -> tuple[np.ndarray, dict]:
        """The mask of a ref and its target meta. gRefCOCO refs may list several
        annotations (bitwise OR of their masks, the list-``ann_id`` branch of
        ReferSegDataset.__getitem__) or ``[-1]`` (no target: all zeros)."""
        meta = {"ref_id": ref["ref_id"], "ann_id": ref["ann_id"], "category_id": ref.get("category_id")}
        ann_ids = _as_list(ref["ann_id"])
        if self.name == "grefcoco":
            meta["no_target"] = ann_ids == [-1]
        mask = np.zeros((h, w), np.uint8)
        if ann_ids == [-1]:
            return mask, meta
        for a in ann_ids:
            m = annotation_mask(self._anns[a].get("segmentation", []), h, w, path=self.instances_file,
                                field=f"annotations[id={a}].segmentation")
            mask |= m  # OR, as LISA: a summed 2 OR'ed with 1 gives 3 (only for gRefCOCO)
        if self.overlap == "union":
            mask = (mask > 0).astype(np.uint8)
        return mask, meta
