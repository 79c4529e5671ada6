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

from lisa_kit.checkpoint.io import LoadReport, load_into, load_state_dict
from lisa_kit.errors import CheckpointError

_STRATEGY = {"default": "patch", "full": "cls_patch"}


def _read_config(path: Path) -> dict:
    if not (path / "config.json").exists():
        raise CheckpointError(f"not a checkpoint directory (no config.json): {path}")
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


def split_llava_state(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """LLaVA-HF keys (either layout) -> per-component state dicts."""
    parts: dict[str, dict[str, torch.Tensor]] = {"vision_encoder": {}, "projector": {}, "llm": {}, "unused": {}}
    proj = {"linear_1": "proj.0", "linear_2": "proj.2"}
    for k, v in state.items():
        key = k.removeprefix("model.") if k.startswith(("model.vision_tower.", "model.multi_modal_projector.",
                                                          "model.language_model.")) else k
        if key.startswith("vision_tower."):
            parts["vision_encoder"]["model." + key[len("vision_tower."):]] = v
        elif key.startswith("multi_modal_projector."):
            layer, _, rest = key[len("multi_modal_projector."):].partition(".")
            if layer not in proj:
                parts["unused"][k] = v
            else:
                parts["projector"][f"{proj[layer]}.{rest}"] = v
        elif key.startswith("language_model.model."):  # older layout
            parts["llm"]["model." + key[len("language_model.model."):]] = v
        elif key == "language_model.lm_head.weight" or key == "lm_head.weight":
            parts["llm"]["lm_head.weight"] = v
        elif key.startswith("language_model."):  # newer layout: the bare decoder
            parts["llm"]["model." + key[len("language_model."):]] = v
        else:
            parts["unused"][k] = v
    return parts


def _fit_vocab(parts: dict[str, torch.Tensor], model, n_base: int) -> None:
    """Resize the checkpoint's embedding rows to the model's vocabulary: the first
    ``n_base`` rows (the tokenizer's own tokens) are copied, added tokens get the mean."""
    n = model.llm.vocab_size
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        w = parts.get(key)
        if w is None or w.shape[0] == n:
            continue
        if w.shape[0] < n_base:
            raise CheckpointError(f"checkpoint has {w.shape[0]} embedding rows but its tokenizer {n_base} tokens",
                                  component="llm", key=key)
        new = w.new_empty(n, w.shape[1])
        new[:n_base] = w[:n_base]
        new[n_base:] = w[:n_base].float().mean(0).to(w.dtype)
        parts[key] = new


def load_llava_weights(model, path: str | Path, n_base_tokens: int, strict: bool = True) -> list[LoadReport]:
    """Load a LLaVA-HF directory's weights into the vision tower, projector and LLM."""
    state = load_state_dict(path)
    parts = split_llava_state(state)
    if parts["unused"] and strict:
        bad = sorted(parts["unused"])
        raise CheckpointError(f"keys that belong to no component: {bad[:5]}", key=bad[0], file=path)
    _fit_vocab(parts["llm"], model, n_base_tokens)
    llm = parts["llm"]
    if "lm_head.weight" not in llm and "model.embed_tokens.weight" in llm:
        # tied word embeddings (Qwen2-0.5B style bases): the checkpoint stores one matrix
        llm["lm_head.weight"] = llm["model.embed_tokens.weight"]
    ve = parts["vision_encoder"]
    ve = model.vision_encoder.normalize_keys(ve) if hasattr(model.vision_encoder, "normalize_keys") else ve
    return [
        load_into(model.vision_encoder, ve, "vision_encoder", strict),
        load_into(model.projector, parts["projector"], "projector", strict),
        load_into(model.llm.model, parts["llm"], "llm", strict),
    ]


def base_vocab_size(path: str | Path) -> int:
    """Number of tokens of the directory's own tokenizer (before lisa_kit adds any)."""
    from lisa_kit.tokenizer import load_tokenizer

    return len(load_tokenizer(Path(path)))
