"""Start from a transformers LLaVA checkpoint (``llava-hf/llava-1.5-7b-hf`` style).

A ``LlavaForConditionalGeneration`` directory holds the CLIP tower, the LLaVA-1.5
projector and the LLM in one state dict, in one of two layouts::

    transformers >= 4.52                      older saves
    model.vision_tower.*                      vision_tower.*                 -> vision_encoder (hf_clip)
    model.multi_modal_projector.linear_{1,2}  multi_modal_projector.*         -> projector (mlp2x_gelu)
    model.language_model.*                    language_model.model.*          -> llm (hf_causal_lm)
    lm_head.weight                            language_model.lm_head.weight   -> llm

:func:`llava_recipe` derives the three component nodes from ``config.json`` and
``preprocessor_config.json``; the mask decoder and seg head come from the user's recipe
(LISA trains them on top: the paper's LLaVA-1.5 rows). The tokenizer is the directory's.

LLaVA-HF pads its embedding matrix (32064 rows for 32002 tokens); lisa_kit sizes the
vocabulary to the tokenizer plus its own added tokens, copies the rows of the
tokenizer's tokens and starts each added token (``[SEG]``...) at the mean of the
loaded rows, so a new token starts as an "average" token instead of a random one.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from lisa_kit.checkpoint.io import LoadReport, Placer, component_dtype, estimate_bytes, iter_tensors
from lisa_kit.checkpoint.safe import refuse_remote_code
from lisa_kit.errors import CheckpointError

_STRATEGY = {"default": "patch", "full": "cls_patch"}


def _read_config(path: Path) -> dict:
    if not (path / "config.json").exists():
        raise CheckpointError(f"not a checkpoint directory (no config.json): {path}")
    refuse_remote_code(path)
    cfg = json.loads((path / "config.json").read_text())
    if cfg.get("model_type") != "llava" or "text_config" not in cfg:
        raise CheckpointError(f"{path}/config.json is not a transformers LLaVA config (model_type "
                              f"{cfg.get('model_type')!r}); released LISA checkpoints use weights.format: lisa_hf",
                              key="model_type", file=path / "config.json")
    return cfg


def llava_recipe(path: str | Path) -> dict:
    """Component nodes (vision_encoder, projector, llm) of a LLaVA-HF directory."""
    path = Path(path)
    cfg = _read_config(path)
    vision = dict(cfg.get("vision_config") or {})
    if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise CheckpointError(f"LLaVA vision tower {vision.get('model_type')!r} is not supported by hf_clip",
                              component="vision_encoder", file=path / "config.json")
    layer = cfg.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise CheckpointError("several vision_feature_layer values are not supported", key="vision_feature_layer",
                              file=path / "config.json")
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if strategy not in _STRATEGY:
        raise CheckpointError(f"unknown vision_feature_select_strategy {strategy!r}",
                              key="vision_feature_select_strategy", file=path / "config.json")
    pre = {}
    if (path / "preprocessor_config.json").exists():
        pre = json.loads((path / "preprocessor_config.json").read_text())
    size, crop = pre.get("size", {}), pre.get("crop_size", {})
    vnode = {"name": "hf_clip", "config": vision, "select_layer": layer, "select_feature": _STRATEGY[strategy]}
    if pre:
        vnode.update(image_size=size.get("shortest_edge") if isinstance(size, dict) else size,
                     crop_size=crop.get("height") if isinstance(crop, dict) else crop,
                     mean=pre.get("image_mean"), std=pre.get("image_std"))
    act = cfg.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"projector activation {act!r}: only LLaVA-1.5's gelu MLP is supported",
                              key="projector_hidden_act", file=path / "config.json")
    text = {k: v for k, v in cfg["text_config"].items() if k not in ("architectures", "_name_or_path")}
    text.setdefault("model_type", "llama")
    return {
        "vision_encoder": {k: v for k, v in vnode.items() if v is not None},
        "projector": {"name": "mlp2x_gelu"},
        "llm": {"name": "hf_causal_lm", "config": text, "tokenizer": str(path)},
    }


# The components a LLaVA-HF directory holds.
LLAVA_PARTS = ("vision_encoder", "projector", "llm")
_PROJ = {"linear_1": "proj.0", "linear_2": "proj.2"}


def route_llava_key(k: str) -> tuple[str, str]:
    """A LLaVA-HF key (either layout) -> ``(part, key in that component's layout)``;
    ``part`` is a component kind or ``unused``."""
    key = k.removeprefix("model.") if k.startswith(("model.vision_tower.", "model.multi_modal_projector.",
                                                      "model.language_model.")) else k
    if key.startswith("vision_tower."):
        return "vision_encoder", "model." + key[len("vision_tower."):]
    if key.startswith("multi_modal_projector."):
        layer, _, rest = key[len("multi_modal_projector."):].partition(".")
        return ("projector", f"{_PROJ[layer]}.{rest}") if layer in _PROJ else ("unused", k)
    if key.startswith("language_model.model."):  # older layout
        return "llm", "model." + key[len("language_model.model."):]
    if key in ("language_model.lm_head.weight", "lm_head.weight"):
        return "llm", "lm_head.weight"
    if key.startswith("language_model."):  # newer layout: the bare decoder
        return "llm", "model." + key[len("language_model."):]
    return "unused", k


def split_llava_state(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """LLaVA-HF keys (either layout) -> per-component state dicts."""
    parts: dict[str, dict[str, torch.Tensor]] = {"vision_encoder": {}, "projector": {}, "llm": {}, "unused": {}}
    for k, v in state.items():
        part, key = route_llava_key(k)
        parts[part][key] = v
    return parts


def _fit_rows(key: str, w: torch.Tensor, model, n_base: int) -> torch.Tensor:
    """Resize a checkpoint embedding matrix to the model's vocabulary: the first ``n_base``
    rows (the tokenizer's own tokens) are copied, added tokens get their mean."""
    n = model.llm.vocab_size
    if w.shape[0] == n:
        return w
    if w.shape[0] < n_base:
        raise CheckpointError(f"checkpoint has {w.shape[0]} embedding rows but its tokenizer {n_base} tokens",
                              component="llm", key=key)
    new = w.new_empty(n, w.shape[1])
    new[:n_base] = w[:n_base]
    new[n_base:] = w[:n_base].float().mean(0).to(w.dtype)
    return new


def _fit_vocab(parts: dict[str, torch.Tensor], model, n_base: int) -> None:
    """:func:`_fit_rows` for the embedding and output matrices of a state dict, in place."""
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if parts.get(key) is not None:
            parts[key] = _fit_rows(key, parts[key], model, n_base)


def llava_bytes(path: str | Path, dtype: torch.dtype | None = None) -> int:
    """Bytes the directory's tensors take once loaded at ``dtype`` (float32 without one)."""
    return estimate_bytes(path, lambda k: component_dtype(route_llava_key(k)[0], dtype) or torch.float32)


def load_llava_weights(model, path: str | Path, n_base_tokens: int, strict: bool = True,
                       dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> list[LoadReport]:
    """Load a LLaVA-HF directory's weights into the vision tower, projector and LLM (built
    normally or without memory), one tensor at a time, each cast once to ``dtype`` and
    placed on ``device``."""
    path = Path(path)
    targets = {"vision_encoder": model.vision_encoder, "projector": model.projector, "llm": model.llm.model}
    placers = {kind: Placer(mod, kind, dtype=component_dtype(kind, dtype), device=device, file=path)
               for kind, mod in targets.items()}
    unused: list[str] = []
    embed = None
    for k, v, f in iter_tensors(path):
        part, key = route_llava_key(k)
        if part == "unused":
            unused.append(k)
            continue
        if part == "vision_encoder" and hasattr(model.vision_encoder, "normalize_keys"):
            (key,) = model.vision_encoder.normalize_keys({key: v})  # CLIP's renaming is per key
        if part == "llm" and key in ("model.embed_tokens.weight", "lm_head.weight"):
            v = _fit_rows(key, v, model, n_base_tokens)
            if key == "model.embed_tokens.weight":
                embed = v
        placers[part].put(key, v, f)
    if unused and strict:
        bad = sorted(unused)
        raise CheckpointError(f"keys that belong to no component: {bad[:5]}", key=bad[0], file=path)
    llm = placers["llm"]
    if "lm_head.weight" in llm.expected and "lm_head.weight" not in llm.seen and embed is not None:
        # tied word embeddings (Qwen2-0.5B style bases): the checkpoint stores one matrix
        llm.put("lm_head.weight", embed.clone())
    reports = [placers[kind].finish(strict) for kind in LLAVA_PARTS]
    if device is not None:
        model.to(device)  # buffers; the parameters are there already
    return reports


def base_vocab_size(path: str | Path) -> int:
    """Number of tokens of the directory's own tokenizer (before lisa_kit adds any)."""
    from lisa_kit.tokenizer import load_tokenizer

    return len(load_tokenizer(Path(path)))
