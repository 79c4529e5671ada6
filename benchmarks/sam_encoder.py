"""SAM image-encoder forward on CPU: Meta's attention ("eager") against the SDPA one.

Each (variant, attention) runs in its own process, so its peak RSS is its own: build
``build_sam(variant)`` (random weights), switch the attention with
``SamMaskDecoder.set_attention``, then time ``encode_image`` on one 1024 x 1024 image
(``repeats`` runs after ``warmup``) and read the process's peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``) before and after the forwards. The two outputs
of a variant are compared (max abs difference) through a saved copy of each.

    python benchmarks/sam_encoder.py --variants vit_b vit_h --threads 2 \\
        --out benchmarks/results/sam_encoder_cpu

Not a test: ViT-H takes about a minute per forward on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _maxrss_bytes() -> int:
    # Linux reports kilobytes.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _usage() -> tuple[float, float, int]:
    """(user s, system s, minor page faults) of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def one(variant: str, impl: str, threads: int, repeats: int, warmup: int, save: str | None) -> dict:
    import torch

    from lisa_kit.components.sam import build_sam

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    sam = build_sam(variant).eval()
    sam.set_attention(impl)
    x = torch.randn(1, 3, sam.image_size, sam.image_size, generator=torch.Generator().manual_seed(1))
    times, cpu = [], []
    with torch.inference_mode():
        for _ in range(warmup):
            sam.encode_image(x)
        rss0 = _maxrss_bytes()
        for _ in range(repeats):
            u0 = _usage()
            t0 = time.perf_counter()
            out = sam.encode_image(x)["image_embeddings"]
            times.append(time.perf_counter() - t0)
            u1 = _usage()
            cpu.append({"user_s": u1[0] - u0[0], "sys_s": u1[1] - u0[1], "minor_faults": u1[2] - u0[2]})
    peak = _maxrss_bytes()
    if save:
        torch.save(out, save)
    return {"variant": variant, "attention": impl, "threads": threads, "times_s": times,
            "min_s": min(times), "cpu": cpu, "peak_rss_bytes": peak, "peak_rss_before_forward_bytes": rss0,
            "forward_peak_growth_bytes": peak - rss0,
            "params": sum(p.numel() for p in sam.image_encoder.parameters())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=["vit_b", "vit_h"])
    ap.add_argument("--attention", nargs="+", default=["eager", "sdpa"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--out", help="write OUT.json and OUT.md")
    ap.add_argument("--child", nargs=3, metavar=("VARIANT", "ATTENTION", "SAVE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(one(a.child[0], a.child[1], a.threads, a.repeats, a.warmup, a.child[2])))
        return 0
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in a.variants:
            outs = {}
            for impl in a.attention:
                save = f"{tmp}/{variant}-{impl}.pt"
                cmd = [sys.executable, __file__, "--child", variant, impl, save, "--threads", str(a.threads),
                       "--repeats", str(a.repeats), "--warmup", str(a.warmup)]
                r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
                               .splitlines()[-1])
                outs[impl] = torch.load(save)
                rows.append(r)
                c = r["cpu"][0]
                print(f"{variant} {impl}: {r['min_s']:.2f} s (cpu user {c['user_s']:.1f} s, sys {c['sys_s']:.1f} s, "
                      f"{c['minor_faults']} minor faults), peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB "
                      f"(+{r['forward_peak_growth_bytes'] / 2**30:.2f} GiB in the forward)", file=sys.stderr)
            if len(outs) > 1:
                ref, *others = outs.values()
                for r in rows[-len(outs):]:
                    r["max_abs_diff_vs_first"] = float((outs[r["attention"]] - ref).abs().max())
                    r["max_abs_output"] = float(ref.abs().max())
    result = {"command": " ".join(sys.argv), "torch": torch.__version__, "cpu": platform.processor() or
              platform.machine(), "image_size": 1024, "rows": rows}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{a.out}.json").write_text(json.dumps(result, indent=1) + "\n")
        lines = [f"# SAM image encoder, 1024 x 1024, CPU ({a.threads} threads)", "",
                 f"`{result['command']}` (torch {torch.__version__}; one forward each unless stated; "
                 "the machine was shared with other jobs, so times are indicative)", "",
                 "| variant | attention | forward wall s | CPU user s | CPU sys s | minor page faults | peak RSS GiB "
                 "| RSS growth in forward GiB | max abs diff |",
                 "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            c = r["cpu"][0]
            lines.append(f"| {r['variant']} | {r['attention']} | {r['min_s']:.2f} | {c['user_s']:.1f} | {c['sys_s']:.1f} "
                         f"| {c['minor_faults']:,} | {r['peak_rss_bytes'] / 2**30:.2f} "
                         f"| {r['forward_peak_growth_bytes'] / 2**30:.2f} | {r.get('max_abs_diff_vs_first', 0):.2e} |")
        Path(f"{a.out}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
