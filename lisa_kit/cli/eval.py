"""``lisa-kit eval``: score a recipe or checkpoint with LISA's protocol."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lisa_kit.cli import add_subcommand


def _setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help="recipe name or path (or use --checkpoint)")
    p.add_argument("overrides", nargs="*", help="recipe overrides key=value")
    p.add_argument("--checkpoint", help="a lisa_kit checkpoint dir or a released LISA HF dir")
    p.add_argument("--vision-tower", help="CLIP dir for a released LISA checkpoint (default: its config)")
    p.add_argument("--sam-config", help="JSON of SAM sizes for a released checkpoint that is not ViT-H")
    p.add_argument("--dataset", required=True, action="append",
                   help="NAME:SPLIT, e.g. reason_seg:val, refcoco:testA, refcocog:test (repeatable)")
    p.add_argument("--root", help="the dataset/ directory of LISA's README")
    p.add_argument("--mode", choices=("teacher", "generate", "both"), default="both",
                   help="teacher: LISA's protocol ([SEG] given); generate: the model must emit [SEG] (default: both)")
    p.add_argument("--all-texts", action="store_true", help="ReasonSeg: ask every text of an image (LISA: text[0])")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generate mode answer budget (default: the recipe's generation.max_new_tokens, else 32)")
    p.add_argument("--limit", type=int, help="score the first N images only")
    p.add_argument("--phrasing", choices=("lisa", "any"), default="lisa",
                   help="lisa: LISA's validation question (default); any: each query in one of the varied "
                        "phrasings a user might type (noun phrase, imperative, question, LISA's template with or "
                        "without its suffix), scored per phrasing kind")
    p.add_argument("--dataset-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a reader option for every --dataset (YAML value), e.g. absent_ratio=0.2 for synthetic "
                        "(repeatable)")
    p.add_argument("--out", default="lisa_kit_eval", help="output directory (metrics.json, metrics.md)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")


def _run(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from lisa_kit.builder import load, load_checkpoint
    from lisa_kit.datasets import open_dataset
    from lisa_kit.errors import InputError
    from lisa_kit.evaluate import Evaluator, markdown_table, parse_dataset
    from lisa_kit.provenance import versions

    if bool(args.recipe) == bool(args.checkpoint):
        raise InputError("name a recipe or --checkpoint DIR (one of them)")
    specs = [parse_dataset(d) for d in args.dataset]
    options = _dataset_options(args.dataset_option)
    for name, _ in specs:
        _check_options(name, options)
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # started by torchrun
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and dist.is_initialized():
        device = f"cuda:{rank % torch.cuda.device_count()}"
    model = (load_checkpoint(args.checkpoint, vision_tower=args.vision_tower, sam=args.sam_config)
             if args.checkpoint else load(args.recipe, args.overrides)).to(device).eval()
    modes = ("teacher", "generate") if args.mode == "both" else (args.mode,)
    budget = args.max_new_tokens or ((model.recipe or {}).get("generation") or {}).get("max_new_tokens") or 32
    out = Path(args.out)
    report = {"recipe": args.recipe, "overrides": args.overrides, "checkpoint": args.checkpoint,
              "phrasing": args.phrasing, "dataset_options": options,
              "versions": versions(), "device": str(device),
              "world_size": dist.get_world_size() if dist.is_initialized() else 1, "evals": []}
    md = []
    for name, split in specs:
        reader = open_dataset(name, args.root, split, **options)
        evaluator = Evaluator(model, reader, modes, all_texts=args.all_texts, max_new_tokens=int(budget),
                              limit=args.limit, phrasing=args.phrasing)
        results = evaluator.run()
        entry = {"dataset": name, "split": split, "modes": results}
        if evaluator.consistency:
            entry["consistency"] = evaluator.consistency
        report["evals"].append(entry)
        md.append(markdown_table(results, f"{name}:{split}", evaluator.consistency))
        if rank == 0:
            for mode, subsets in results.items():
                a = subsets["all"]
                print(f"{name}:{split} [{mode}] gIoU {a['giou']:.4f}  cIoU {a['ciou']:.4f}  "
                      f"({a['n_queries']} queries, {a['n_samples']} images)")
            for mode, c in evaluator.consistency.items():
                if c["n"]:
                    print(f"{name}:{split} [{mode}] answer names the painted shape: {c['consistent']}/{c['n']} "
                          f"({c['rate']:.3f}); present targets rejected: {c['rejected_present']}/{c['present']}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(report, indent=1))
        (out / "metrics.md").write_text("\n".join(md))
        print(f"wrote {out / 'metrics.json'} and {out / 'metrics.md'}", file=sys.stderr)
    if dist.is_initialized():
        dist.barrier()  # every rank is done (rank 0 has written the results)
        dist.destroy_process_group()
        if distributed:
            # Under torchrun, leave without the interpreter's teardown: with torch 2.14's gloo,
            # a rank's exit sometimes ends in std::terminate ("terminate called without an
            # active exception", SIGABRT, about 1 run in 8 on CPU), which makes torchrun report
            # a finished evaluation as failed. The results are written and flushed by now.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    return 0


def _dataset_options(items: list[str]) -> dict:
    """``["absent_ratio=0.2", ...]`` -> ``{"absent_ratio": 0.2}`` (values read as YAML)."""
    import yaml

    from lisa_kit.errors import InputError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--dataset-option takes KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise InputError(f"--dataset-option {item!r}: unreadable value ({e})") from e
    return out


def _check_options(name: str, options: dict) -> None:
    """Refuse (``InputError``) options that reader ``name`` does not take, before it is built."""
    import inspect

    from lisa_kit.datasets.base import DATASETS, _import_readers
    from lisa_kit.errors import InputError

    _import_readers()
    params = inspect.signature(DATASETS[name]).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    takes = sorted(k for k, p in params.items() if p.kind is p.KEYWORD_ONLY and k != "dataset")  # set by name
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise InputError(f"--dataset-option {unknown[0]!r}: the {name} reader takes "
                         f"{', '.join(takes) if takes else 'no options'}")


add_subcommand(
    "eval", "score a recipe or checkpoint on ReasonSeg / refCOCO with LISA's protocol", _setup, _run,
    description="Score a model exactly as LISA's validate() does (teacher mode: the answer is given as '[SEG].'; "
                "gIoU = mean per-query IoU, cIoU = sum I / sum U, ignored pixels excluded) and as users see it "
                "(generate mode: the model must produce [SEG]; none scores an empty mask). Runs under torchrun "
                "with every query counted once. Writes metrics.json (per-query IoU, counts, versions) and metrics.md.",
    epilog="examples:\n"
           "  lisa-kit eval --checkpoint /ckpt/LISA-7B-v1 --vision-tower /ckpt/clip-vit-large-patch14 \\\n"
           "      --dataset reason_seg:val --root /data/dataset --mode teacher\n"
           "  lisa-kit eval lisa-tiny --dataset synthetic:val --limit 20\n"
           "  lisa-kit eval --checkpoint lisa_kit/assets/demo_model --dataset synthetic:test --mode generate \\\n"
           "      --phrasing any --dataset-option absent_ratio=0.2 --limit 200\n"
           "  torchrun --nproc_per_node 8 -m lisa_kit eval --checkpoint run/best --dataset refcoco:testA --root /data/dataset",
)
