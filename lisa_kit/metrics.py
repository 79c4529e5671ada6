"""Segmentation metrics (gIoU, cIoU) exactly as LISA's ``train_ds.py validate()``.

File:line references are to LISA (dvlab-research/LISA @ 3cb2d43), as cited in
``shared/fixtures/lisa_reference/README.md`` ("Evaluation and dataset-reader fixture").

Per mask (:func:`mask_iou_stats`; ``train_ds.py:552-560``, ``utils/utils.py:116-128``)::

    pred = logits > 0;  pred[gt == 255] = 255
    I_c = #(pred == gt == c),  U_c = #(pred == c) + #(gt == c) - I_c     for c in {0, 1}
    iou_c = I_c / (U_c + 1e-5),  +1.0 where U_c == 0                    (float32)

Pixels whose gt is neither 0 nor 1 (255 = ignore, 2 = overlapping refCOCO polygons) are in
neither gt class; the prediction there still counts, except under 255.

Per sample = one image with n masks (``train_ds.py:561-565``)::

    I = sum_k I_k,  U = sum_k U_k,  acc_iou = (sum_k iou_k) / n

Meters and final numbers (``train_ds.py:566-573``, ``AverageMeter`` ``utils/utils.py:67-94``)::

    intersection += I;  union += U;  acc_iou_sum += acc_iou * n;  count += n
    ciou = intersection[1] / (union[1] + 1e-10)
    giou = acc_iou_sum[1] / (count + 1e-5)

``AverageMeter.update`` does ``self.sum += val * n`` on numpy float32 arrays (``sum`` starts
as the int 0, so it becomes float32 at the first update) and ``all_reduce`` round-trips the
sums through a float32 tensor, so everything is float32 and *sequential*: the sums depend on
the order of samples in the last bit. :class:`SegMetrics` therefore stores every query's
float32 (I, U) under a key and recomputes the sums in one canonical order (samples sorted by
key), so the result does not depend on how many ranks computed it or in which order partial
results were merged. Keyed by dataset index, that order is the single-process loader order
and the numbers equal LISA's world-size-1 ``validate()`` bit for bit. (LISA's own multi-GPU
result differs: ``DistributedSampler`` pads with repeated samples that it counts twice,
README quirk 13, and the all_reduce sums rank-partial float32 sums. Here repeats are
detected by key and dropped.)
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lisa_kit.errors import InputError

__all__ = ["IGNORE_INDEX", "MaskStats", "SegMetrics", "DuplicateKeyError", "mask_iou_stats",
           "all_gather_metrics"]

IGNORE_INDEX = 255
_F32 = np.float32
_EPS_IOU = _F32(1e-5)     # train_ds.py:559  intersection_i / (union_i + 1e-5), in float32
_EPS_CIOU = _F32(1e-10)   # train_ds.py:571  union_meter.sum + 1e-10, float32 array + Python float
_STATE_FORMAT = "lisa_kit.metrics.SegMetrics/1"


class DuplicateKeyError(InputError):
    """A query or sample key was added twice (``on_duplicate="raise"``), or twice with
    different statistics, or one query key under two different samples."""


@dataclass(frozen=True)
class MaskStats:
    """One mask's counts: ``intersection``, ``union`` and ``iou``, each float32 ``(2,)``
    indexed by class (0 = background, 1 = target), as LISA computes them."""

    intersection: np.ndarray
    union: np.ndarray
    iou: np.ndarray


def _to_numpy(x, *, binary: bool) -> np.ndarray:
    """bool ``pred > 0`` (``binary``) or int64 labels, as numpy, from numpy or torch."""
    if hasattr(x, "detach"):  # torch.Tensor; threshold on its device, in its dtype (LISA.py: pred_masks > 0)
        x = x.detach()
        x = (x > 0) if binary else x.long()  # .long() truncates floats like LISA's .int()
        return x.cpu().numpy()
    x = np.asarray(x)
    return (x > 0) if binary else x.astype(np.int64, copy=False)


def _iou(intersection: np.ndarray, union: np.ndarray) -> np.ndarray:
    """float32 ``I / (U + 1e-5)``, plus 1.0 where ``U == 0`` (``train_ds.py:559-560``: the
    no-object rule; I is then 0, so adding 1.0 to the running sum or to the term is the same)."""
    iou = intersection / (union + _EPS_IOU)
    iou[union == 0] += _F32(1.0)
    return iou


def mask_iou_stats(pred, gt, *, ignore_index: int = IGNORE_INDEX) -> MaskStats:
    """Intersection/union/IoU of one mask, LISA's ``intersectionAndUnionGPU(K=2)``.

    ``pred``: ``(H, W)`` logits, bool or 0/1 (numpy or torch); thresholded ``> 0`` like
    ``(pred_masks[0] > 0).int()`` (``train_ds.py:551``). ``gt``: ``(H, W)`` integer labels
    (0/1, ``ignore_index`` = 255, anything else counted in neither class); float gts are
    truncated like ``.int()``. Returns float32 ``(2,)`` arrays; counts are exact below 2**24
    pixels per mask (float32, as in LISA).
    """
    if ignore_index in (0, 1):
        raise InputError(f"ignore_index must not be a class label (0 or 1), got {ignore_index}")
    p = _to_numpy(pred, binary=True)
    g = _to_numpy(gt, binary=False)
    if p.ndim != 2 or p.shape != g.shape:
        raise InputError(f"pred and gt must both be (H, W) of the same size, got {p.shape} and {g.shape}")
    # utils/utils.py:119  output[target == ignore_index] = ignore_index: drop those pixels
    # from the prediction; histc over [0, 1] (:124-126) then ignores gt values 2 and 255.
    keep = g != ignore_index
    p1 = p & keep
    p0 = ~p & keep
    g0, g1 = g == 0, g == 1
    inter = np.array([np.count_nonzero(p0 & g0), np.count_nonzero(p1 & g1)], dtype=np.int64)
    area_pred = np.array([np.count_nonzero(p0), np.count_nonzero(p1)], dtype=np.int64)
    area_gt = np.array([np.count_nonzero(g0), np.count_nonzero(g1)], dtype=np.int64)
    # LISA's counts are float32 (histc); ints cast once are the same for < 2**24.
    i32 = inter.astype(_F32)
    u32 = (area_pred + area_gt - inter).astype(_F32)
    return MaskStats(i32, u32, _iou(i32, u32))


# ---------------------------------------------------------------- keys

def _norm_key(key) -> Hashable:
    """Keys are compared after this: numpy scalars -> Python, lists (e.g. from JSON) -> tuples."""
    if isinstance(key, np.generic):
        return key.item()
    if isinstance(key, (list, tuple)):
        return tuple(_norm_key(k) for k in key)
    try:
        hash(key)
    except TypeError:
        raise InputError(f"metric keys must be hashable, got {type(key).__name__}: {key!r}") from None
    return key


def _sort_token(key):
    """A total order over keys of mixed types: numbers < strings < bytes < tuples < others;
    numbers and strings in their natural order (dataset indices sort in loader order)."""
    if key is None:
        return (-1,)
    if isinstance(key, (int, float)) and not (isinstance(key, float) and math.isnan(key)):
        return (0, key)
    if isinstance(key, str):
        return (1, key)
    if isinstance(key, bytes):
        return (2, key)
    if isinstance(key, tuple):
        return (3, tuple(_sort_token(k) for k in key))
    return (9, type(key).__qualname__, repr(key))


@dataclass
class _Sample:
    queries: tuple           # n query keys, in mask order
    intersection: np.ndarray  # float32 (n, 2)
    union: np.ndarray         # float32 (n, 2)

    def same_as(self, other: "_Sample") -> bool:
        return (self.queries == other.queries
                and np.array_equal(self.intersection, other.intersection)
                and np.array_equal(self.union, other.union))


# ---------------------------------------------------------------- accumulator

class SegMetrics:
    """Accumulates per-query stats under keys; :meth:`result` gives LISA's gIoU/cIoU.

    A *sample* is one image with its n masks (LISA's batch of one in ``validate()``): its
    masks' I/U/IoU are summed first, then the per-sample sums enter the meters (so gIoU is a
    mean over masks, up to float32 rounding and the ``1e-5``). Keys:

    * ``sample_key`` orders samples for the final sums; use the dataset index (the index a
      ``DistributedSampler`` yields) to reproduce single-process LISA bit for bit.
    * ``keys`` (per query) detect queries counted twice; default ``(sample_key, k)``.

    Without any key, samples get ``0, 1, 2, ...`` in insertion order (fine in one process;
    :meth:`merge` refuses such metrics, their keys would collide across ranks).

    ``on_duplicate``: ``"drop"`` (default) drops a sample added again with identical stats
    (a padded ``DistributedSampler`` repeat) and counts it in ``n_duplicates_dropped``;
    ``"raise"`` raises :class:`DuplicateKeyError` for any repeat. A key reused with different
    stats always raises: which copy is right cannot be decided independently of merge order.
    """

    def __init__(self, *, ignore_index: int = IGNORE_INDEX, on_duplicate: str = "drop"):
        if on_duplicate not in ("drop", "raise"):
            raise InputError(f"on_duplicate must be 'drop' or 'raise', got {on_duplicate!r}")
        self.ignore_index = int(ignore_index)
        self.on_duplicate = on_duplicate
        self.n_duplicates_dropped = 0
        self._samples: dict[Hashable, _Sample] = {}
        self._owner: dict[Hashable, Hashable] = {}  # query key -> sample key
        self._next_auto = 0
        self._auto_keys = False

    def __len__(self) -> int:
        """Number of queries (masks)."""
        return len(self._owner)

    @property
    def n_samples(self) -> int:
        return len(self._samples)

    # -- adding

    def add_sample(self, preds, gts, keys: Sequence | None = None, *, sample_key=None) -> list[MaskStats]:
        """Add one image's masks. ``preds``: ``(n, H, W)`` logits/bool/0-1 (``> 0`` is the
        prediction); ``gts``: ``(n, H, W)`` labels 0/1/255 (2 counted in neither class); a
        single ``(H, W)`` pair means n = 1. ``keys``: n query keys; ``sample_key``: see the
        class doc (default ``keys[0]``, else the next insertion number). Returns the stats."""
        if getattr(preds, "ndim", None) == 2:
            preds, gts = preds[None], gts[None]
        if len(preds) != len(gts):
            raise InputError(f"{len(preds)} predicted masks but {len(gts)} ground-truth masks")
        stats = [mask_iou_stats(p, g, ignore_index=self.ignore_index) for p, g in zip(preds, gts)]
        self.add_stats(stats, keys, sample_key=sample_key)
        return stats

    def add_stats(self, stats: Sequence[MaskStats], keys: Sequence | None = None, *, sample_key=None) -> None:
        """Add one image's precomputed :class:`MaskStats` (one per mask, in mask order)."""
        n = len(stats)
        if n == 0:
            # LISA divides by masks_list.shape[0] (train_ds.py:564); a sample needs a mask.
            raise InputError("a sample needs at least one mask")
        if keys is not None:
            if isinstance(keys, (str, bytes)) or not isinstance(keys, Sequence) or len(keys) != n:
                raise InputError(f"keys must be a list of {n} query keys (one per mask), got {keys!r}; "
                                 "use sample_key= for one key per image")
            keys = tuple(_norm_key(k) for k in keys)
            if len(set(keys)) != n:
                raise DuplicateKeyError(f"query keys repeat within one sample: {keys!r}")
        if sample_key is None:
            if keys is not None:
                sample_key = keys[0]
            else:
                sample_key = self._next_auto
                self._auto_keys = True
        sample_key = _norm_key(sample_key)
        if isinstance(sample_key, int) and sample_key >= self._next_auto:
            self._next_auto = sample_key + 1
        if keys is None:
            keys = tuple((sample_key, k) for k in range(n))
        inter = np.stack([np.asarray(s.intersection, _F32) for s in stats])
        union = np.stack([np.asarray(s.union, _F32) for s in stats])
        if inter.shape != (n, 2) or union.shape != (n, 2):
            raise InputError(f"MaskStats must hold (2,) arrays, got {inter.shape[1:]} / {union.shape[1:]}")
        self._insert(sample_key, _Sample(keys, inter, union))

    def _is_repeat(self, sample_key, sample: _Sample) -> bool:
        """True if ``sample`` is already here (a repeat to drop); raises on a conflict."""
        old = self._samples.get(sample_key)
        if old is not None:
            if not old.same_as(sample):
                raise DuplicateKeyError(f"sample key {sample_key!r} added twice with different queries or stats")
            if self.on_duplicate == "raise":
                raise DuplicateKeyError(f"sample key {sample_key!r} added twice")
            return True
        for q in sample.queries:
            if q in self._owner:
                raise DuplicateKeyError(f"query key {q!r} belongs to samples {self._owner[q]!r} "
                                        f"and {sample_key!r}")
        return False

    def _insert(self, sample_key, sample: _Sample) -> None:
        if self._is_repeat(sample_key, sample):
            self.n_duplicates_dropped += 1
            return
        self._samples[sample_key] = sample
        for q in sample.queries:
            self._owner[q] = sample_key

    # -- distributed

    def state(self) -> dict:
        """Plain-Python (picklable; JSON-able for JSON keys) state: float32 values as floats
        (exact), tuple keys as tuples (JSON turns them into lists; :meth:`from_state` undoes it)."""
        return {
            "format": _STATE_FORMAT,
            "ignore_index": self.ignore_index,
            "on_duplicate": self.on_duplicate,
            "auto_keys": self._auto_keys,
            "n_duplicates_dropped": self.n_duplicates_dropped,
            "samples": [{"key": k, "queries": list(s.queries), "intersection": s.intersection.tolist(),
                         "union": s.union.tolist()} for k, s in self._samples.items()],
        }

    @classmethod
    def from_state(cls, state: dict) -> "SegMetrics":
        if state.get("format") != _STATE_FORMAT:
            raise InputError(f"not a SegMetrics state (format {state.get('format')!r}, expected {_STATE_FORMAT!r})")
        m = cls(ignore_index=state["ignore_index"], on_duplicate=state["on_duplicate"])
        m.n_duplicates_dropped = int(state["n_duplicates_dropped"])
        for s in state["samples"]:
            key = _norm_key(s["key"])
            m._insert(key, _Sample(tuple(_norm_key(q) for q in s["queries"]),
                                   np.asarray(s["intersection"], _F32).reshape(-1, 2),
                                   np.asarray(s["union"], _F32).reshape(-1, 2)))
            if isinstance(key, int) and key >= m._next_auto:
                m._next_auto = key + 1
        m._auto_keys = bool(state["auto_keys"])
        return m

    def merge(self, other: "SegMetrics") -> "SegMetrics":
        """Add ``other``'s samples to ``self`` (duplicates handled per ``on_duplicate``);
        returns ``self``. The result is independent of merge order."""
        if other.ignore_index != self.ignore_index:
            raise InputError(f"cannot merge metrics with ignore_index {self.ignore_index} and {other.ignore_index}")
        if (self._auto_keys and other._samples) or (other._auto_keys and self._samples):
            raise InputError("cannot merge metrics whose samples were added without keys (their automatic "
                             "keys 0, 1, ... collide across ranks); pass sample_key=<dataset index>")
        # Check everything first so that a conflict leaves self unchanged.
        new = [(key, s) for key, s in other._samples.items() if not self._is_repeat(key, s)]
        self.n_duplicates_dropped += len(other._samples) - len(new)
        for key, s in new:
            self._insert(key, s)
        self.n_duplicates_dropped += other.n_duplicates_dropped
        self._auto_keys = self._auto_keys or other._auto_keys
        self._next_auto = max(self._next_auto, other._next_auto)
        return self

    # -- result

    def result(self) -> dict[str, Any]:
        """LISA's numbers over all samples, in sorted-key order.

        ``giou``, ``ciou``: float32 values (as Python floats) of ``validate()``'s return;
        ``giou_plain``: float64 mean over queries of I/U (1.0 where U == 0; None if empty);
        ``ciou_float64``: float64 ΣI/ΣU; ``intersection``, ``union``, ``acc_iou_sum``: the
        meters' float32 sums ``[class0, class1]``; ``count`` = ``n_queries``;
        ``per_sample``: key, n, float32 I/U/acc_iou sums; ``per_query``: key, sample_key,
        class-1 ``iou`` (float32 value), ``intersection``, ``union`` (class 1, ints).
        """
        i_sum = np.zeros(2, _F32)
        u_sum = np.zeros(2, _F32)
        a_sum = np.zeros(2, _F32)
        count = 0
        plain, per_sample, per_query = [], [], []
        for key in sorted(self._samples, key=_sort_token):
            s = self._samples[key]
            n = len(s.queries)
            iou = _iou(s.intersection, s.union)
            # train_ds.py:557-559: running float32 sums over the masks, one at a time
            # (np.sum would reorder them pairwise).
            inter, union, acc = s.intersection[0].copy(), s.union[0].copy(), iou[0].copy()
            for k in range(1, n):
                inter, union, acc = inter + s.intersection[k], union + s.union[k], acc + iou[k]
            acc = acc / _F32(n)                        # :564, float32 array / int
            i_sum, u_sum = i_sum + inter, u_sum + union  # AverageMeter.update, n = 1
            a_sum = a_sum + acc * _F32(n)              # AverageMeter.update(acc_iou, n): sum += val * n
            count += n
            per_sample.append({"key": key, "n": n, "intersection": inter.tolist(), "union": union.tolist(),
                               "acc_iou": acc.tolist()})
            for q, i_k, u_k, iou_k in zip(s.queries, s.intersection, s.union, iou):
                plain.append(float(i_k[1]) / float(u_k[1]) if u_k[1] else 1.0)
                per_query.append({"key": q, "sample_key": key, "iou": float(iou_k[1]),
                                  "intersection": int(i_k[1]), "union": int(u_k[1])})
        # AverageMeter.all_reduce (utils/utils.py:73-94): count goes through a float32 tensor
        # and .item(); avg = sum / (count + 1e-5) is float32 array / Python float -> float32.
        total_i = math.fsum(q["intersection"] for q in per_query)
        total_u = math.fsum(q["union"] for q in per_query)
        count_f = float(_F32(count))
        giou = a_sum[1] / _F32(count_f + 1e-5)
        ciou = i_sum[1] / (u_sum[1] + _EPS_CIOU)       # train_ds.py:571-572
        return {
            "giou": float(giou),
            "ciou": float(ciou),
            "giou_plain": math.fsum(plain) / len(plain) if plain else None,
            "ciou_float64": total_i / total_u if total_u else 0.0,
            "n_queries": count,
            "n_samples": len(per_sample),
            "n_duplicates_dropped": self.n_duplicates_dropped,
            "intersection": i_sum.tolist(),
            "union": u_sum.tolist(),
            "acc_iou_sum": a_sum.tolist(),
            "per_sample": per_sample,
            "per_query": per_query,
        }


def all_gather_metrics(metrics: SegMetrics) -> SegMetrics:
    """Every rank's :class:`SegMetrics` merged (on every rank) via
    ``torch.distributed.all_gather_object``; ``metrics`` itself when torch.distributed is
    not initialised or the world size is 1. Collective: call it on every rank. (With NCCL,
    torch requires ``torch.cuda.set_device`` to have been called on each rank.)"""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return metrics
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, metrics.state())
    merged = SegMetrics(ignore_index=metrics.ignore_index, on_duplicate=metrics.on_duplicate)
    for state in states:
        merged.merge(SegMetrics.from_state(state))
    return merged
