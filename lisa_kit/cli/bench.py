"""``lisa-kit bench``: latency, memory, throughput (and optional quality) of a matrix of
variants and scenarios; see :mod:`lisa_kit.bench`."""
from __future__ import annotations

import argparse
import sys

from lisa_kit.cli import add_subcommand


def _setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("matrix", metavar="MATRIX.yaml", help="benchmark matrix (variants, scenarios, repeats, ...)")
    p.add_argument("--out", default="lisa_kit_bench", help="output directory (results.json, results.md, *.png)")
    p.add_argument("--repeats", type=int, help="override the matrix's repeats")
    p.add_argument("--warmup", type=int, help="override the matrix's warm-up runs")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: repeats 1, warm-up 1, first value of every axis, no quality")
    p.add_argument("--device", help="override the matrix's device (cpu, cuda, cuda:1, auto)")
    p.add_argument("--dtype", help="override the matrix's dtype (fp32, bf16, fp16)")
    p.add_argument("--variant", action="append", help="run only this variant (repeatable)")
    p.add_argument("--no-quality", action="store_true", help="skip the quality evaluation")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--validate", action="store_true", help="only parse and check the matrix (no model is built)")


def _run(args: argparse.Namespace) -> int:
    from lisa_kit import bench
    from lisa_kit.errors import InputError

    m = bench.parse_matrix(args.matrix)
    if args.validate:
        n = sum(len(s.points()) for s in m.scenarios)
        print(f"OK {args.matrix}: {len(m.variants)} variant(s), {len(m.scenarios)} scenario(s), {n} point(s) each")
        return 0
    for name in ("repeats", "warmup"):
        v = getattr(args, name)
        if v is not None:
            if v < (1 if name == "repeats" else 0):
                raise InputError(f"--{name} must be >= {1 if name == 'repeats' else 0}, got {v}")
            setattr(m, name, v)
    if args.quick:
        m.repeats, m.warmup, m.quality = 1, min(m.warmup, 1), None
        for s in m.scenarios:
            s.questions_per_image, s.batch_size, s.answer_tokens = (
                s.questions_per_image[:1], s.batch_size[:1], s.answer_tokens[:1])
    if args.device:
        m.device = args.device
    if args.dtype:
        if args.dtype not in bench.DTYPES:
            raise InputError(f"unknown --dtype {args.dtype!r}; use one of {', '.join(bench.DTYPES)}")
        m.dtype = args.dtype
    if args.no_quality:
        m.quality = None
    bench.run_matrix(m, args.out, variants=args.variant, plots=not args.no_plots,
                     log=lambda s: print(s, file=sys.stderr))
    print(f"wrote {args.out}/results.json, results.md" + ("" if args.no_plots else " and plots"))
    return 0


add_subcommand(
    "bench", "benchmark latency per stage, memory, throughput (and quality) of recipe variants", _setup, _run,
    description="Run a benchmark matrix: every variant (recipe + overrides) x scenario x axis value runs the "
                "real generation path with a forced answer ([SEG] last) and times each stage (vision encoder, "
                "mask-decoder image encoder, fusion, LLM prefill, per-token decode, seg head, mask decode, "
                "post-processing, total) over warm-up + repeats. Writes results.json, results.md, "
                "latency_breakdown.png and scaling_<axis>.png.",
    epilog="examples:\n  lisa-kit bench benchmarks/tiny.yaml --out /tmp/bench\n"
           "  lisa-kit bench benchmarks/tiny.yaml --quick\n"
           "  lisa-kit bench benchmarks/gpu.yaml --validate",
)
