"""scripts/graft_weights.py: a saved model with part of one component's weights taken from
another file loads with exactly those tensors replaced; mismatches are refused before
anything is written."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lisa_kit.checkpoint.native import load_model, save_model


@pytest.fixture(scope="module")
def script(repo_script):
    return repo_script("scripts/graft_weights.py")


@pytest.fixture()
def saved(tiny_model, tmp_path):
    return save_model(tiny_model, tmp_path / "model")


def _donor(model, prefix: str, scale: float = 3.0) -> dict[str, torch.Tensor]:
    """Every tensor of the model's mask decoder, those under ``prefix`` changed."""
    state = model.mask_decoder.state_dict()
    return {k: (v * scale + 1 if k.startswith(prefix) and v.is_floating_point() else v).contiguous()
            for k, v in state.items()}


def test_only_the_prefix_is_replaced_and_the_result_loads(script, tiny_model, saved, tmp_path, capsys):
    donor = _donor(tiny_model, "image_encoder.")
    save_file(donor, str(tmp_path / "sam.safetensors"))
    out = tmp_path / "grafted"
    assert script.main(["--model", str(saved), "--component", "mask_decoder", "--prefix", "image_encoder.",
                        "--source", str(tmp_path / "sam.safetensors"), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    grafted = load_model(out)
    before, after = tiny_model.state_dict(), grafted.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("mask_decoder.image_encoder.") for k in changed)
    for k in changed:
        assert torch.equal(after[k], donor[k.removeprefix("mask_decoder.")])
    # the model directory it read is unchanged
    source_after = load_model(saved).state_dict()
    assert all(torch.equal(v, source_after[k]) for k, v in before.items())


@pytest.mark.parametrize("case", ["missing_key", "wrong_shape", "bad_prefix", "not_a_model", "corrupt_source",
                                  "out_exists"])
def test_refusals_write_nothing(script, tiny_model, saved, tmp_path, capsys, case):
    donor = _donor(tiny_model, "image_encoder.")
    model_dir, prefix, out = saved, "image_encoder.", tmp_path / "grafted"
    source = tmp_path / "sam.safetensors"
    if case == "missing_key":
        donor.pop(next(k for k in donor if k.startswith("image_encoder.")))
    elif case == "wrong_shape":
        k = next(k for k in donor if k.startswith("image_encoder.") and donor[k].dim() > 1)
        donor[k] = torch.zeros(donor[k].shape[0] + 1, *donor[k].shape[1:])
    elif case == "bad_prefix":
        prefix = "no_such_part."
    elif case == "not_a_model":
        model_dir = tmp_path / "empty"
        model_dir.mkdir()
    elif case == "out_exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    save_file(donor, str(source))
    if case == "corrupt_source":
        source.write_bytes(b"\x00" * 64)
    rc = script.main(["--model", str(model_dir), "--component", "mask_decoder", "--prefix", prefix,
                      "--source", str(source), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "Traceback" not in err
    if case == "out_exists":
        assert (out / "keep.txt").read_text() == "mine"
    else:
        assert not out.exists()
