"""Projectors from vision features to the LLM's embedding space: ``(I, N, Dv) -> (I, N, D)``.

``linear`` is LISA's/LLaVA-v1's ``mm_projector``; ``mlp2x_gelu`` is LLaVA-1.5's
(Linear-GELU-Linear). Both sizes are derived from the tower and the LLM by the model
builder unless a recipe gives them.

``positions: N`` (either projector) adds a learned position table ``(N, D)`` to the
projected tokens, as Honeybee's C-Abstractor does after its ResNet blocks: a CNN tower's
tokens carry no absolute position (a ViT's have its position embeddings), and a
language model reading them in raster order with 1-D rotary positions then has to work
out a token's row and column from its index. ``N`` is the tower's token count, fixed
(a square image grid); other counts are refused.
"""
from __future__ import annotations

import torch
from torch import nn

import lisa_kit
from lisa_kit.errors import InputError, RecipeError
from lisa_kit.interfaces import ComponentSpec, Projector

#: Initial spread of the position table: small next to the projected features, as ViTs
#: initialise theirs.
POSITION_INIT_STD = 0.02


class _Positions(Projector):
    """A projector's optional learned position table (see the module docstring)."""

    def _init_positions(self, positions: int | None, out_dim: int) -> None:
        if positions is not None and (isinstance(positions, bool) or not isinstance(positions, int) or positions < 1):
            raise RecipeError(f"projector positions must be a positive token count, got {positions!r}",
                              key="model.projector.positions")
        self.positions = positions
        self.pos_embed = None
        if positions is not None:
            self.pos_embed = nn.Parameter(torch.empty(positions, out_dim))
            nn.init.normal_(self.pos_embed, std=POSITION_INIT_STD)

    def _add_positions(self, y: torch.Tensor) -> torch.Tensor:
        """``y``: ``(I, N, D)`` -> ``y + pos_embed`` (``N`` must be ``positions``)."""
        if self.pos_embed is None:
            return y
        if y.shape[-2] != self.positions:
            raise InputError(f"the projector's position table has {self.positions} entries but the tower gave "
                             f"{y.shape[-2]} tokens (model.projector.positions must be the tower's token count)")
        return y + self.pos_embed.to(y.dtype)

    def _config(self) -> dict:
        return {} if self.positions is None else {"positions": self.positions}


class LinearProjector(_Positions):
    def __init__(self, in_dim: int, out_dim: int, positions: int | None = None):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.proj = nn.Linear(in_dim, out_dim)
        self._init_positions(positions, out_dim)

    def forward(self, x):
        return self._add_positions(self.proj(x))

    def export_config(self) -> dict:
        return {"in_dim": self.in_dim, "out_dim": self.out_dim, **self._config()}


class MLPProjector(_Positions):
    """``depth`` Linear layers with GELU between them (``mlp2x_gelu``: depth 2)."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2, positions: int | None = None):
        super().__init__()
        self.in_dim, self.out_dim, self.depth = in_dim, out_dim, depth
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.proj = nn.Sequential(*layers)
        self._init_positions(positions, out_dim)

    def forward(self, x):
        return self._add_positions(self.proj(x))

    def export_config(self) -> dict:
        return {"in_dim": self.in_dim, "out_dim": self.out_dim, "depth": self.depth, **self._config()}


def build_linear(in_dim: int, out_dim: int, positions: int | None = None) -> LinearProjector:
    return LinearProjector(in_dim, out_dim, positions)


def build_mlp2x_gelu(in_dim: int, out_dim: int, depth: int = 2, positions: int | None = None) -> MLPProjector:
    return MLPProjector(in_dim, out_dim, depth, positions)


@lisa_kit.hookimpl
def lisa_kit_components():
    return [
        ComponentSpec("projector", "linear", build_linear, tiny={"in_dim": 32, "out_dim": 64},
                      derived=("in_dim", "out_dim"), description="nn.Linear (LISA, LLaVA v1)"),
        ComponentSpec("projector", "mlp2x_gelu", build_mlp2x_gelu, tiny={"in_dim": 32, "out_dim": 64},
                      derived=("in_dim", "out_dim"), description="Linear-GELU-Linear (LLaVA-1.5)"),
    ]
