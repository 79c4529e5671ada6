"""Teach a recipe's mask decoder to segment the synthetic shapes from a concept prompt.

LISA starts from a SAM that already turns a prompt into a mask; its ``[SEG]`` embedding
only has to say *which* object. A tiny SAM trained from scratch inside a LISA run must
learn both at once, through one prompt per answer. This script gives the decoder the
first skill beforehand, the way SAM 3 is prompted by concepts: each prompt is the sum of
a learned colour embedding and a learned kind embedding (``(M, P)``, what ``decode``
takes), or either one alone, and the target is the union of every shape of the scene
that matches it (``(H, W)`` from the scene's label map). The decoder's own ``decode``
and ``postprocess`` run, with LISA's per-mask BCE and Dice losses.

The concept embeddings are thrown away afterwards: in the LISA run the seg head learns to
map the ``[SEG]`` hidden state into the prompt space the decoder now reads.

    python scripts/pretrain_sam_concepts.py lisa-demo-v6 --init runs/lisa-demo-sam.safetensors \\
        --steps 3000 --save runs/lisa-demo-sam-concepts.safetensors

``--init`` starts from a decoder file (``scripts/probe_tower.py --component mask_decoder
--save`` writes one: an image encoder that already sees kinds and colours); without it,
from the recipe's own ``model.mask_decoder`` weights, random where it names none. Reports
held-out mean IoU (threshold 0) on the ``val`` split; ``--save`` writes the decoder's
whole state dict for ``model.mask_decoder.checkpoint``.
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lisa_kit.builder import build_component
from lisa_kit.datasets.synthetic import CORNERS, PALETTE, SyntheticReasoningSet
from lisa_kit.loss import bce_loss, dice_loss
from lisa_kit.metrics import mask_iou_stats
from lisa_kit.recipes import load_recipe

KINDS, COLOURS = list(CORNERS), list(PALETTE)
# How often a prompt names both attributes, the colour only or the kind only.
FORMS = (("both", 0.6), ("colour", 0.2), ("kind", 0.2))


class Concepts(torch.nn.Module):
    """Learned colour and kind embeddings ``(P,)``; a prompt is the sum of those it names."""

    def __init__(self, dim: int):
        super().__init__()
        self.colour = torch.nn.Embedding(len(COLOURS), dim)
        self.kind = torch.nn.Embedding(len(KINDS), dim)

    def forward(self, colours: list[int | None], kinds: list[int | None]) -> torch.Tensor:
        rows = []
        for c, k in zip(colours, kinds):
            terms = [self.colour.weight[c]] if c is not None else []
            terms += [self.kind.weight[k]] if k is not None else []
            rows.append(torch.stack(terms).sum(0))
        return torch.stack(rows)


def sample_prompts(shapes: list[dict], labels, per_scene: int, rng: random.Random):
    """``per_scene`` concepts of one scene (each matching at least one shape): their
    colour and kind indices (``None`` where the form leaves one out) and target masks
    ``(M, H, W)`` float, the union of the matching shapes."""
    lab = torch.from_numpy(labels)
    colours, kinds, targets = [], [], []
    for _ in range(per_scene):
        s = rng.choice(shapes)
        form = rng.choices([f for f, _ in FORMS], [w for _, w in FORMS])[0]
        c = COLOURS.index(s["color"]) if form in ("both", "colour") else None
        k = KINDS.index(s["kind"]) if form in ("both", "kind") else None
        hit = [j for j, t in enumerate(shapes)
               if (c is None or t["color"] == COLOURS[c]) and (k is None or t["kind"] == KINDS[k])]
        targets.append(torch.isin(lab, torch.tensor(hit) + 1).float())
        colours.append(c)
        kinds.append(k)
    return colours, kinds, torch.stack(targets)


def run_batch(decoder, concepts, recs, per_scene: int, rng: random.Random, score: bool = False):
    """Loss of one batch of scenes, ``(bce + dice) / M``, and with ``score`` the ``M``
    masks' IoUs (LISA's metric, :func:`~lisa_kit.metrics.mask_iou_stats`; training skips it)."""
    pixels, metas = zip(*(decoder.preprocess(r.image()) for r in recs))
    feats = decoder.encode_image(torch.stack(pixels))
    loss, ious, n = 0.0, [], 0
    for i, rec in enumerate(recs):
        colours, kinds, target = sample_prompts(rec.meta["shapes"], rec.labels, per_scene, rng)
        low, _ = decoder.decode({k: v[i:i + 1] for k, v in feats.items()}, concepts(colours, kinds))
        logits = decoder.postprocess(low, metas[i])
        loss = loss + bce_loss(logits, target) + dice_loss(logits, target)
        ious += [] if not score else [float(mask_iou_stats(p.detach(), t).iou[1]) for p, t in zip(logits, target)]
        n += len(colours)
    return loss / n, ious


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", help="recipe name or path; its model.mask_decoder is trained")
    ap.add_argument("--init", help="decoder weights to start from (safetensors, the decoder's own layout)")
    ap.add_argument("--steps", type=int, default=3000, help="training steps (default 3000)")
    ap.add_argument("--batch", type=int, default=8, help="scenes per step (default 8)")
    ap.add_argument("--per-scene", type=int, default=2, help="prompts per scene (default 2)")
    ap.add_argument("--every", type=int, default=250, help="report every N steps (default 250)")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    ap.add_argument("--val", type=int, default=200, help="held-out scenes (default 200)")
    ap.add_argument("--save", help="write the trained decoder's state dict here (safetensors)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    spec = load_recipe(args.recipe).cfg.model.mask_decoder
    node = OmegaConf.to_container(spec, resolve=True)
    if args.init or OmegaConf.is_missing(spec, "checkpoint"):  # "???": the file this script makes
        node.pop("checkpoint", None)
    decoder = build_component("mask_decoder", node)
    if args.init:
        from lisa_kit.checkpoint.io import load_file_into

        load_file_into(decoder, Path(args.init), component="mask_decoder")
    concepts = Concepts(decoder.prompt_dim)
    train = SyntheticReasoningSet(split="train", size=args.steps * args.batch)
    val = SyntheticReasoningSet(split="val", size=args.val)
    opt = torch.optim.AdamW([*decoder.parameters(), *concepts.parameters()], lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / args.steps)
    rng = random.Random(0)
    start = time.perf_counter()
    print(f"{args.recipe}: {type(decoder).__name__}, prompt dim {decoder.prompt_dim}, "
          f"{sum(p.numel() for p in decoder.parameters()) / 1e6:.2f}M parameters")
    decoder.train()
    for step in range(1, args.steps + 1):
        recs = [train[i] for i in range((step - 1) * args.batch, step * args.batch)]
        loss, _ = run_batch(decoder, concepts, recs, args.per_scene, rng)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % args.every == 0 or step == args.steps:
            decoder.eval()
            with torch.no_grad():
                vrng = random.Random(1)  # the same held-out prompts at every report
                ious = [iou for i in range(0, args.val, 16)
                        for iou in run_batch(decoder, concepts, [val[j] for j in range(i, min(i + 16, args.val))],
                                             args.per_scene, vrng, score=True)[1]]
            decoder.train()
            print(f"step {step:>5}  loss {loss.item():.3f}  held-out mIoU {sum(ious) / len(ious):.3f}  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    if args.save:
        from lisa_kit.checkpoint.io import save_safetensors

        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(decoder.state_dict(), args.save)
        print(f"wrote {args.save}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
