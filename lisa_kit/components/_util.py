"""Small helpers shared by the built-in components."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(table)}")
    return table[name]


def read_json(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())


def hf_config_dict(config) -> dict:
    """A transformers config as a plain JSON-able dict (for lisa_kit's own checkpoints)."""
    d = config.to_dict()
    for k in ("transformers_version", "_name_or_path", "architectures", "torch_dtype", "dtype"):
        d.pop(k, None)
    return json.loads(json.dumps(d, default=str))


