"""The projectors' optional position table (``model.projector.positions``)."""
from __future__ import annotations

import pytest
import torch

from lisa_kit.builder import build_component
from lisa_kit.checkpoint.io import empty_weights
from lisa_kit.errors import InputError, RecipeError


@pytest.mark.parametrize("name", ["linear", "mlp2x_gelu"])
def test_positions_tell_equal_tokens_apart_and_round_trip(name):
    torch.manual_seed(0)
    proj = build_component("projector", {"name": name, "in_dim": 8, "out_dim": 16, "positions": 4})
    x = torch.randn(1, 1, 8).expand(2, 4, 8)  # the same feature at every position
    y = proj(x)
    assert y.shape == (2, 4, 16)
    # Without the table equal features project to equal tokens; with it they differ by place.
    assert not torch.allclose(y[0, 0], y[0, 1])
    assert torch.equal(y[0], y[1])
    assert proj.export_config()["positions"] == 4
    again = build_component("projector", {"name": name, **proj.export_config()})
    again.load_state_dict(proj.state_dict())
    assert torch.equal(again(x), y)


def test_without_positions_nothing_changes():
    proj = build_component("projector", {"name": "linear", "in_dim": 8, "out_dim": 16})
    assert "positions" not in proj.export_config() and "pos_embed" not in proj.state_dict()
    x = torch.randn(1, 1, 8).expand(1, 4, 8)
    assert torch.allclose(proj(x)[0, 0], proj(x)[0, 3])


def test_a_token_count_other_than_the_table_is_a_typed_error():
    proj = build_component("projector", {"name": "linear", "in_dim": 8, "out_dim": 16, "positions": 4})
    with pytest.raises(InputError, match="4 entries but the tower gave 9 tokens"):
        proj(torch.randn(1, 9, 8))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "64"])
def test_positions_must_be_a_positive_count(bad):
    with pytest.raises(RecipeError, match="positions"):
        build_component("projector", {"name": "linear", "in_dim": 8, "out_dim": 16, "positions": bad})


def test_built_without_memory():
    with empty_weights():
        proj = build_component("projector", {"name": "linear", "in_dim": 8, "out_dim": 16, "positions": 4})
    assert proj.pos_embed.is_meta
