"""``lisa-kit data ...``: check a prepared dataset before spending GPU hours on it."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lisa_kit.cli import add_command_group, add_subcommand


def _setup_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="dataset name (see `lisa-kit data list`)")
    p.add_argument("--root", default=None,
                   help="the dataset/ directory of LISA's README (not needed for `synthetic`)")
    p.add_argument("--split", action="append", help="split(s) to check (repeatable; default: every split)")
    p.add_argument("--export", metavar="OUT",
                   help="write each record's image, question(s), masks and a ground-truth overlay "
                        "(outlined masks, a legend naming each target)")
    p.add_argument("--limit", type=int, default=None, help="check/export at most N records per split")
    p.add_argument("--no-decode", action="store_true", help="only check that files exist (fast)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="reader option, e.g. split_by=umd, size=200 (YAML values)")


def _options(pairs: list[str]) -> dict:
    import yaml

    from lisa_kit.errors import InputError

    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise InputError(f"--option takes KEY=VALUE, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)


def _export(reader, out: Path, limit: int | None) -> int:
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from lisa_kit.errors import DataError
    from lisa_kit.prompts import eval_question
    from lisa_kit.visualize import annotate

    out.mkdir(parents=True, exist_ok=True)
    n = len(reader) if limit is None else min(limit, len(reader))
    written = 0
    with open(out / "samples.jsonl", "w") as index:
        for i in tqdm(range(n), desc=f"export {reader.name}:{reader.split}", unit="img", file=sys.stderr):
            try:
                rec = reader[i]
                image = rec.image()
            except DataError as e:
                print(f"skip {i}: {e}", file=sys.stderr)
                continue
            stem = _safe(rec.key)
            Image.fromarray(image).save(out / f"{stem}.png")
            entry = {"key": rec.key, "image": f"{stem}.png", "source_image": str(rec.image_path),
                     "size": list(image.shape[:2]), "targets": [], "rounds": [list(r) for r in rec.rounds]}
            masks, names = [], []
            for k, t in enumerate(rec.targets):
                item = {"text": t.text, "kind": t.kind, "question": eval_question(t.text, t.kind).strip(),
                        "empty": t.empty}
                if t.mask is not None:
                    Image.fromarray(t.mask.astype(np.uint8)).save(out / f"{stem}_mask_{k}.png")
                    item["mask"] = f"{stem}_mask_{k}.png"
                    item["pixels"] = {"target": int((t.mask == 1).sum()), "ignored": int((t.mask == 255).sum())}
                    masks.append(t.mask)
                    names.append(t.text)
                entry["targets"].append(item)
            if masks:  # the ground truth as a person reads it: outlined masks, legend = the targets' texts
                picture = annotate(image, np.stack(masks), labels=names, caption=f"ground truth of {rec.key}")
                Image.fromarray(picture.pixels).save(out / f"{stem}_overlay.png")
            index.write(json.dumps(entry) + "\n")
            written += 1
    return written


def _run_check(args: argparse.Namespace) -> int:
    from lisa_kit.datasets import open_dataset
    from lisa_kit.datasets.base import DATASETS, dataset_names
    from lisa_kit.errors import DataError, UnknownComponentError

    if args.dataset not in dataset_names():
        raise UnknownComponentError("dataset", args.dataset, dataset_names())
    opts = _options(args.option)
    cls = DATASETS[args.dataset]
    # Every split the reader knows, when none is named; refer datasets list theirs in the refs file.
    splits = args.split or list(cls.splits) or list(getattr(sys.modules[cls.__module__], "REFER_SPLITS", [None]))
    failed = False
    for split in splits:
        try:
            reader = open_dataset(args.dataset, args.root, split, **opts)
        except DataError as e:
            if args.split:  # asked for by name: a problem
                print(f"{args.dataset}:{split}: {e}")
                failed = True
            else:
                print(f"{args.dataset}:{split}: not present ({e})")
            continue
        if args.limit is not None and len(reader) > args.limit and hasattr(reader, "limit"):
            reader.limit(args.limit)
        report = reader.check(decode=not args.no_decode)
        counts = ", ".join(f"{k} {v}" for k, v in report.counts.items())
        status = "ok" if report.ok else f"{len(report.problems)} problem(s)"
        print(f"{args.dataset}:{reader.split}: {counts} — {status}")
        for path, message in report.problems[:50]:
            print(f"  {path}: {message}")
        if len(report.problems) > 50:
            print(f"  ... and {len(report.problems) - 50} more")
        failed |= not report.ok
        if args.export:
            out = Path(args.export) / args.dataset / str(reader.split)
            n = _export(reader, out, args.limit)
            print(f"  exported {n} record(s) to {out}")
    return 1 if failed else 0


def _run_list(args: argparse.Namespace) -> int:
    from lisa_kit.datasets.base import DATASETS, dataset_names

    for name in dataset_names():
        cls = DATASETS[name]
        print(f"{name}\tsplits: {', '.join(cls.splits) or '-'}")
    return 0


add_command_group("data", "check and inspect datasets", description="Check and inspect datasets (check, list).")
add_subcommand(
    "data check", "verify a prepared dataset layout and export what the model will see", _setup_check, _run_check,
    description="Open a dataset in its real on-disk layout, count records and targets per split and name every "
                "missing or unreadable file with its path (exit code 1 if any). With --export, write per record "
                "the image, the question(s), each ground-truth mask as a PNG (uint8: 0 background, 1 target, "
                "255 ignored) and a preview overlay, plus samples.jsonl.",
    epilog="examples:\n  lisa-kit data check --dataset reason_seg --root /data/dataset --split val\n"
           "  lisa-kit data check --dataset refcocog --root /data/dataset --split val --export /tmp/look --limit 20\n"
           "  lisa-kit data check --dataset synthetic --split val --option size=50 --export /tmp/syn",
)
add_subcommand("data list", "list the dataset readers and their splits", None, _run_list)
