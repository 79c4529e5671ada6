"""Safe state-dict I/O and loading with per-component reports."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lisa_kit.errors import CheckpointError


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """One file (``.safetensors`` or a torch pickle of tensors) or a HF directory with
    ``model.safetensors`` / ``pytorch_model.bin`` / sharded ``*.index.json``."""
    path = Path(path)
    if path.is_dir():
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (path / index).exists():
                weight_map = json.loads((path / index).read_text())["weight_map"]
                out: dict[str, torch.Tensor] = {}
                for shard in sorted(set(weight_map.values())):
                    out.update(load_state_dict(path / shard))
                return out
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (path / single).exists():
                return load_state_dict(path / single)
        raise CheckpointError(f"no weights in {path} (looked for model.safetensors, pytorch_model.bin and shard indexes)")
    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickles with code, corrupt files
        raise CheckpointError(f"cannot read {path} as a tensor checkpoint (weights_only): {e}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors")
    return sd


@dataclass
class LoadReport:
    component: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"{self.component}:"]
        if self.missing:
            parts.append(f"missing {len(self.missing)} keys (e.g. {', '.join(self.missing[:5])})")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)} keys (e.g. {', '.join(self.unexpected[:5])})")
        if len(parts) == 1:
            parts.append("all keys matched")
        return " ".join(parts)


def load_into(module: nn.Module, state: dict[str, torch.Tensor], component: str, strict: bool = True) -> LoadReport:
    """Copy ``state`` into ``module``; shapes must match (the error names the key);
    with ``strict`` any missing or unexpected key is an error naming the component."""
    own = module.state_dict()
    for k, v in state.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise CheckpointError(f"shape mismatch for {component}.{k}: checkpoint {tuple(v.shape)}, "
                                  f"model {tuple(own[k].shape)}", component=component, key=k)
    result = module.load_state_dict(state, strict=False)
    report = LoadReport(component, sorted(result.missing_keys), sorted(result.unexpected_keys))
    if strict and (report.missing or report.unexpected):
        raise CheckpointError(f"checkpoint does not fit {report}", component=component,
                              key=(report.missing or report.unexpected)[0])
    return report


def save_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Atomic: written to a temporary name, then renamed. Tensors that share memory (tied
    embeddings) are stored as separate copies, which loads back into the tied module."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        v = v.detach().cpu()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone().contiguous() if ptr in seen else v.contiguous()
        seen.add(ptr)
    save_file(out, str(tmp))
    os.replace(tmp, path)
