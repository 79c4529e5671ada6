"""``lisa-kit export``: write a model as a released-LISA HF directory and/or lisa_kit's own format."""
from __future__ import annotations

import argparse
import re
import sys
import warnings
from pathlib import Path

from lisa_kit.cli import add_subcommand

FORMATS = ("lisa_hf", "lisa_kit", "both")


def _setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", metavar="RECIPE", help="recipe name or path to a .yaml file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides: key=value, ~key")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="load this directory instead of a recipe: a training run (its newest "
                        "checkpoints/step_*) or one of its step_*/best directories, a lisa_kit checkpoint "
                        "(recipe.yaml), or a LISA HF directory (config.json; see --sam)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (written atomically)")
    p.add_argument("--format", choices=FORMATS, default="lisa_hf",
                   help="lisa_hf: the released-LISA layout (default); lisa_kit: this library's own; "
                        "both: DIR/lisa_hf and DIR/lisa_kit")
    p.add_argument("--vision-tower", metavar="PATH",
                   help="CLIP tower path or hub name to write in config.json (default: the recipe's "
                        "model.vision_encoder.pretrained, else the tower is written to DIR/clip_vision_tower)")
    p.add_argument("--weights-format", choices=("safetensors", "bin"), default="safetensors",
                   help="LISA weights as model.safetensors (default; transformers 4.31 reads it) or "
                        "pytorch_model.bin")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="cast the LISA weights (default: the precision the loaded checkpoint stores, e.g. "
                        "bfloat16 for a released LISA directory; a training run or a recipe without weights "
                        "keeps the model's own, float32)")
    p.add_argument("--max-shard-size", default="10GB", metavar="SIZE",
                   help="split LISA weights into shards of at most SIZE (e.g. 5GB, 500MB; default 10GB, "
                        "transformers 4.31's, which wrote the released checkpoints); export holds at most one "
                        "shard in memory beyond the model")
    p.add_argument("--sam", metavar="VARIANT|JSON",
                   help="with --checkpoint of a LISA HF dir: SAM sizes (vit_h default, or a sizes .json; "
                        "the dir's sam_config.json is used when present)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")


def _size(text: str) -> int:
    """Bytes in ``10GB`` / ``500MB`` / ``2GiB`` / ``1000000``, as transformers'
    ``max_shard_size`` reads them (KB/MB/GB decimal, KiB/MiB/GiB binary)."""
    from lisa_kit.errors import InputError

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(i?)B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise InputError(f"--max-shard-size: cannot read {text!r} (e.g. 10GB, 500MB, 2GiB, 1000000)")
    power = "KMGT".index(m.group(2).upper()) + 1 if m.group(2) else 0
    n = int(float(m.group(1)) * (2**10 if m.group(3) else 10**3) ** power)
    if n <= 0:
        raise InputError(f"--max-shard-size must be positive, got {text!r}")
    return n


def _training_checkpoint(path: Path) -> Path | None:
    """The training checkpoint ``path`` names (a ``step_*``/``best`` directory, or a run
    directory: its newest step), when :mod:`lisa_kit.train` is there to read it."""
    try:
        from lisa_kit.train import checkpointing
    except ImportError:
        return None
    if not hasattr(checkpointing, "load_trained_model") or not hasattr(checkpointing, "latest_checkpoint"):
        return None
    return checkpointing.latest_checkpoint(path)


def source_weights(args: argparse.Namespace) -> Path | None:
    """The checkpoint directory whose files hold every weight the LISA export writes (a
    ``--checkpoint`` LISA HF or lisa_kit directory, or a recipe's ``weights.path`` of those
    formats); ``None`` for training runs, random weights and composed sources (``llava_hf``
    takes SAM from elsewhere)."""
    if args.checkpoint is not None:
        ckpt = Path(args.checkpoint)
        if _training_checkpoint(ckpt) is not None:
            return None  # trained in the model's own precision (float32 masters)
        return ckpt if (ckpt / "recipe.yaml").exists() or (ckpt / "config.json").exists() else None
    from omegaconf import OmegaConf

    from lisa_kit.recipes import load_recipe

    cfg = load_recipe(args.recipe, args.overrides).cfg
    weights = OmegaConf.to_container(cfg.weights, resolve=True) if "weights" in cfg else {}
    if weights.get("format") in ("lisa_hf", "lisa_kit") and weights.get("path"):
        return Path(weights["path"])
    return None


def load_for_export(args: argparse.Namespace):
    """The model named by a recipe (+ overrides) or ``--checkpoint``."""
    from lisa_kit.errors import CheckpointError, InputError

    if args.recipe is None and args.checkpoint is None:
        raise InputError("nothing to export: give a RECIPE (e.g. lisa-tiny) or --checkpoint DIR")
    if args.recipe is not None and args.checkpoint is not None:
        raise InputError(f"give a RECIPE or --checkpoint DIR, not both (got {args.recipe!r} and {args.checkpoint!r})")
    if args.checkpoint is None:
        from lisa_kit.builder import load

        return load(args.recipe, args.overrides)
    if args.overrides:
        raise InputError("KEY=VALUE overrides apply to a recipe, not to --checkpoint")
    ckpt = Path(args.checkpoint)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {ckpt}")
    step = _training_checkpoint(ckpt)  # before recipe.yaml: run and step directories have one too
    if step is not None:
        from lisa_kit.train.checkpointing import load_trained_model

        print(f"training checkpoint: {step}", file=sys.stderr)
        return load_trained_model(step, merge=True)  # LoRA folded in; fp32, CPU
    if (ckpt / "recipe.yaml").exists():
        from lisa_kit.checkpoint.native import load_model

        return load_model(ckpt)
    if (ckpt / "config.json").exists():
        from lisa_kit.checkpoint.lisa_hf import import_lisa_hf

        sam = args.sam
        if sam is None and (ckpt / "sam_config.json").exists():
            sam = str(ckpt / "sam_config.json")
        tower = args.vision_tower if args.vision_tower and Path(args.vision_tower).is_dir() else None
        return import_lisa_hf(ckpt, vision_tower=tower, sam=sam)
    raise CheckpointError(f"{ckpt} is neither a training run or checkpoint (checkpoints/step_*, trainer.json), a "
                          "lisa_kit checkpoint (recipe.yaml) nor a LISA HF directory (config.json)")


def _run(args: argparse.Namespace) -> int:
    from lisa_kit.checkpoint import export as ex

    out = Path(args.out)
    ex.check_output_dir(out, args.overwrite)  # fail before loading a large model
    shard = _size(args.max_shard_size)
    model = load_for_export(args)
    dtype = args.dtype
    if dtype is None and args.format != "lisa_kit":
        # Write the precision of what was loaded (a bf16 release stays bf16, lossless: its
        # values came from bf16), whatever precision the loader built the model in.
        src = source_weights(args)
        stored = ex.stored_dtype(src) if src is not None else None
        if stored is not None and stored in ex.DTYPES.values():
            dtype = ex._dtype_name(stored)
            print(f"weights: {dtype} (as stored in {src})", file=sys.stderr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ex.ExportWarning)
        with ex.atomic_dir(out, args.overwrite) as tmp:
            # The model is discarded afterwards: merge LoRA adapters in place (no second copy).
            hf_dir = tmp / "lisa_hf" if args.format == "both" else tmp
            if args.format in ("lisa_hf", "both"):
                ex.write_lisa_hf(model, hf_dir, vision_tower=args.vision_tower,
                                 safetensors=args.weights_format == "safetensors", dtype=dtype,
                                 merge_lora="inplace", max_shard_size=shard,
                                 final_path=out / "lisa_hf" if args.format == "both" else out)
            if args.format in ("lisa_kit", "both"):
                ex.write_lisa_kit(model, tmp / "lisa_kit" if args.format == "both" else tmp, merge_lora="inplace")
    for w in caught:
        if issubclass(w.category, ex.ExportWarning):
            print(f"note: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if args.format == "both":
        print(f"wrote {out / 'lisa_hf'} (LISA HF) and {out / 'lisa_kit'} (lisa_kit)")
    else:
        print(f"wrote {out} ({'LISA HF' if args.format == 'lisa_hf' else 'lisa_kit'})")
    if args.format != "lisa_kit":
        hf = out / "lisa_hf" if args.format == "both" else out
        print(f"load it back: lisa_kit.checkpoint.lisa_hf.import_lisa_hf({str(hf)!r}, "
              f"sam={str(hf / ex.SAM_CONFIG)!r})")
    return 0


add_subcommand(
    "export", "write a model as a released-LISA HF directory or lisa_kit checkpoint", _setup, _run,
    description="Load a model (a recipe with its weights: section, or --checkpoint DIR) and write it as a "
                "released-LISA Hugging Face directory (config.json with model_type llava / LISAForCausalLM, "
                "LISA's weight keys, generation_config.json, the slow-LLaMA tokenizer with [SEG], <im_start>, "
                "<im_end>, plus sam_config.json), as lisa_kit's own format, or both. LoRA adapters on the LLM "
                "are merged. The output appears only when complete (written to DIR.tmp-*, then renamed); a "
                "non-empty DIR is refused without --overwrite.\n"
                "The CLIP tower is not inside LISA's weights: config.json names --vision-tower, else the "
                "recipe's model.vision_encoder.pretrained, else the tower is written to DIR/clip_vision_tower "
                "and named relatively. LISA's own scripts take it from their --vision_tower argument.",
    epilog="examples:\n"
           "  lisa-kit export lisa-tiny --out /tmp/lisa-tiny-hf\n"
           "  lisa-kit export lisa-tiny --out /tmp/tiny --format both --overwrite\n"
           "  lisa-kit export --checkpoint runs/exp1 --out /ckpt/LISA-exp1 \\\n"
           "      --vision-tower /ckpt/clip-vit-large-patch14 --dtype bfloat16      # newest step, LoRA merged\n"
           "  lisa-kit export --checkpoint runs/exp1/checkpoints/best --out /ckpt/LISA-exp1-best\n"
           "  lisa-kit export lisa-7b weights.path=/ckpt/LISA-7B-v1 \\\n"
           "      model.vision_encoder.pretrained=/ckpt/clip-vit-large-patch14 --out /ckpt/LISA-7B-st\n"
           "  lisa-kit export --checkpoint /ckpt/LISA-7B-v1 --vision-tower /ckpt/clip-vit-large-patch14 \\\n"
           "      --format lisa_kit --out /ckpt/LISA-7B-lisa-kit\n"
           "load the result:\n"
           "  lisa_kit: import_lisa_hf(DIR, sam=DIR/sam_config.json) or lisa-kit's recipes with "
           "weights.path=DIR\n"
           "  LISA:     python chat.py --version DIR --vision_tower <CLIP dir>  (ViT-H SAM, 224px CLIP only)",
)
