"""The seg head: LLM hidden state at ``[SEG]`` -> mask prompt, ``(K, D) -> (K, P)``.

LISA's ``text_hidden_fcs``: Linear(D, D) - ReLU - Linear(D, P) - Dropout. ``none``: no
head, for ``model.prompt_strategy: text_geometry`` (the answer's text prompts the decoder).
"""
from __future__ import annotations

import torch
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


class NoSegHead(SegHead):
    """No seg head: for ``prompt_strategy: text_geometry``, where no ``[SEG]`` state prompts
    the decoder (the model never calls it; the recipe check refuses it with ``seg_token``).
    No parameters. ``forward((K, D))`` gives zeros ``(K, P)`` so the kind's contract holds."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.out_dim)

    def export_config(self) -> dict:
        return {"in_dim": self.in_dim, "out_dim": self.out_dim}


def build_none(in_dim: int, out_dim: int) -> NoSegHead:
    return NoSegHead(in_dim, out_dim)


@lisa_kit.hookimpl
def lisa_kit_components():
    return [ComponentSpec("seg_head", "mlp2", build_mlp2, tiny={"in_dim": 64, "out_dim": 32},
                          derived=("in_dim", "out_dim"), description="Linear-ReLU-Linear (LISA text_hidden_fcs)"),
            ComponentSpec("seg_head", "none", build_none, tiny={"in_dim": 64, "out_dim": 32},
                          derived=("in_dim", "out_dim"),
                          description="no seg head (prompt_strategy: text_geometry)")]
