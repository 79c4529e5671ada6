"""The seg head: LLM hidden state at ``[SEG]`` -> mask prompt, ``(K, D) -> (K, P)``.

LISA's ``text_hidden_fcs``: Linear(D, D) - ReLU - Linear(D, P) - Dropout.
"""
from __future__ import annotations

from torch import nn

import lisa_kit
from lisa_kit.interfaces import ComponentSpec, SegHead


class MLP2SegHead(SegHead):
    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.in_dim, self.out_dim, self.dropout = in_dim, out_dim, dropout
        self.layers = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(), nn.Linear(in_dim, out_dim),
                                    nn.Dropout(dropout))

    def forward(self, x):
        return self.layers(x)

    def export_config(self) -> dict:
        return {"in_dim": self.in_dim, "out_dim": self.out_dim, "dropout": self.dropout}


def build_mlp2(in_dim: int, out_dim: int, dropout: float = 0.0) -> MLP2SegHead:
    return MLP2SegHead(in_dim, out_dim, dropout)


@lisa_kit.hookimpl
def lisa_kit_components():
    return [ComponentSpec("seg_head", "mlp2", build_mlp2, tiny={"in_dim": 64, "out_dim": 32},
                          derived=("in_dim", "out_dim"), description="Linear-ReLU-Linear (LISA text_hidden_fcs)")]
