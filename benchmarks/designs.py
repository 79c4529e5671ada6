"""Compare reasoning-segmentation designs on one harness: train each tiny recipe the same
number of steps on the synthetic set, then measure quality, latency per stage and memory.

    python benchmarks/designs.py --out bench_out/designs                 # the designs below, 300 steps
    python benchmarks/designs.py --steps 1000 --recipes lisa-tiny-synthetic lisa-tiny-sam3 --out DIR

Each design is a tiny recipe (random initial weights) and all of them get the same data and
schedule (the overrides in :data:`COMMON`: the synthetic set, ``--steps`` optimizer steps,
batch 4, one validation at the end). Per design it runs the real commands a user runs:

1. ``lisa-kit train RECIPE --out OUT/runs/NAME`` (its ``train.jsonl`` gives the loss curve and
   the time per step),
2. ``lisa-kit export --checkpoint OUT/runs/NAME --format lisa_kit --out OUT/models/NAME``,
3. one ``lisa-kit bench`` matrix over every exported model (variants with
   ``weights.format=lisa_kit``): quality in generate mode on ``--limit`` held-out synthetic
   images and per-stage latency (:mod:`lisa_kit.bench`), peak memory,

and writes ``OUT/designs.md`` (one row per design) and ``OUT/designs.json``. It is a
benchmark, not a test: minutes per design on CPU. ``benchmarks/designs_gpu.yaml`` is the
full-size matrix (random weights) for ``lisa-kit bench`` on a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

#: design -> tiny recipe. The three designs of issue 14 plus LISA and the other decoders.
DESIGNS = {
    "LISA ([SEG] -> SAM)": "lisa-tiny-synthetic",
    "LISA + SAM 2": "lisa-tiny-sam2",
    "LISA + SAM-HQ": "lisa-tiny-sam-hq",
    "LISA + EdgeTAM": "lisa-tiny-edgetam",
    "[SEG] -> SAM 3 phrase": "lisa-tiny-sam3",
    "native VLM (Qwen2.5-VL) + [SEG]": "lisa-tiny-qwen2.5vl",
    "text box/points -> SAM (Seg-Zero style)": "lisa-tiny-textbox",
}

#: The same data and schedule for every design (recipe overrides).
COMMON = [
    "data.samples_per_epoch=4000",
    "data.sources={synthetic: {datasets: [synthetic], rate: 1, split: train, options: {size: 4000}}}",
    "train.batch_size=4", "train.grad_accumulation=1", "train.precision=fp32", "train.workers=0",
    "train.keep_last=1", "train.activation_checkpointing=false",
    # No pretrained mask decoder exists at this size: every design trains its image encoder
    # (a text-box design still trains none of the decoder: its loss is the answer's tokens).
    "model.train_image_encoder=true",
    "train.val={dataset: synthetic, split: val, options: {size: 50}}",
]


def _run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` with its output in ``log``; the wall time in seconds. A failure stops
    the benchmark with the log's tail (a design that does not train is a finding)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode
    if rc != 0:
        tail = log.read_text()[-2000:]
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}); {log}:\n{tail}")
    return time.perf_counter() - t0


def _losses(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "train.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    k = max(1, len(rows) // 10)  # mean of the first / last tenth: one step is noisy
    first = sum(r["loss"] for r in rows[:k]) / k
    last = sum(r["loss"] for r in rows[-k:]) / k
    return {"steps": len(rows), "loss_first": first, "loss_last": last}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output directory")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per design (default 300)")
    ap.add_argument("--lr", type=float, default=5e-3, help="peak learning rate for every design (default 5e-3)")
    ap.add_argument("--recipes", nargs="*", help="tiny recipes to compare (default: every design in DESIGNS)")
    ap.add_argument("--limit", type=int, default=40, help="held-out synthetic images for quality (default 40)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per latency point (default 5)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reuse", action="store_true",
                    help="keep designs already trained and exported in --out (rerun only the bench and the rest)")
    args = ap.parse_args(argv)
    designs = {r: r for r in args.recipes} if args.recipes else dict(DESIGNS)
    out = args.out
    for sub in ("runs", "models", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    lisa_kit = [sys.executable, "-m", "lisa_kit"]
    rows = {}
    for design, recipe in designs.items():
        run, model = out / "runs" / recipe, out / "models" / recipe
        overrides = COMMON + [f"train.steps={args.steps}", f"train.lr={args.lr}", f"train.warmup_steps={max(1, args.steps // 30)}",
                              f"train.save_every={args.steps}", f"train.val_every={args.steps}"]
        timing = out / "runs" / f"{recipe}.seconds"
        if not (args.reuse and model.is_dir() and timing.is_file()):
            print(f"[{design}] training {recipe} for {args.steps} steps", flush=True)
            t_train = _run(lisa_kit + ["train", recipe, *overrides, "--out", str(run), "--device", args.device,
                                       "--no-progress"], out / "logs" / f"{recipe}.train.log")
            _run(lisa_kit + ["export", "--checkpoint", str(run), "--format", "lisa_kit", "--out", str(model),
                             "--overwrite"], out / "logs" / f"{recipe}.export.log")
            timing.write_text(f"{t_train}\n")
        rows[design] = {"recipe": recipe, "train_seconds": float(timing.read_text()), **_losses(run)}
    matrix = {
        "name": "designs",
        "variants": {r["recipe"]: {"recipe": r["recipe"], "description": d,
                                   "overrides": ["weights.format=lisa_kit", f"weights.path={(out / 'models' / r['recipe']).resolve()}"]}
                     for d, r in rows.items()},
        "scenarios": [{"name": "questions", "questions_per_image": [1, 4], "batch_size": 1, "answer_tokens": 8,
                       "image_size": 64}],
        "repeats": args.repeats, "warmup": 1, "device": args.device, "dtype": "fp32",
        "quality": {"dataset": "synthetic:val", "root": None, "limit": args.limit, "mode": "generate"},
    }
    (out / "matrix.yaml").write_text(yaml.safe_dump(matrix, sort_keys=False))
    print("benchmarking the trained models", flush=True)
    _run(lisa_kit + ["bench", str(out / "matrix.yaml"), "--out", str(out / "bench"), "--no-plots"],
         out / "logs" / "bench.log")
    bench = json.loads((out / "bench" / "results.json").read_text())
    table = ["| design | recipe | parameters | train s/step | loss first → last | gIoU | cIoU | "
             "answer tokens | 1 question (ms) | 4 questions (ms) | mask decode, 1 q (ms) | memory (MB) |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for design, r in rows.items():
        v = bench["variants"][r["recipe"]]
        q = (v.get("quality") or {})
        pts = {p["questions_per_image"]: p for p in bench["points"] if p["variant"] == r["recipe"]}
        ms = lambda qn, stage="total": (f"{1000 * pts[qn]['stages'][stage]['median']:.1f}"  # noqa: E731
                                        if qn in pts and stage in pts[qn]["stages"] else "-")
        mem = max((p["memory"].get("peak_bytes", p["memory"].get("rss_after_bytes", 0)) for p in pts.values()), default=0)
        r.update(parameters=v["params"]["total"], quality=q, latency_ms={n: p["stages"]["total"]["median"] * 1e3
                                                                           for n, p in pts.items()}, memory_bytes=mem)
        table.append(f"| {design} | `{r['recipe']}` | {r['parameters']:,} | {r['train_seconds'] / r['steps']:.2f} | "
                     f"{r['loss_first']:.2f} → {r['loss_last']:.2f} | {q.get('giou', float('nan')):.4f} | "
                     f"{q.get('ciou', float('nan')):.4f} | {pts[1]['answer_tokens'] if 1 in pts else '-'} | {ms(1)} | {ms(4)} | {ms(1, 'mask_decode')} | {mem / 2**20:.0f} |")
    env = bench["environment"]
    head = (f"Designs compared, {args.steps} steps each (batch 4, lr {args.lr}, synthetic train split), quality in "
            f"generate mode on {args.limit} held-out synthetic images (3 questions each); latency medians of "
            f"{args.repeats} runs of forced answers (8 tokens, [SEG] last; a text-box design: one box answer in its format). Device: {env.get('device_name', args.device)}, "
            f"{env.get('torch_threads', '?')} torch threads; commit {env.get('git_commit', '?')}.\n")
    (out / "designs.md").write_text(head + "\n" + "\n".join(table) + "\n")
    (out / "designs.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                  "designs": rows}, indent=1))
    print((out / "designs.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
