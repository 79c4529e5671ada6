"""Example lisa_kit plugin: two components, registered through the ``lisa_kit`` entry point.

* seg head ``mlp3``: ``(K, D) -> (K, P)``, three Linear layers with ReLU between them;
* projector ``ln_mlp``: ``(I, N, Dv) -> (I, N, D)``, LayerNorm then Linear-GELU-Linear.

``in_dim`` and ``out_dim`` are derived by lisa_kit's builder from the connected
components (the LLM's hidden size, the mask decoder's prompt size, the tower's feature
size), so a recipe names only ``name`` and the other arguments.
"""
from __future__ import annotations

from torch import nn

import lisa_kit
from lisa_kit.interfaces import ComponentSpec, Projector, SegHead


class MLP3SegHead(SegHead):
    """Linear(D, H) - ReLU - Linear(H, H) - ReLU - Linear(H, P); ``hidden_dim`` H defaults to D."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.hidden_dim = hidden_dim or in_dim
        h = self.hidden_dim
        self.layers = nn.Sequential(nn.Linear(in_dim, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                                    nn.Linear(h, out_dim))

    def forward(self, x):
        return self.layers(x)

    def export_config(self) -> dict:
        # Everything needed to rebuild it: lisa_kit checkpoints store this next to the weights.
        return {"in_dim": self.in_dim, "out_dim": self.out_dim, "hidden_dim": self.hidden_dim}


class LayerNormMLPProjector(Projector):
    """LayerNorm(Dv) - Linear(Dv, D) - GELU - Linear(D, D)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim), nn.GELU(),
                                  nn.Linear(out_dim, out_dim))

    def forward(self, x):
        return self.proj(x)

    def export_config(self) -> dict:
        return {"in_dim": self.in_dim, "out_dim": self.out_dim}


def build_mlp3(in_dim: int, out_dim: int, hidden_dim: int | None = None) -> MLP3SegHead:
    return MLP3SegHead(in_dim, out_dim, hidden_dim)


def build_ln_mlp(in_dim: int, out_dim: int) -> LayerNormMLPProjector:
    return LayerNormMLPProjector(in_dim, out_dim)


@lisa_kit.hookimpl
def lisa_kit_components():
    return [
        ComponentSpec("seg_head", "mlp3", build_mlp3, tiny={"in_dim": 64, "out_dim": 32, "hidden_dim": 48},
                      derived=("in_dim", "out_dim"), description="three-layer MLP seg head (example plugin)"),
        ComponentSpec("projector", "ln_mlp", build_ln_mlp, tiny={"in_dim": 32, "out_dim": 64},
                      derived=("in_dim", "out_dim"), description="LayerNorm + Linear-GELU-Linear (example plugin)"),
    ]
