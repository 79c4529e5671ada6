"""scripts/pretrain_sam_concepts.py: concept prompts for the mask decoder (their targets are
the union of the matching shapes) and the decoder file it saves loading where a recipe names it."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lisa_kit.builder import build_component
from lisa_kit.recipes import load_recipe


@pytest.fixture(scope="module")
def script(repo_script):
    return repo_script("scripts/pretrain_sam_concepts.py")


def test_a_concept_targets_every_shape_that_matches_it(script):
    shapes = [{"kind": "square", "color": "red"}, {"kind": "circle", "color": "red"},
              {"kind": "square", "color": "blue"}]
    labels = np.zeros((6, 6), np.int64)
    labels[0, :2], labels[2, :2], labels[4, :2] = 1, 2, 3  # shape j is drawn as j + 1
    seen = set()
    colours, kinds, targets = script.sample_prompts(shapes, labels, 200, random.Random(0))
    for c, k, t in zip(colours, kinds, targets):
        assert c is not None or k is not None
        match = [j for j, s in enumerate(shapes) if (c is None or s["color"] == script.COLOURS[c])
                 and (k is None or s["kind"] == script.KINDS[k])]
        assert match, "every prompt names something in the scene"
        assert torch.equal(t, torch.from_numpy(np.isin(labels, np.array(match) + 1)).float())
        seen.add((c is None, k is None, len(match)))
    # all three forms occur, and a colour alone ("red") covers two shapes at once
    assert {(False, False), (True, False), (False, True)} <= {s[:2] for s in seen}
    assert (False, True, 2) in seen


def test_training_saves_a_decoder_the_recipe_loads(script, tmp_path, capsys):
    out = tmp_path / "sam.safetensors"
    assert script.main(["lisa-tiny", "--steps", "2", "--batch", "2", "--every", "1", "--val", "4",
                        "--save", str(out)]) == 0
    log = capsys.readouterr().out
    assert log.count("held-out mIoU") == 2 and f"wrote {out}" in log
    node = OmegaConf.to_container(load_recipe("lisa-tiny").cfg.model.mask_decoder, resolve=True)
    trained = build_component("mask_decoder", {**node, "checkpoint": str(out)})  # strict: every key
    fresh = build_component("mask_decoder", node)
    for key in ("image_encoder.patch_embed.proj.weight", "mask_decoder.iou_token.weight"):
        assert not torch.equal(trained.state_dict()[key], fresh.state_dict()[key]), key
