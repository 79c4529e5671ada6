"""A lisa_kit-format model with part of one component's weights taken from another file.

Copies ``--model`` (a directory ``lisa-kit export --format lisa_kit`` wrote) to ``--out``
and replaces, in ``<component>.safetensors``, every tensor whose name starts with
``--prefix`` by the tensor of the same name in ``--source`` (a safetensors file in the
component's own layout, such as the SAM file ``scripts/probe_tower.py --component
mask_decoder --save`` writes). Everything else is copied unchanged, so the result loads
wherever the model did (``weights.format: lisa_kit``).

Used for ``lisa-demo-v15``: the shipped model's SAM image encoder had stopped telling
colours apart after joint training (a linear probe on its tokens: colour 20 %, kind 99 %),
so its second schedule starts from the pretrained encoder again and keeps it frozen.

    python scripts/graft_weights.py --model lisa_kit/assets/demo_model --component mask_decoder \\
        --prefix image_encoder. --source runs/lisa-demo-sam.safetensors --out runs/demo-fresh-sam

The source must hold every tensor of the model's under the prefix, with the same shape and
dtype (it may hold others, which are ignored): a mismatch is refused before anything is
written. ``--out`` must not exist unless ``--overwrite``.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lisa_kit.errors import CheckpointError, InputError


def graft(model: Path, component: str, prefix: str, source: Path, out: Path, overwrite: bool = False) -> int:
    """Write the grafted copy; returns how many tensors were replaced."""
    model, source, out = Path(model), Path(source), Path(out)
    target = model / f"{component}.safetensors"
    if not target.is_file():
        raise InputError(f"{model} has no {target.name}: not a lisa_kit-format model directory, or no "
                         f"component {component!r}")
    if not prefix:
        raise InputError("--prefix must not be empty (it names the part of the component to replace)")
    if out.exists() and not overwrite:
        raise InputError(f"{out} exists; pass --overwrite to replace it")
    if out.resolve() == model.resolve():
        raise InputError("--out must differ from --model (the model directory is read, never changed)")
    try:
        weights = load_file(target)
        keys = [k for k in weights if k.startswith(prefix)]
        if not keys:
            raise InputError(f"no tensor of {target} starts with {prefix!r}")
        # Only the tensors replaced are read from the source (a full SAM file may be GBs).
        with safe_open(str(source), "pt") as donor:
            missing = sorted(set(keys) - set(donor.keys()))
            if missing:
                raise CheckpointError(f"{source} has no tensor {missing[0]!r}")
            for k in keys:
                new = donor.get_tensor(k)
                if new.shape != weights[k].shape or new.dtype != weights[k].dtype:
                    raise CheckpointError(f"{k}: {source} holds {tuple(new.shape)} {new.dtype}, the model "
                                          f"{tuple(weights[k].shape)} {weights[k].dtype}")
                weights[k] = new
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read safetensors weights: {exc}") from exc
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(model, out)
    save_file(weights, str(out / target.name))
    return len(keys)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a lisa_kit-format model directory (read only)")
    ap.add_argument("--component", required=True, help="whose file to change, e.g. mask_decoder")
    ap.add_argument("--prefix", required=True, help="the tensors to replace, e.g. image_encoder.")
    ap.add_argument("--source", required=True, help="a safetensors file in the component's layout")
    ap.add_argument("--out", required=True, help="the new model directory")
    ap.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    args = ap.parse_args(argv)
    try:
        n = graft(Path(args.model), args.component, args.prefix, Path(args.source), Path(args.out), args.overwrite)
    except (InputError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {n} tensors of {args.component} under {args.prefix!r} from {args.source}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
