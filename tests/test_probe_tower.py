"""scripts/probe_tower.py: the linear probe on a recipe's image encoders, and the weights
it saves loading where a recipe names them (lisa-demo-v4's tower, lisa-demo-v6's SAM)."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from lisa_kit.builder import build_component
from lisa_kit.recipes import load_recipe


@pytest.fixture(scope="module")
def probe(repo_script):
    return repo_script("scripts/probe_tower.py")


def test_mask_decoder_probe_saves_a_checkpoint_the_recipe_loads(probe, tmp_path, capsys):
    out = tmp_path / "sam.safetensors"
    assert probe.main(["lisa-tiny", "--component", "mask_decoder", "--steps", "2", "--batch", "2",
                       "--every", "1", "--val", "4", "--save", str(out)]) == 0
    log = capsys.readouterr().out
    assert "16 tokens of 32" in log and log.count("held-out kind") == 2  # SAM 64 px / 16 px patches
    node = OmegaConf.to_container(load_recipe("lisa-tiny").cfg.model.mask_decoder, resolve=True)
    trained = build_component("mask_decoder", {**node, "checkpoint": str(out)})  # strict: every key
    fresh = build_component("mask_decoder", node)
    key = "image_encoder.patch_embed.proj.weight"
    assert not torch.equal(trained.state_dict()[key], fresh.state_dict()[key])


def test_tower_probe_saves_weights_the_recipe_loads_as_pretrained(probe, tmp_path, capsys):
    out = tmp_path / "tower.safetensors"
    assert probe.main(["lisa-tiny-timm-convnext", "--steps", "2", "--batch", "2", "--every", "2", "--val", "4",
                       "--save", str(out)]) == 0
    assert "held-out kind" in capsys.readouterr().out
    node = OmegaConf.to_container(load_recipe("lisa-tiny-timm-convnext").cfg.model.vision_encoder, resolve=True)
    trained = build_component("vision_encoder", {**node, "pretrained": str(out)})
    fresh = build_component("vision_encoder", node)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(trained(x), fresh(x))


def test_frozen_probe_reads_a_trained_models_encoder(probe, tmp_path, capsys):
    """``--frozen DIR`` loads the component from a lisa_kit-format directory and trains the
    read-outs only; a directory without that component's file is refused."""
    from safetensors.torch import save_file

    node = OmegaConf.to_container(load_recipe("lisa-tiny").cfg.model.mask_decoder, resolve=True)
    decoder = build_component("mask_decoder", node)
    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, str(tmp_path / "mask_decoder.safetensors"))
    args = ["lisa-tiny", "--component", "mask_decoder", "--frozen", str(tmp_path), "--steps", "2", "--batch", "2",
            "--every", "2", "--val", "4"]
    assert probe.main(args) == 0
    assert "held-out kind" in capsys.readouterr().out
    bad = decoder.state_dict()
    bad["image_encoder.patch_embed.proj.weight"] = torch.zeros(1)  # the file is really read: a wrong shape is refused
    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "mask_decoder.safetensors"))
    with pytest.raises(Exception, match="patch_embed.proj.weight"):
        probe.main(args)
    with pytest.raises(Exception, match="vision_encoder.safetensors"):
        probe.main(["lisa-tiny", "--frozen", str(tmp_path), "--steps", "1", "--val", "2"])


def test_geometry_labels_give_each_cell_its_whole_shapes_centroid_and_area(probe):
    """``cell_labels``' third list: every cell of a shape carries that shape's centroid (in
    cells, x then y) and log area (in cells), not its own cell's; uncovered cells are NaN."""
    import math

    import numpy as np

    labels = np.zeros((16, 16), np.int64)
    labels[0:8, 4:16] = 1  # shape 0: 8 x 12 px, cells 1-3 of rows 0 and 1 on a 4 x 4 grid of 4 px cells
    shapes = [{"kind": "square", "color": "red", "center": [9.5, 3.5], "area": 96}]
    kinds, colours, geometry = probe.cell_labels(labels, shapes, grid=4)
    covered = [i for i, k in enumerate(kinds) if k >= 0]
    assert covered == [1, 2, 3, 5, 6, 7]
    for i in covered:
        assert geometry[i] == pytest.approx([9.5 / 4, 3.5 / 4, math.log(96 / 16)])
    assert all(math.isnan(v) for i, g in enumerate(geometry) if i not in covered for v in g)


def test_geometry_probe_reports_centroid_and_area_errors(probe, capsys):
    assert probe.main(["lisa-tiny-timm-convnext", "--geometry", "--steps", "2", "--batch", "2", "--every", "1",
                       "--val", "4"]) == 0
    log = capsys.readouterr().out
    assert "centroid error of the grid alone" in log
    assert log.count("centroid error") == 3 and log.count("area error") == 2
