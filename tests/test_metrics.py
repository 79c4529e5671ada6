"""lisa_kit.metrics: hand-computed cases, a literal transcription of LISA's metric code,
distributed merging, and bit-exact parity with the eval fixture (eval_seed0)."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lisa_kit.errors import InputError
from lisa_kit.metrics import DuplicateKeyError, SegMetrics, all_gather_metrics, mask_iou_stats
from lisa_kit.testing import eval_fixture_dir

F32 = np.float32


def f32hex(x) -> str:
    return np.float32(x).tobytes()[::-1].hex()


def stats_lists(s):
    return s.intersection.tolist(), s.union.tolist(), s.iou.tolist()


# ---------------------------------------------------------------- one mask, by hand

def test_all_correct():
    gt = np.array([[1, 1], [0, 0]], np.uint8)
    i, u, iou = stats_lists(mask_iou_stats(gt.astype(bool), gt))
    assert i == [2, 2] and u == [2, 2]
    assert iou == [F32(2) / F32(2 + F32(1e-5))] * 2 and iou[1] < 1.0


def test_all_wrong():
    gt = np.array([[1, 1], [0, 0]], np.uint8)
    i, u, iou = stats_lists(mask_iou_stats(1 - gt, gt))
    # pred 0 on the two gt-1 pixels, pred 1 on the two gt-0 pixels
    assert i == [0, 0] and u == [4, 4] and iou == [0, 0]


def test_empty_gt_and_empty_pred_scores_one():
    gt = np.zeros((2, 3), np.uint8)
    i, u, iou = stats_lists(mask_iou_stats(np.zeros((2, 3), bool), gt))
    assert i == [6, 0] and u == [6, 0]
    assert iou == [F32(6) / F32(6 + F32(1e-5)), 1.0]  # train_ds.py:560 no-object rule


def test_ignore_pixels_leave_pred_and_gt():
    gt = np.array([[1, 255], [0, 255]], np.uint8)
    pred = np.array([[1, 1], [1, 0]], np.uint8)
    # only column 0 counts: (0,0) pred 1 gt 1, (1,0) pred 1 gt 0
    i, u, iou = stats_lists(mask_iou_stats(pred, gt))
    assert i == [0, 1] and u == [1, 2]
    assert iou == [0.0, F32(1) / F32(2 + F32(1e-5))]
    # all-ignore gt: nothing counted, IoU 1 for both classes (rs_val_4 in the fixture)
    i, u, iou = stats_lists(mask_iou_stats(np.ones((2, 2)), np.full((2, 2), 255)))
    assert i == [0, 0] and u == [0, 0] and iou == [1.0, 1.0]


def test_value_two_is_in_neither_gt_class_but_pred_counts():
    gt = np.array([[2, 2], [1, 0]], np.uint8)
    pred = np.array([[1, 0], [1, 1]], np.uint8)
    # pred1 = 3 px, pred0 = 1 px (over a 2); gt1 = 1, gt0 = 1; I1 = 1 at (1,0), I0 = 0
    i, u, _ = stats_lists(mask_iou_stats(pred, gt))
    assert i == [0, 1] and u == [1 + 1 - 0, 3 + 1 - 1]


def test_input_kinds_logits_torch_and_shapes():
    gt = np.array([[1, 0, 255], [1, 2, 0]], np.uint8)
    logits = np.array([[0.5, -1.0, 3.0], [0.0, 2.0, -0.0]], np.float32)  # 0.0 is not > 0
    ref = stats_lists(mask_iou_stats(logits > 0, gt))
    assert stats_lists(mask_iou_stats(logits, gt)) == ref
    assert stats_lists(mask_iou_stats(torch.from_numpy(logits), torch.from_numpy(gt).float())) == ref
    assert stats_lists(mask_iou_stats(torch.from_numpy(logits).bfloat16(), torch.from_numpy(gt))) == ref
    with pytest.raises(InputError):
        mask_iou_stats(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(InputError):
        mask_iou_stats(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)))


# ---------------------------------------------------------------- samples and final numbers

def test_several_masks_per_sample_average_and_giou_epsilon():
    gt = np.array([[1, 1], [0, 0]], np.uint8)
    m = SegMetrics()
    stats = m.add_sample(np.stack([gt, 1 - gt]), np.stack([gt, gt]))  # right, then all wrong
    r = m.result()
    iou_a = F32(2) / (F32(2) + F32(1e-5))
    acc = (iou_a + F32(0)) / F32(2)
    assert r["per_sample"][0]["acc_iou"][1] == acc
    assert r["per_sample"][0]["intersection"] == [2, 2] and r["per_sample"][0]["union"] == [6, 6]
    assert r["giou"] == (acc * F32(2)) / F32(2 + 1e-5)
    assert r["ciou"] == F32(2) / (F32(6) + F32(1e-10))
    assert r["giou_plain"] == 0.5 and r["ciou_float64"] == 2 / 6
    assert [q["iou"] for q in r["per_query"]] == [stats[0].iou[1], 0.0]
    assert [q["key"] for q in r["per_query"]] == [(0, 0), (0, 1)]
    assert r["n_queries"] == 2 and r["n_samples"] == 1 and r["intersection"] == [2, 2]


def test_giou_has_the_1e5_in_its_denominator():
    m = SegMetrics()
    m.add_sample(np.ones((1, 1, 1)), np.ones((1, 1, 1), np.uint8))  # I = U = 1
    r = m.result()
    iou = F32(1) / F32(1 + F32(1e-5))
    assert r["per_query"][0]["iou"] == iou < 1.0
    assert r["giou"] == iou / F32(1 + 1e-5) < iou          # utils/utils.py:94
    assert r["giou"] == pytest.approx(1 / (1 + 1e-5) ** 2, rel=1e-7)
    assert r["giou_plain"] == 1.0 and r["ciou"] == F32(1) / (F32(1) + F32(1e-10))


def test_empty_metrics():
    r = SegMetrics().result()
    assert r["giou"] == 0.0 and r["ciou"] == 0.0 and r["giou_plain"] is None and r["n_queries"] == 0
    with pytest.raises(InputError):
        SegMetrics().add_sample(np.zeros((0, 2, 2)), np.zeros((0, 2, 2)))


# ---------------------------------------------------------------- LISA's code, transcribed

def _lisa_intersection_and_union(output, target, K, ignore_index=255):
    """utils/utils.py:116-128 (on float copies, fixture README quirk 2)."""
    output, target = output.view(-1), target.view(-1)
    output[target == ignore_index] = ignore_index
    intersection = output[output == target]
    area_intersection = torch.histc(intersection, bins=K, min=0, max=K - 1)
    area_output = torch.histc(output, bins=K, min=0, max=K - 1)
    area_target = torch.histc(target, bins=K, min=0, max=K - 1)
    return area_intersection, area_output + area_target - area_intersection, area_target


class _LisaMeter:
    """AverageMeter.update / all_reduce (utils/utils.py:67-94), world size 1."""

    def __init__(self):
        self.sum, self.count = 0, 0

    def update(self, val, n=1):
        self.sum += val * n
        self.count += n

    def all_reduce(self):
        total = torch.tensor(self.sum.tolist() + [self.count], dtype=torch.float32)
        self.sum, self.count = total[:-1].numpy(), total[-1].item()
        self.avg = self.sum / (self.count + 1e-5)


def _lisa_validate(samples):
    """train_ds.py:547-573 on (logits (n,H,W), gt (n,H,W)) pairs in loader order."""
    im, um, am = _LisaMeter(), _LisaMeter(), _LisaMeter()
    for logits, gt in samples:
        masks_list, output_list = torch.from_numpy(gt).int(), (torch.from_numpy(logits) > 0).int()
        intersection, union, acc_iou = 0.0, 0.0, 0.0
        for mask_i, output_i in zip(masks_list, output_list):
            i, u, _ = _lisa_intersection_and_union(output_i.contiguous().clone().float(),
                                                   mask_i.contiguous().float(), 2, ignore_index=255)
            intersection += i
            union += u
            acc_iou += i / (u + 1e-5)
            acc_iou[u == 0] += 1.0
        intersection, union = intersection.cpu().numpy(), union.cpu().numpy()
        acc_iou = acc_iou.cpu().numpy() / masks_list.shape[0]
        im.update(intersection), um.update(union), am.update(acc_iou, n=masks_list.shape[0])
    acc_iou_sum = am.sum.copy()
    for meter in (im, um, am):
        meter.all_reduce()
    return am.avg[1], (im.sum / (um.sum + 1e-10))[1], acc_iou_sum


def _random_samples(seed=0, n_samples=24):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_samples):
        n, h, w = int(rng.integers(1, 13)), int(rng.integers(3, 40)), int(rng.integers(3, 40))
        logits = rng.normal(size=(n, h, w)).astype(np.float32)
        gt = rng.choice(np.array([0, 1, 2, 255], np.uint8), p=[0.5, 0.3, 0.05, 0.15], size=(n, h, w))
        if rng.random() < 0.2:
            gt[0] = 255  # whole mask ignored: IoU 1
        out.append((logits, gt))
    return out


def test_matches_transcribed_lisa_bit_for_bit():
    samples = _random_samples()
    m = SegMetrics()
    for idx, (logits, gt) in enumerate(samples):
        m.add_sample(logits, gt, sample_key=idx)
    giou, ciou, acc_iou_sum = _lisa_validate(samples)
    r = m.result()
    assert f32hex(r["giou"]) == f32hex(giou) and f32hex(r["ciou"]) == f32hex(ciou)
    assert [f32hex(v) for v in r["acc_iou_sum"]] == [f32hex(v) for v in acc_iou_sum]
    assert abs(r["giou"] - r["giou_plain"]) < 1e-5
    # one sample alone: its acc_iou * n is the whole meter sum, and (acc / n) * n != acc in
    # float32 for about one n-mask sample in ten (n not a power of two)
    for idx, sample in enumerate(samples):
        one = SegMetrics()
        one.add_sample(*sample, sample_key=idx)
        giou, ciou, acc_iou_sum = _lisa_validate([sample])
        assert [f32hex(v) for v in one.result()["acc_iou_sum"]] == [f32hex(v) for v in acc_iou_sum]
        assert f32hex(one.result()["giou"]) == f32hex(giou) and f32hex(one.result()["ciou"]) == f32hex(ciou)


# ---------------------------------------------------------------- keys, merging, distributed

def _split_like_distributed_sampler(n, world):
    """DistributedSampler(shuffle=False, drop_last=False): pad by repeating, then stride."""
    idx = list(range(n))
    idx += idx[: -(-n // world) * world - n]
    return [idx[r::world] for r in range(world)]


def _rank_metrics(samples, indices, keyed_queries=False):
    m = SegMetrics()
    for i in indices:
        logits, gt = samples[i]
        keys = [f"s{i}/q{k}" for k in range(len(gt))] if keyed_queries else None
        m.add_sample(logits, gt, keys, sample_key=i)
    return m


def test_merge_is_independent_of_ranks_and_order():
    samples = _random_samples(seed=1, n_samples=11)
    ref = _rank_metrics(samples, range(len(samples))).result()
    assert ref["n_duplicates_dropped"] == 0
    for world in (2, 3, 4):
        parts = [_rank_metrics(samples, ix) for ix in _split_like_distributed_sampler(len(samples), world)]
        for perm in itertools.permutations(range(world)):
            merged = SegMetrics()
            for r in perm:
                merged.merge(SegMetrics.from_state(parts[r].state()))
            got = merged.result()
            assert got.pop("n_duplicates_dropped") == -(-len(samples) // world) * world - len(samples)
            assert got == {k: v for k, v in ref.items() if k != "n_duplicates_dropped"}
    # insertion order does not matter either: samples are summed in key order
    rev = _rank_metrics(samples, reversed(range(len(samples)))).result()
    assert f32hex(rev["giou"]) == f32hex(ref["giou"]) and rev == ref


def test_state_survives_json_with_tuple_keys():
    samples = _random_samples(seed=2, n_samples=4)
    m = SegMetrics()
    for i, (logits, gt) in enumerate(samples):
        m.add_sample(logits, gt, [("img", i, k) for k in range(len(gt))], sample_key=("img", i))
    back = SegMetrics.from_state(json.loads(json.dumps(m.state())))
    assert back.result() == m.result()
    assert back.result()["per_query"][0]["key"] == ("img", 0, 0)


def test_duplicates():
    gt = np.array([[[1, 0], [0, 0]]], np.uint8)
    m = SegMetrics()
    m.add_sample(gt, gt, sample_key=7)
    m.add_sample(gt, gt, sample_key=7)  # identical repeat (padded sampler): dropped
    assert len(m) == 1 and m.result()["n_duplicates_dropped"] == 1
    with pytest.raises(DuplicateKeyError, match="different"):
        m.add_sample(1 - gt, gt, sample_key=7)
    with pytest.raises(DuplicateKeyError, match="belongs to samples"):
        m.add_sample(gt, gt, [(7, 0)], sample_key=8)
    with pytest.raises(DuplicateKeyError, match="within one sample"):
        m.add_sample(np.concatenate([gt, gt]), np.concatenate([gt, gt]), ["a", "a"])
    with pytest.raises(InputError, match="2 query keys"):
        m.add_sample(np.concatenate([gt, gt]), np.concatenate([gt, gt]), "ab")
    strict = SegMetrics(on_duplicate="raise")
    strict.add_sample(gt, gt, ["q"])
    with pytest.raises(DuplicateKeyError, match="added twice"):
        strict.add_sample(gt, gt, ["q"])
    other = SegMetrics(on_duplicate="raise")
    other.add_sample(gt, gt, ["q"])
    before = strict.state()
    with pytest.raises(DuplicateKeyError):
        strict.merge(other)
    assert strict.state() == before  # a failed merge changes nothing
    # automatic keys (0, 1, ...) would collide across ranks: merging them is refused
    a, b = SegMetrics(), SegMetrics()
    a.add_sample(gt, gt)
    b.add_sample(1 - gt, gt)
    with pytest.raises(InputError, match="sample_key"):
        a.merge(b)


def test_all_gather_metrics(monkeypatch):
    samples = _random_samples(seed=3, n_samples=5)
    single = _rank_metrics(samples, range(5), keyed_queries=True)
    assert all_gather_metrics(single) is single  # not initialised: no-op
    parts = [_rank_metrics(samples, ix, keyed_queries=True) for ix in _split_like_distributed_sampler(5, 3)]
    import torch.distributed as dist

    def fake_all_gather_object(out, obj):
        assert obj == parts[0].state()
        out[:] = [p.state() for p in parts]

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 3)
    monkeypatch.setattr(dist, "all_gather_object", fake_all_gather_object)
    got = all_gather_metrics(parts[0]).result()
    assert got.pop("n_duplicates_dropped") == 1
    ref = single.result()
    ref.pop("n_duplicates_dropped")
    assert got == ref


# ---------------------------------------------------------------- LISA fixture parity

def _fixture():
    d = eval_fixture_dir()
    if d is None:
        pytest.skip("eval fixture (shared/fixtures/lisa_reference/eval_seed0) not available")
    return d, json.loads((d / "eval_reference.json").read_text())


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path))


@pytest.mark.parity
def test_fixture_parity_bit_exact():
    d, ref = _fixture()
    from safetensors import safe_open

    tensors = safe_open(str(d / "eval_tensors.safetensors"), "np")
    for name, ev in ref["evals"].items():
        tag = name.replace("|", "_")
        by_index, by_path, from_logits = SegMetrics(), SegMetrics(), SegMetrics()
        for s in ev["samples"]:
            gts = np.stack([_png(d / p) for p in s["gt_mask_png"]])
            preds = np.stack([_png(d / p) for p in s["pred_mask_png"]])
            keys = [Path(p).stem + f"#{k}" for k, p in enumerate(s["pred_mask_png"])]
            stats = by_index.add_sample(preds, gts, keys, sample_key=s["index"])
            by_path.add_sample(preds, gts, sample_key=s["image_path"])
            for st, want in zip(stats, s["per_mask"]):
                assert st.intersection.tolist() == want["intersection"], (name, s["index"])
                assert st.union.tolist() == want["union"], (name, s["index"])
                assert [f32hex(v) for v in st.iou] == want["iou_f32_hex"], (name, s["index"])
            # the logits path: thresholding > 0 reproduces the recorded pred PNGs
            logits = tensors.get_tensor(f"{tag}.{s['index']}.pred_logits")
            assert np.array_equal((logits > 0).astype(np.uint8), preds), (name, s["index"])
            from_logits.add_sample(torch.from_numpy(logits), gts, keys, sample_key=s["index"])
        r = by_index.result()
        assert f32hex(r["giou"]) == ev["giou_f32_hex"] and f32hex(r["ciou"]) == ev["ciou_f32_hex"], name
        assert r["giou"] == ev["giou"] and r["ciou"] == ev["ciou"]
        meters = ev["meters_before_all_reduce"]
        assert r["intersection"] == meters["intersection_sum"] and r["union"] == meters["union_sum"]
        assert [f32hex(v) for v in r["acc_iou_sum"]] == meters["acc_iou_sum_hex"]
        assert r["n_queries"] == ev["n_masks"] == meters["acc_iou_count"] and r["n_samples"] == ev["n_samples"]
        assert [f32hex(v) for p in r["per_sample"] for v in p["acc_iou"]] == \
            [h for s in ev["samples"] for h in s["acc_iou_hex"]]
        assert [q["iou"] for q in r["per_query"]] == [m["iou_f32"][1] for s in ev["samples"] for m in s["per_mask"]]
        assert r["giou_plain"] == pytest.approx(ev["giou_plain_mean_float64"], rel=1e-13, abs=0)
        assert r["ciou_float64"] == pytest.approx(ev["ciou_float64"], rel=1e-13, abs=0)
        assert f32hex(by_path.result()["giou"]) == ev["giou_if_sorted_by_path_f32_hex"], name
        assert from_logits.result() == r, name
