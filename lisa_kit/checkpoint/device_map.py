"""Spreading a model larger than one accelerator over several: the LLM's decoder layers
go to the devices in order, everything else (vision tower, projector, mask decoder, seg
head, the LLM's embeddings, final norm and output head) stays on the first device.

The plan is settled before any weight is read, from sizes known without memory (the
checkpoint's headers and the LLM built on the ``meta`` device) and each device's free
memory (:func:`plan_layers`, a pure function: sizes and capacities in, placement out). The
weights are then read straight onto their planned devices (:class:`Placement` gives each
tensor its device) and accelerate's hooks -- the ones transformers' own
``from_pretrained(device_map=...)`` installs -- move the hidden states between layers.

``device_map`` (``Segmenter.from_checkpoint(..., device_map=...)``, CLI ``--device-map``):

* ``"auto"``: fill the visible CUDA devices in order, each up to its free memory;
* ``"balanced"``: about the same bytes on each visible CUDA device;
* a mapping (or its JSON text) of device -> the most it may hold, in bytes or with a unit
  (``{"cuda:0": "20GiB", "cuda:1": "40GiB"}``, like accelerate's ``max_memory``): planned
  as ``auto`` over those devices, in the given order.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lisa_kit.errors import InputError, InsufficientMemoryError

MODES = ("auto", "balanced")
# Part of each device's free memory left for what the weights do not count: activations,
# the KV cache, the CUDA context's own growth (transformers' `infer_auto_device_map` keeps
# a similar margin).
HEADROOM = 0.1
_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}
_GIB = 2 ** 30


def _gib(n: int) -> str:
    return f"{n / _GIB:.2f} GiB"


def plan_layers(first_bytes: int, layer_bytes: Sequence[int], capacities: Sequence[tuple[str, int]],
                mode: str = "auto") -> list[str]:
    """The device of each decoder layer, in order (layers stay contiguous per device).

    ``first_bytes``: what must sit on the first device (every part but the decoder layers);
    ``layer_bytes``: the bytes of each layer; ``capacities``: ``(device, bytes it may
    hold)`` in placement order. ``auto`` fills each device before the next; ``balanced``
    aims at the same load on each (falling back to ``auto`` when that cannot fit).
    Raises :class:`InsufficientMemoryError` naming what does not fit."""
    if mode not in MODES:
        raise InputError(f"unknown device map mode {mode!r}; use {', '.join(MODES)} or a JSON of device capacities")
    if not capacities:
        raise InputError("a device map needs at least one device")
    first, cap0 = capacities[0]
    if first_bytes > cap0:
        raise InsufficientMemoryError(
            f"the parts placed on the first device ({first}: vision tower, projector, mask decoder, seg head, the "
            f"LLM's embeddings and head) need {_gib(first_bytes)} but it may hold {_gib(cap0)}")
    if mode == "balanced":
        total = first_bytes + sum(layer_bytes)
        share = total / len(capacities)
        # Every device but the last stops at its share; the last takes what is left.
        limits = [min(c, max(share, first_bytes if i == 0 else 0)) for i, (_, c) in enumerate(capacities[:-1])]
        placed = _fill(first_bytes, layer_bytes, [*limits, capacities[-1][1]])
        if placed is not None:
            return [capacities[i][0] for i in placed]
    placed = _fill(first_bytes, layer_bytes, [c for _, c in capacities])
    if placed is None:
        free = sum(c for _, c in capacities) - first_bytes
        raise InsufficientMemoryError(
            f"the LLM's {len(layer_bytes)} decoder layers need {_gib(sum(layer_bytes))} besides the "
            f"{_gib(first_bytes)} on {first}, but the devices ({', '.join(d for d, _ in capacities)}) may hold "
            f"{_gib(max(free, 0))} more in whole layers at most; add devices, free memory or use a lower precision")
    return [capacities[i][0] for i in placed]


def _fill(first_bytes: int, layer_bytes: Sequence[int], limits: Sequence[float]) -> list[int] | None:
    """Device index of each layer, filling the devices in order up to ``limits``; ``None``
    when the layers do not all fit."""
    out, dev, load = [], 0, float(first_bytes)
    for size in layer_bytes:
        while load + size > limits[dev]:
            dev, load = dev + 1, 0.0
            if dev == len(limits):
                return None
        out.append(dev)
        load += size
    return out


def parse_device_map(value) -> str | dict[str, int]:
    """``"auto"``/``"balanced"`` as they are; a mapping or its JSON text as ``{device: bytes}``
    (``"20GiB"``, ``"500MB"`` or a number of bytes). Bad input is an :class:`InputError`."""
    if isinstance(value, str) and value in MODES:
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise InputError(f"--device-map must be auto, balanced or a JSON object of device capacities "
                             f"(e.g. '{{\"cuda:0\": \"20GiB\", \"cuda:1\": \"40GiB\"}}'): {e}") from e
    if not isinstance(value, Mapping) or not value:
        raise InputError("a device map is auto, balanced or a non-empty mapping of device -> capacity")
    out = {}
    for dev, cap in value.items():
        try:
            torch.device(dev)
        except (RuntimeError, TypeError) as e:
            raise InputError(f"device map: {dev!r} is not a device") from e
        out[str(dev)] = _bytes(cap, dev)
    return out


def _bytes(cap, dev) -> int:
    if isinstance(cap, bool):
        raise InputError(f"device map: the capacity of {dev} must be bytes or a size like '20GiB', got {cap!r}")
    if isinstance(cap, (int, float)) and cap >= 0:
        return int(cap)
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(cap))
    if m is None or m.group(2).upper() not in _UNITS:
        raise InputError(f"device map: the capacity of {dev} must be bytes or a size like '20GiB', got {cap!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def capacities_for(spec: str | dict[str, int]) -> tuple[list[tuple[str, int]], str]:
    """``([(device, bytes)], mode)``: a capacity mapping as given (planned ``auto``), else the
    visible CUDA devices with their free memory less :data:`HEADROOM`."""
    if isinstance(spec, dict):
        return list(spec.items()), "auto"
    from lisa_kit.checkpoint.io import available_bytes

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        raise InputError(f"--device-map {spec} spreads the model over CUDA devices and none is visible; give a JSON "
                         "of device capacities to plan over others")
    caps = []
    for i in range(torch.cuda.device_count()):
        dev = f"cuda:{i}"
        caps.append((dev, int((available_bytes(dev) or 0) * (1 - HEADROOM))))
    return caps, spec


def tensor_bytes(module: nn.Module, dtype_for: Callable[[str, torch.Tensor], torch.dtype]) -> int:
    """Bytes of ``module``'s state (parameters and persistent buffers, meta or not), each
    floating tensor counted at ``dtype_for(key, tensor)``."""
    total, seen = 0, set()
    for k, t in module.state_dict(keep_vars=True).items():
        if id(t) in seen:  # tied embeddings: one tensor under two names
            continue
        seen.add(id(t))
        dt = dtype_for(k, t) if t.is_floating_point() else t.dtype
        total += t.numel() * dt.itemsize
    return total


def decoder_layers(hf_model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(name inside hf_model, the ModuleList)`` of a transformers causal LM's decoder layers."""
    decoder = hf_model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList):
        for name, mod in hf_model.named_modules():
            if mod is layers:
                return name, layers
    raise InputError(f"{type(hf_model).__name__} has no list of decoder layers a device map can spread")


def hf_device_map(hf_model: nn.Module, layer_devices: Sequence[str], first: str) -> dict[str, str]:
    """A transformers/accelerate ``device_map`` of ``hf_model``: decoder layer ``i`` on
    ``layer_devices[i]``, every other module on ``first`` (the map covers every tensor)."""
    name, layers = decoder_layers(hf_model)
    if len(layers) != len(layer_devices):
        raise InputError(f"the plan places {len(layer_devices)} layers, the model has {len(layers)}")
    out: dict[str, str] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            full = f"{prefix}{child_name}"
            if full == name:
                out.update({f"{full}.{i}": dev for i, dev in enumerate(layer_devices)})
            elif name.startswith(full + "."):
                walk(child, full + ".")
            else:
                out[full] = first
        # Tensors held by an ancestor of the layers itself (rare): on the first device too.
        for tname in [*module._parameters, *module._buffers]:
            out[f"{prefix}{tname}"] = first

    walk(hf_model, "")
    return out


@dataclass
class Placement:
    """Where each part of a model goes: ``first`` holds all but the LLM's decoder layers,
    whose devices ``llm_map`` (a transformers ``device_map`` of the LLM's HF model) gives."""

    first: torch.device
    llm_map: dict[str, str]

    def devices(self) -> list[torch.device]:
        return list(dict.fromkeys([self.first, *(torch.device(d) for d in self.llm_map.values())]))

    def device_for(self, target: nn.Module, hf_model: nn.Module | None) -> Callable[[str], torch.device]:
        """``key -> device`` for the state-dict keys of ``target`` (a component, or the LLM's HF
        model itself): keys inside ``hf_model`` by the longest entry of ``llm_map``, others
        on ``first``."""
        prefix = None
        if hf_model is not None:
            prefix = next((f"{n}." if n else "" for n, m in target.named_modules() if m is hf_model), None)
        entries = sorted(self.llm_map.items(), key=lambda kv: -len(kv[0]))

        def device(key: str) -> torch.device:
            if prefix is None or not key.startswith(prefix):
                return self.first
            inner = key[len(prefix):]
            for name, dev in entries:
                if inner == name or inner.startswith(name + "."):
                    return torch.device(dev)
            return self.first

        return device

    def dispatch(self, model) -> None:
        """Install the placement on a loaded :class:`~lisa_kit.model.LisaModel`: the LLM
        through accelerate's ``dispatch_model`` (as transformers does for its own
        ``device_map``: hooks move each layer's inputs to its device; the cache is left where
        each layer writes it), the other components moved to ``first``."""
        from accelerate import dispatch_model

        from lisa_kit.interfaces import KINDS

        for kind in KINDS:
            if kind != "llm":
                getattr(model, kind).to(self.first)
        for extra in ("seg_layers",):
            mod = getattr(model, extra, None)
            if isinstance(mod, nn.Module):
                mod.to(self.first)
        hf = model.llm.model
        skip = getattr(hf, "_skip_keys_device_placement", None)
        dispatch_model(hf, device_map=self.llm_map, main_device=self.first,
                       skip_keys=sorted(skip) if skip else None)


def plan(llm_meta, other_bytes: int, dtype_for: Callable[[str, torch.Tensor], torch.dtype],
         spec: str | dict[str, int], llm_bytes: int | None = None) -> Placement:
    """A :class:`Placement` for a model whose LLM component ``llm_meta`` (built on the meta
    device) is spread by ``spec`` (see :func:`parse_device_map`); ``other_bytes``: the
    bytes of every other component, estimated from checkpoint headers; ``llm_bytes``: the
    LLM's, when the headers tell them (its vocabulary as stored; else counted on the meta
    LLM). ``dtype_for(key, tensor)``: the dtype a tensor of the LLM's HF model is loaded in."""
    caps, mode = capacities_for(spec)
    hf = llm_meta.model
    name, layers = decoder_layers(hf)
    sizes = [tensor_bytes(layer, lambda k, t, i=i: dtype_for(f"{name}.{i}.{k}", t)) for i, layer in enumerate(layers)]
    first_llm = (llm_bytes if llm_bytes is not None else tensor_bytes(hf, dtype_for)) - sum(sizes)
    devices = plan_layers(other_bytes + first_llm, sizes, caps, mode)
    first = caps[0][0]
    return Placement(torch.device(first), hf_device_map(hf, devices, first))
