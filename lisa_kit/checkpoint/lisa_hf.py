"""Import released LISA checkpoints (``xinlai/LISA-7B-v1`` style HF directories) and
LISA training checkpoints with peft prefixes.

A released directory holds ``config.json`` (``model_type: llava``, LISA's fields),
``pytorch_model*.bin`` or ``*.safetensors`` (possibly sharded) and the tokenizer; the
CLIP tower is *not* inside: it is resolved from ``vision_tower`` (relative to the
checkpoint, or absolute) or given explicitly. The checkpoint's layout::

    model.embed_tokens / model.layers / model.norm / lm_head   -> llm
    model.mm_projector.*                                       -> projector
    model.visual_model.{image_encoder,prompt_encoder,mask_decoder}.* -> mask_decoder (SAM)
    model.text_hidden_fcs.0.{0,2}.*                            -> seg_head
    model.vision_tower.*  (only in some training dumps)        -> vision_encoder
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from lisa_kit.checkpoint.io import LoadReport, load_into, load_state_dict
from lisa_kit.errors import CheckpointError

# LLaMA config fields LISA's config.json carries (model_type "llava" = original LLaVA).
_LLAMA_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "vocab_size", "hidden_act",
                 "rope_scaling", "rope_theta", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                 "pad_token_id", "initializer_range", "attention_bias", "pretraining_tp")


def _resolve_tower(ckpt: Path, cfg: dict, vision_tower: str | None) -> Path:
    name = vision_tower or cfg.get("vision_tower") or cfg.get("mm_vision_tower")
    if not name:
        raise CheckpointError(f"{ckpt}/config.json names no vision tower; pass vision_tower=<CLIP dir>",
                              component="vision_encoder")
    for cand in (Path(name), ckpt / name, ckpt.parent / name):
        if cand.is_dir():
            return cand
    raise CheckpointError(
        f"vision tower {name!r} is not a local directory (looked in ., {ckpt}, {ckpt.parent}); download it "
        f"(e.g. openai/clip-vit-large-patch14) and pass vision_tower=<dir>", component="vision_encoder")


def lisa_recipe(path: str | Path, vision_tower: str | None = None, sam: str | dict | None = None,
                seg_hidden: str = "previous") -> dict:
    """The recipe (plain dict) of a released LISA checkpoint, derived from its config.

    ``sam``: ``vit_h`` (LISA's default), ``vit_l``/``vit_b``, a dict of SAM sizes, or the
    path of a JSON file of them (the tiny fixture's ``sam_tiny_config.json``)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"not a checkpoint directory (no config.json): {path}")
    cfg = json.loads((path / "config.json").read_text())
    llm_cfg = {"model_type": "llama", **{k: cfg[k] for k in _LLAMA_FIELDS if k in cfg and cfg[k] is not None}}
    if isinstance(sam, (str, Path)) and str(sam).endswith(".json"):
        sam = json.loads(Path(sam).read_text())
    if isinstance(sam, dict):
        sam_node = {"name": "sam", "variant": "custom", "config": {k: v for k, v in sam.items()}}
    else:
        sam_node = {"name": "sam", "variant": sam or "vit_h"}
    projector_type = cfg.get("mm_projector_type", "linear")
    return {
        "name": f"lisa-import:{path.name}",
        "model": {
            "vision_encoder": {"name": "hf_clip", "pretrained": str(_resolve_tower(path, cfg, vision_tower)),
                               "select_layer": cfg.get("mm_vision_select_layer", -2),
                               "select_feature": cfg.get("mm_vision_select_feature", "patch")},
            "projector": {"name": "mlp2x_gelu" if projector_type == "mlp2x_gelu" else "linear"},
            "llm": {"name": "hf_causal_lm", "config": llm_cfg, "tokenizer": str(path)},
            "mask_decoder": sam_node,
            "fusion": {"name": "llava_splice", "use_im_start_end": bool(cfg.get("mm_use_im_start_end", True))},
            "seg_head": {"name": "mlp2", "out_dim": cfg.get("out_dim", 256)},
            "seg_token": "[SEG]",
            "seg_hidden": seg_hidden,
        },
        "weights": {"format": "lisa_hf", "path": str(path)},
    }


def merge_peft(state: dict[str, torch.Tensor], lora_alpha: float = 16, lora_r: int | None = None) -> dict[str, torch.Tensor]:
    """Strip ``base_model.model.`` and fold ``lora_A``/``lora_B`` into their base weights
    (``W += B @ A * alpha / r``; ``r`` read from the A matrix when not given)."""
    out: dict[str, torch.Tensor] = {}
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        k = k.removeprefix("base_model.model.")
        m = re.match(r"(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$", k)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = v
        else:
            out[k.replace(".base_layer.", ".")] = v
    for mod, ab in lora.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"LoRA pair incomplete for {mod}", key=mod)
        w = out.get(mod + ".weight")
        if w is None:
            raise CheckpointError(f"LoRA weights for {mod} but no base weight", key=mod + ".weight")
        r = lora_r or ab["A"].shape[0]
        out[mod + ".weight"] = (w.float() + (ab["B"].float() @ ab["A"].float()) * (lora_alpha / r)).to(w.dtype)
    return out


def split_lisa_state(state: dict[str, torch.Tensor], projector_name: str = "linear") -> dict[str, dict[str, torch.Tensor]]:
    """Released-LISA keys -> per-component state dicts in each component's own layout."""
    parts: dict[str, dict[str, torch.Tensor]] = {k: {} for k in ("llm", "projector", "mask_decoder", "seg_head",
                                                                   "vision_encoder", "unused")}
    for k, v in state.items():
        if k.startswith("model.mm_projector."):
            rest = k[len("model.mm_projector."):]
            parts["projector"]["proj." + rest] = v
        elif k.startswith("model.visual_model."):
            parts["mask_decoder"][k[len("model.visual_model."):]] = v
        elif k.startswith("model.text_hidden_fcs.0."):
            parts["seg_head"]["layers." + k[len("model.text_hidden_fcs.0."):]] = v
        elif k.startswith("model.vision_tower.vision_tower."):
            parts["vision_encoder"]["model." + k[len("model.vision_tower.vision_tower."):]] = v
        elif k.endswith("rotary_emb.inv_freq"):
            parts["unused"][k] = v  # a persistent buffer in transformers 4.31, recomputed now
        elif k.startswith(("model.", "lm_head.")):
            parts["llm"][k] = v  # LlamaForCausalLM's own layout
        else:
            parts["unused"][k] = v
    return parts


def load_lisa_weights(model, path: str | Path, lora_alpha: float = 16, lora_r: int | None = None,
                      strict: bool = True) -> list[LoadReport]:
    """Load a LISA checkpoint's weights into a built model; one report per component."""
    state = load_state_dict(path)
    if any(k.startswith("base_model.model.") or ".lora_A" in k for k in state):
        state = merge_peft(state, lora_alpha=lora_alpha, lora_r=lora_r)
    parts = split_lisa_state(state)
    if parts["unused"] and any(not k.endswith("inv_freq") for k in parts["unused"]):
        bad = sorted(k for k in parts["unused"] if not k.endswith("inv_freq"))
        if strict:
            raise CheckpointError(f"keys that belong to no component: {bad[:5]}", key=bad[0])
    vocab = parts["llm"].get("model.embed_tokens.weight")
    if vocab is not None and vocab.shape[0] != model.llm.vocab_size:
        raise CheckpointError(f"checkpoint vocabulary {vocab.shape[0]} != tokenizer size {model.llm.vocab_size}",
                              component="llm", key="model.embed_tokens.weight")
    # A decoder in another layout renames SAM's keys itself (transformers' SAM); one that
    # cannot use them at all (SAM2: its weights come from its own `pretrained`) returns None.
    md = parts["mask_decoder"]
    md = model.mask_decoder.normalize_keys(md) if hasattr(model.mask_decoder, "normalize_keys") else md
    reports = [
        load_into(model.llm.model, parts["llm"], "llm", strict),
        load_into(model.projector, parts["projector"], "projector", strict),
        *([] if md is None else [load_into(model.mask_decoder, md, "mask_decoder", strict)]),
        load_into(model.seg_head, parts["seg_head"], "seg_head", strict),
    ]
    if parts["vision_encoder"]:
        ve = parts["vision_encoder"]
        ve = model.vision_encoder.normalize_keys(ve) if hasattr(model.vision_encoder, "normalize_keys") else ve
        reports.append(load_into(model.vision_encoder, ve, "vision_encoder", strict))
    return reports


def import_lisa_hf(path: str | Path, vision_tower: str | None = None, sam: str | dict | None = None,
                   seg_hidden: str = "previous", registry=None):
    """Build the reference recipe for a released LISA checkpoint and load its weights."""
    from lisa_kit.builder import build_model

    if sam is None and (Path(path) / "sam_config.json").exists():  # written by lisa_kit's export
        sam = str(Path(path) / "sam_config.json")
    recipe = lisa_recipe(path, vision_tower=vision_tower, sam=sam, seg_hidden=seg_hidden)
    model = build_model(recipe, registry)
    load_lisa_weights(model, path)
    return model
