"""Training throughput (samples/s) and peak memory of `lisa-kit train`, per variant.

Not a test: a measurement to run by hand and commit with the device named.

    python benchmarks/train_throughput.py                      # CPU, tiny recipes
    python benchmarks/train_throughput.py --gpu                # CUDA, LISA-7B shapes (random weights)
    python benchmarks/train_throughput.py --variant lisa-tiny-synthetic --steps 40

Each variant is a recipe + overrides run through :class:`lisa_kit.train.loop.Trainer` (the
real loop: collate, forward, loss, backward, clipping, AdamW, schedule) on the synthetic
set, no validation and no checkpoints. Throughput is the median of the per-step
``samples_per_s`` that the loop logs, after ``--warmup`` steps; peak memory is
``torch.cuda.max_memory_allocated`` on CUDA and the growth of the process's peak RSS on
CPU (each variant runs in its own process, so the high-water mark is its own). Results go to ``--out`` as JSON and a markdown table (with device, versions and
commit), e.g. ``benchmarks/results/train_cpu.{json,md}``.

The GPU variants build LISA-7B's components at full size with random weights (the
shapes of ``benchmarks/gpu.yaml``) and pad the stand-in tokenizer's vocabulary to
LISA-7B's 32004 rows, so embedding and ``lm_head`` -- both trained in LISA's recipe --
have their real size.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SYNTHETIC = "data.sources={synthetic: {datasets: [synthetic], rate: 1, split: train, options: {size: 2000}}}"
NO_SIDE_WORK = ["train.val=null", "train.save_every=0", "train.workers=0", "train.log_every=1"]
CLIP_L = ("model.vision_encoder.config={hidden_size: 1024, intermediate_size: 4096, num_hidden_layers: 24, "
          "num_attention_heads: 16, image_size: 224, patch_size: 14, hidden_act: quick_gelu, projection_dim: 768}")
LLAMA_7B = ("model.llm.config={model_type: llama, hidden_size: 4096, intermediate_size: 11008, num_hidden_layers: 32, "
            "num_attention_heads: 32, num_key_value_heads: 32, max_position_embeddings: 4096, vocab_size: 32000, "
            "rms_norm_eps: 1.0e-6, tie_word_embeddings: false}")

# name -> (recipe, overrides, vocabulary rows to pad to or None)
CPU_VARIANTS = {
    # LISA's recipe at toy size: LoRA q/v, embeddings, head, mask decoder, seg head
    "lisa-tiny-synthetic": ("lisa-tiny-synthetic", ["train.batch_size=4", "train.grad_accumulation=1"], None),
    # the same, LISA's accumulation of 10 micro-batches of 2
    "lisa-tiny-synthetic-acc10": ("lisa-tiny-synthetic", ["train.batch_size=2", "train.grad_accumulation=10"], None),
    # everything trains (the shipped demo model's recipe)
    "lisa-demo": ("lisa-demo", ["train.batch_size=8"], None),
}
GPU_VARIANTS = {
    "lisa-7b-shape-bf16": ("lisa-tiny", [CLIP_L, LLAMA_7B, "model.mask_decoder.variant=vit_h", "~model.mask_decoder.config",
                                         "train.precision=bf16", "train.batch_size=2", "train.grad_accumulation=1",
                                         "train.activation_checkpointing=true", "data.samples_per_epoch=1000",
                                         "train.max_length=512"], 32004),
}


def _pad_vocab(rows: int):
    """Make the trainer's model build pad the LLM's vocabulary to ``rows``."""
    import lisa_kit.builder as builder

    real = builder.load  # Trainer imports it when it builds, so the patch is seen

    def load(*args, **kwargs):
        model = real(*args, **kwargs)
        if rows > model.llm.vocab_size:
            model.llm.resize_vocab(rows)
        return model

    builder.load = load
    return lambda: setattr(builder, "load", real)


def run_variant(name: str, recipe: str, overrides: list[str], vocab: int | None, steps: int, warmup: int,
                device: str) -> dict:
    from lisa_kit.train.loop import Trainer

    restore = _pad_vocab(vocab) if vocab else None
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            tr = Trainer(recipe, Path(tmp) / "run", progress=False, device=device,
                         overrides=[SYNTHETIC, *NO_SIDE_WORK, f"train.steps={steps}", "train.warmup_steps=1",
                                    *overrides])
            build = time.perf_counter() - t0
            tr.fit()
            log = [json.loads(line) for line in (Path(tmp) / "run/train.jsonl").read_text().splitlines()]
    finally:
        if restore:
            restore()
    sps = [r["samples_per_s"] for r in log[warmup:]]
    n_train = sum(p.numel() for p in tr.model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in tr.model.parameters())
    out = {"variant": name, "recipe": recipe, "overrides": overrides, "steps": len(log), "measured_steps": len(sps),
           "samples_per_step": tr.cfg.batch_size * tr.cfg.grad_accumulation,
           "samples_per_s_median": statistics.median(sps), "samples_per_s_p10": _q(sps, 0.1),
           "samples_per_s_p90": _q(sps, 0.9), "build_s": build, "params": n_all, "trainable_params": n_train,
           "precision": tr.cfg.precision}
    if device.startswith("cuda"):
        out["peak_bytes"] = torch.cuda.max_memory_allocated()
    else:  # ru_maxrss is KiB on Linux; a high-water mark, so later variants may read 0
        out["peak_rss_growth_bytes"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    return out


def _q(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def markdown(res: dict) -> str:
    env = res["env"]
    lines = [f"device: {env['device']}; torch {env['versions'].get('torch')}, lisa_kit "
             f"{env['versions'].get('lisa_kit')}, commit {(env['git'].get('commit') or '?')[:10]}; "
             f"{env['threads']} threads\n",
             "| variant | precision | samples/step | samples/s (median, p10-p90) | params (trainable) | peak memory |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in res["runs"]:
        mem = r.get("peak_bytes", r.get("peak_rss_growth_bytes", 0)) / 2**20
        what = "CUDA allocated" if "peak_bytes" in r else "RSS growth"
        lines.append(f"| {r['variant']} | {r['precision']} | {r['samples_per_step']} | "
                     f"{r['samples_per_s_median']:.1f} ({r['samples_per_s_p10']:.1f}-{r['samples_per_s_p90']:.1f}) | "
                     f"{r['params'] / 1e6:.2f}M ({r['trainable_params'] / 1e6:.2f}M) | {mem:.0f} MiB {what} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="CUDA and the LISA-7B-shape variants")
    ap.add_argument("--variant", action="append", help="only these variants")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5, help="logged steps left out of the statistics")
    ap.add_argument("--out", default=None, help="output stem (default benchmarks/results/train_{cpu,gpu})")
    a = ap.parse_args(argv)
    from lisa_kit.provenance import git_state, versions

    variants = GPU_VARIANTS if a.gpu else CPU_VARIANTS
    unknown = sorted(set(a.variant or []) - set(variants))
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; known: {', '.join(variants)}")
    device = "cuda" if a.gpu else "cpu"
    env = {"device": torch.cuda.get_device_name(0) if a.gpu else f"CPU ({torch.get_num_threads()} threads)",
           "versions": versions(), "git": git_state(), "threads": torch.get_num_threads(),
           "date": time.strftime("%Y-%m-%d")}
    runs = []
    names = [n for n in variants if not a.variant or n in a.variant]
    for name in names:
        print(f"[{name}] {a.steps} steps ...", file=sys.stderr, flush=True)
        if len(names) > 1:  # one process per variant: peak memory is then that variant's own
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, __file__, "--variant", name, "--steps", str(a.steps), "--warmup",
                       str(a.warmup), "--out", f"{tmp}/one"] + (["--gpu"] if a.gpu else [])
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                runs.append(json.loads(Path(f"{tmp}/one.json").read_text())["runs"][0])
        else:
            recipe, ov, vocab = variants[name]
            runs.append(run_variant(name, recipe, ov, vocab, a.steps, a.warmup, device))
        print(f"[{name}] {runs[-1]['samples_per_s_median']:.1f} samples/s", file=sys.stderr, flush=True)
    res = {"env": env, "runs": runs, "steps": a.steps, "warmup": a.warmup}
    stem = Path(a.out or f"benchmarks/results/train_{'gpu' if a.gpu else 'cpu'}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    stem.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
