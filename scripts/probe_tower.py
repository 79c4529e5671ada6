"""Can a recipe's vision tower (or SAM's image encoder) see the synthetic shapes? A linear probe on its tokens.

Builds ``model.vision_encoder`` of a recipe (or, with ``--component mask_decoder``, the
mask decoder, whose ``encode_image`` map ``(I, C, h, w)`` is read as ``h * w`` tokens;
random weights, the real component: its own preprocessing and forward), puts two linear
read-outs on its tokens and trains tower and
read-outs together on dense labels from :mod:`lisa_kit.datasets.synthetic`: for each
token, the kind and the colour of the shape under it (the shape covering at least a
quarter of the token's cell; cells with less are not scored). Reports held-out accuracy
on the ``val`` split as it goes.

It answers one question before a long training run: whether the tower can represent
what the questions ask about at all, with the most direct supervision there is. If it
cannot here, the language model will not learn it through a caption's few tokens.
Measured with it: lisa-demo's CLIP tower (a ViT with 8 px patches) reaches 100 % on
colour and stays near chance (20 %) on kind; lisa-demo-v3's ResNet learns both.

Towers whose ``N`` tokens form a square row-major grid over the whole image (CLIP, timm
ViTs and CNNs, open_clip) are supported; VLM towers that merge patches are not. Mask
decoders: those whose ``encode_image`` gives ``image_embeddings`` over a square input
(SAM and the transformers SAMs).

    python scripts/probe_tower.py lisa-demo-v3 [--steps 1500] [--batch 8] [--every 250] [--save FILE]
    python scripts/probe_tower.py lisa-demo-v6 --component mask_decoder --steps 4000 --save FILE
    python scripts/probe_tower.py lisa-demo-v4 --frozen lisa_kit/assets/demo_model --steps 300
    python scripts/probe_tower.py lisa-demo-v3 --geometry --steps 2000 --save FILE

``--geometry`` adds a third read-out: the centroid and log area of the shape under each
token (the same values on every token of a shape, :func:`cell_geometry`), which is what
the size, position and relation questions compare. A grid of 8 px cells alone places a
centroid within 4.5 px on average, while the set asks to tell centres 3.8 px apart
(``POSITION_MARGIN``) and areas 25 % apart (``AREA_RATIO``); lisa-demo-v3's ResNet trained
with it reads centroids within 1.2 px and areas within 12 % after 2000 steps.

``--frozen MODEL_DIR`` asks what a trained model's encoder still tells: its weights are
loaded from the lisa_kit-format directory and frozen, and only the read-outs learn.

``--save FILE`` writes the trained tower's weights (timm's layout, safetensors) for a
recipe's ``model.vision_encoder.pretrained``: lisa-demo-v4 starts from such a tower, as
LISA starts from a pretrained CLIP. With ``--component mask_decoder`` it writes the whole
decoder's state dict (its own layout; the prompt side keeps its random initialisation)
for ``model.mask_decoder.checkpoint``, as LISA starts from a pretrained SAM.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from lisa_kit.builder import build_component
from lisa_kit.datasets.synthetic import CORNERS, PALETTE, SyntheticReasoningSet
from lisa_kit.recipes import load_recipe

KINDS, COLOURS = list(CORNERS), list(PALETTE)
COVER = 0.25  # a token is labelled with a shape that covers at least this share of its cell


def cell_labels(labels: np.ndarray, shapes: list[dict], grid: int) -> tuple[list[int], list[int], list[list[float]]]:
    """Per grid cell (row-major), the kind and colour index of the shape covering at least
    :data:`COVER` of the cell, ``-100`` (ignored) where none does, and that shape's
    geometry (:func:`cell_geometry`; NaN where none does). ``labels``: ``(H, W)`` with
    ``j + 1`` on shape ``j``; ``H`` and ``W`` multiples of ``grid``."""
    h, w = labels.shape
    ch, cw = h // grid, w // grid
    cells = labels.reshape(grid, ch, grid, cw).transpose(0, 2, 1, 3).reshape(grid * grid, ch * cw)
    kinds, colours, geometry = [], [], []
    for cell in cells:
        counts = np.bincount(cell, minlength=len(shapes) + 1)[1:]
        j = int(counts.argmax()) if counts.size else 0
        if counts.size and counts[j] >= COVER * cell.size:
            kinds.append(KINDS.index(shapes[j]["kind"]))
            colours.append(COLOURS.index(shapes[j]["color"]))
            geometry.append(cell_geometry(shapes[j], ch, cw))
        else:
            kinds.append(-100)
            colours.append(-100)
            geometry.append([math.nan] * 3)
    return kinds, colours, geometry


def cell_geometry(shape: dict, ch: int, cw: int) -> list[float]:
    """What the position questions compare, for the shape under a cell: its centroid
    ``x, y`` in cells (so a read-out error of 0.5 is half a token) and its log area in
    cells. Every cell of one shape gets the same values: the read-out must see the whole
    shape, not its own cell, which is what lets a language model compare two shapes'
    positions and sizes token against token finer than the grid."""
    cx, cy = shape["center"]
    return [cx / cw, cy / ch, math.log(shape["area"] / (ch * cw))]


class _EncoderTokens(torch.nn.Module):
    """A mask decoder's image encoder seen as a tower: ``(I, 3, S, S) -> (I, h * w, C)``."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder
        with torch.no_grad():
            x, _ = decoder.preprocess(np.zeros((8, 8, 3), np.uint8))
            self.feature_dim = decoder.encode_image(x[None])["image_embeddings"].shape[1]

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        h, w = image.shape[:2]
        if h != w:  # a non-square scene is padded by SAM; the grid would not cover it evenly
            raise SystemExit(f"mask decoder probe needs square scenes, got {h}x{w}")
        return self.decoder.preprocess(image)[0]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.decoder.encode_image(pixels)["image_embeddings"].flatten(2).transpose(1, 2)


def batch(tower, ds, indices, grid: int):
    pixels, kinds, colours, geometry = [], [], [], []
    for i in indices:
        rec = ds[i]
        pixels.append(tower.preprocess(rec.image()))
        k, c, g = cell_labels(rec.labels, rec.meta["shapes"], grid)
        kinds.append(k)
        colours.append(c)
        geometry.append(g)
    return torch.stack(pixels), torch.tensor(kinds), torch.tensor(colours), torch.tensor(geometry)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", help="recipe name or path; its model.vision_encoder is probed")
    ap.add_argument("--component", choices=["vision_encoder", "mask_decoder"], default="vision_encoder",
                    help="which image encoder of the recipe to probe (default vision_encoder)")
    ap.add_argument("--steps", type=int, default=1500, help="training steps (default 1500)")
    ap.add_argument("--batch", type=int, default=8, help="scenes per step (default 8)")
    ap.add_argument("--every", type=int, default=250, help="report every N steps (default 250)")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    ap.add_argument("--val", type=int, default=200, help="held-out scenes (default 200)")
    ap.add_argument("--geometry", action="store_true",
                    help="also read out each token's shape's centroid and log area (cell_geometry): trains the "
                         "tower to tell positions and sizes finer than its grid")
    ap.add_argument("--save", help="write the trained tower's weights here (safetensors; timm towers only)")
    ap.add_argument("--frozen", metavar="MODEL_DIR",
                    help="a lisa_kit-format model (lisa-kit export --format lisa_kit) whose encoder is probed as "
                         "trained: its weights are loaded and frozen, only the read-outs learn")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    node = OmegaConf.to_container(load_recipe(args.recipe).cfg.model[args.component], resolve=True)
    for key in ("pretrained", "checkpoint"):  # the probe trains from random weights (and makes such files)
        node.pop(key, None)
    built = build_component(args.component, node)
    if args.frozen:
        from lisa_kit.checkpoint.io import load_file_into

        load_file_into(built, Path(args.frozen) / f"{args.component}.safetensors", component=args.component)
    tower = built if args.component == "vision_encoder" else _EncoderTokens(built)
    train = SyntheticReasoningSet(split="train", size=args.steps * args.batch)
    val = SyntheticReasoningSet(split="val", size=args.val)
    with torch.no_grad():
        n = tower(tower.preprocess(val[0].image())[None]).shape[1]
    grid = math.isqrt(n)
    h, w = val[0].labels.shape
    if grid * grid != n or h % grid or w % grid:
        raise SystemExit(f"{args.recipe}: {n} tokens are not a square grid dividing the {h}x{w} scenes")
    head_kind = torch.nn.Linear(tower.feature_dim, len(KINDS))
    head_colour = torch.nn.Linear(tower.feature_dim, len(COLOURS))
    head_geometry = torch.nn.Linear(tower.feature_dim, 3)
    heads = [head_kind, head_colour] + ([head_geometry] if args.geometry else [])
    if args.frozen:  # what the trained encoder still tells, read linearly
        tower.requires_grad_(False).eval()
        params = [p for h in heads for p in h.parameters()]
    else:
        tower.requires_grad_(True).train()
        params = [*tower.parameters(), *(p for h in heads for p in h.parameters())]
    opt = torch.optim.AdamW(params, lr=args.lr)
    xv, kv, cv, gv = batch(tower, val, range(args.val), grid)
    ce = torch.nn.functional.cross_entropy
    cell_px = torch.tensor([w / grid, h / grid])  # a cell's width and height: centroids in cells -> px

    def centroid_px(pred: torch.Tensor, true: torch.Tensor) -> float:
        """Mean absolute centroid error in px; ``(M, 2)`` centroids ``x, y`` in cells."""
        return float(((pred - true).abs() * cell_px).mean())

    if args.geometry:  # what the grid alone tells: a token's own cell centre as the shape's centroid
        on = kv >= 0
        xy = torch.stack(torch.meshgrid(torch.arange(grid) + 0.5, torch.arange(grid) + 0.5, indexing="xy"), -1)
        xy = xy.reshape(grid * grid, 2).expand_as(gv[..., :2])  # (V, N, 2) each cell's own centre, in cells
        print(f"centroid error of the grid alone (cell centres): {centroid_px(xy[on], gv[..., :2][on]):.2f} px")
    start = time.perf_counter()
    print(f"{args.recipe}: {type(tower).__name__}, {n} tokens of {tower.feature_dim}, "
          f"{sum(p.numel() for p in tower.parameters()) / 1e6:.2f}M parameters")
    for step in range(1, args.steps + 1):
        x, k, c, g = batch(tower, train, range((step - 1) * args.batch, step * args.batch), grid)
        f = tower(x)
        loss = ce(head_kind(f).flatten(0, 1), k.flatten()) + ce(head_colour(f).flatten(0, 1), c.flatten())
        if args.geometry:
            on = k >= 0
            loss = loss + torch.nn.functional.mse_loss(head_geometry(f)[on], g[on])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.every == 0 or step == args.steps:
            tower.eval()
            with torch.no_grad():
                f = tower(xv)
            tower.train(not args.frozen)
            on = kv >= 0
            acc_k = (head_kind(f).argmax(-1)[on] == kv[on]).float().mean()
            acc_c = (head_colour(f).argmax(-1)[on] == cv[on]).float().mean()
            geo = ""
            if args.geometry:
                pred = head_geometry(f)[on].detach()
                log_area = float((pred[:, 2] - gv[on][:, 2]).abs().mean())  # exp(.) - 1: a relative error
                geo = (f"  centroid error {centroid_px(pred[:, :2], gv[on][:, :2]):.2f} px"
                       f"  area error {math.expm1(log_area) * 100:.0f} %")
            print(f"step {step:>5}  held-out kind {acc_k:.3f}  colour {acc_c:.3f}{geo}  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    if args.save:
        from lisa_kit.checkpoint.io import save_safetensors

        inner = built if args.component == "mask_decoder" else getattr(tower, "model", None)
        if args.component == "vision_encoder" and (not hasattr(tower, "model_name") or inner is None):
            raise SystemExit(f"--save writes timm towers' weights; {type(tower).__name__} is not one")
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(inner.state_dict(), args.save)
        print(f"wrote {args.save}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
