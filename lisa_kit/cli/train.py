"""``lisa-kit train``: train the model a recipe describes (see :mod:`lisa_kit.train`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lisa_kit.cli import add_subcommand


def _setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", metavar="RECIPE",
                   help="recipe name or .yaml path (optional with --resume DIR: the checkpoint's own recipe)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="recipe overrides, e.g. train.lr=1e-4 train.batch_size=4 ~train.val")
    p.add_argument("--out", metavar="DIR", help="run directory (default: runs/<recipe name>; with --resume DIR: "
                                                "the run the checkpoint belongs to)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="DIR",
                   help="continue from the newest complete checkpoint of DIR (a run directory or a checkpoint); "
                        "without DIR: of --out")
    p.add_argument("--steps", type=int, metavar="N", help="train for N optimizer steps in all (= train.steps=N)")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="stop after global step N with a checkpoint; the LR schedule still spans train.steps "
                        "(for pre-emptible jobs: resume later with --resume)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run(args: argparse.Namespace) -> int:
    import json
    import os

    from lisa_kit.errors import InputError
    from lisa_kit.train.loop import train

    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe and not Path(recipe).is_file():
        overrides.insert(0, recipe)  # `train --resume DIR k=v`: no recipe, only overrides
        recipe = None
    resume, out = args.resume, args.out
    if isinstance(resume, str) and not Path(resume).exists():
        from lisa_kit.errors import CheckpointError, RecipeError
        from lisa_kit.recipes import find_recipe

        try:  # `train --resume RECIPE`: argparse gave the recipe to --resume
            find_recipe(resume)
        except RecipeError:
            raise CheckpointError("nothing to resume: no such run directory", file=resume) from None
        if recipe is not None:
            raise CheckpointError("nothing to resume: no such run directory", file=resume)
        recipe, resume = resume, True
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if resume is True:  # --resume without a directory: the run directory itself
        if out is None:
            if recipe is None:
                raise InputError("--resume without a directory needs --out or a RECIPE (then runs/<name>)")
            from lisa_kit.recipes import load_recipe

            r = load_recipe(recipe, overrides)
            out = str(Path("runs") / str(r.cfg.get("name") or (r.path.stem if r.path else "run")))
        resume = out
    if recipe is None and resume is None:
        raise InputError("give a RECIPE (or --resume DIR)")
    from lisa_kit.train.signals import Interrupted, exit_code, ignore_signals_after_stop, ignore_signals_to_exit

    ignore_signals_after_stop()  # a stopped run's process ends with 130/143, whatever the launcher sends then
    try:
        summary = train(recipe, out, overrides=overrides, resume=resume, stop_after=args.stop_after,
                        progress=not args.no_progress, device=args.device)
    except Interrupted as e:  # signalled again while stopping: out without the last checkpoint
        ignore_signals_to_exit()
        print(f"error: {e}: aborted; a checkpoint being written is left as a .tmp directory and the previous "
              "checkpoints are intact (continue with --resume)", file=sys.stderr)
        return exit_code(e.signum)
    if int(os.environ.get("RANK", "0")) == 0:
        last = summary.get("last") or {}
        print(f"step {summary['step']}: loss {last.get('loss', float('nan')):.4f} "
              f"(ce {last.get('ce', float('nan')):.4f}, bce {last.get('bce', float('nan')):.4f}, "
              f"dice {last.get('dice', float('nan')):.4f})", file=sys.stderr)
        if summary.get("val"):
            v = summary["val"]
            print(f"val gIoU {v['giou']:.4f} cIoU {v['ciou']:.4f} (best gIoU {summary['best_giou']:.4f})",
                  file=sys.stderr)
        print(json.dumps({"out": summary["out"], "checkpoint": summary["checkpoint"], "step": summary["step"],
                          **({"signal": summary["signal"]} if summary.get("signal") else {})}))
    ignore_signals_to_exit()
    return summary.get("exit_code", 0)  # 130/143 after a SIGINT/SIGTERM stop, as if killed by it


add_subcommand(
    "train", "train a model (LISA's recipe: LoRA LLM, mask decoder, seg head)", _setup, _run,
    description="Train the model RECIPE describes with its train: and data: sections (defaults: LISA's "
                "train_ds.py: AdamW lr 3e-4, betas 0.9/0.95, 100 warmup steps then linear decay, batch 2 x 10 "
                "accumulation, clip 1.0, bf16, LoRA r=8 on q_proj/v_proj). The run directory gets recipe.yaml, "
                "env.json, train.jsonl (one line per step), val.jsonl, tb/ (with tensorboard) and "
                "checkpoints/step_*/ (atomic; the newest train.keep_last kept) plus checkpoints/best/ (best "
                "validation gIoU). SIGINT (Ctrl-C) or SIGTERM stops at the next step with a checkpoint and exit "
                "status 130 or 143; --resume checks the checkpoint's manifest (sizes, sha256) and falls back to the "
                "previous intact checkpoint. Several processes: launch with torchrun (train.strategy: ddp, fsdp2 or "
                "zero2 = FSDP2 keeping gathered parameters, LISA's ZeRO-2).",
    epilog="examples:\n"
           "  lisa-kit train lisa-tiny-synthetic --out runs/tiny\n"
           "  lisa-kit train lisa-tiny-synthetic train.lr=3e-3 train.batch_size=8 --steps 500\n"
           "  lisa-kit train --resume runs/tiny                  # continue where it stopped\n"
           "  lisa-kit train lisa-tiny-synthetic --out runs/tiny --stop-after 100   # then --resume runs/tiny\n"
           "  torchrun --nproc_per_node 8 -m lisa_kit train my-lisa.yaml --out runs/lisa train.strategy=fsdp2\n"
           "  lisa-kit train lisa-llava15-7b weights.path=/ckpt/llava-1.5-7b-hf \\\n"
           "      model.mask_decoder.checkpoint=/ckpt/sam_vit_h_4b8939.pth data.root=/data/dataset",
)
