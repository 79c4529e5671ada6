"""Projectors from vision features to the LLM's embedding space: ``(I, N, Dv) -> (I, N, D)``.

``linear`` is LISA's/LLaVA-v1's ``mm_projector``; ``mlp2x_gelu`` is LLaVA-1.5's
(Linear-GELU-Linear). Both sizes are derived from the tower and the LLM by the model
builder unless a recipe gives them.
"""
from __future__ import annotations

from torch import nn

import lisa_kit
from lisa_kit.interfaces import ComponentSpec, Projector


class LinearProjector(Projector):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x):
        return self.proj(x)

    def export_config(self) -> dict:
        return {"in_dim": self.in_dim, "out_dim": self.out_dim}


class MLPProjector(Projector):
    """``depth`` Linear layers with GELU between them (``mlp2x_gelu``: depth 2)."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2):
        super().__init__()
        self.in_dim, self.out_dim, self.depth = in_dim, out_dim, depth
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.proj = nn.Sequential(*layers)

    def forward(self, x):
        return self.proj(x)

    def export_config(self) -> dict:
        return {"in_dim": self.in_dim, "out_dim": self.out_dim, "depth": self.depth}


def build_linear(in_dim: int, out_dim: int) -> LinearProjector:
    return LinearProjector(in_dim, out_dim)


def build_mlp2x_gelu(in_dim: int, out_dim: int, depth: int = 2) -> MLPProjector:
    return MLPProjector(in_dim, out_dim, depth)


@lisa_kit.hookimpl
def lisa_kit_components():
    return [
        ComponentSpec("projector", "linear", build_linear, tiny={"in_dim": 32, "out_dim": 64},
                      derived=("in_dim", "out_dim"), description="nn.Linear (LISA, LLaVA v1)"),
        ComponentSpec("projector", "mlp2x_gelu", build_mlp2x_gelu, tiny={"in_dim": 32, "out_dim": 64},
                      derived=("in_dim", "out_dim"), description="Linear-GELU-Linear (LLaVA-1.5)"),
    ]
