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
from collections.abc import Callable
from pathlib import Path

import torch

from lisa_kit.checkpoint.device_map import Placement, plan
from lisa_kit.checkpoint.io import (LoadReport, Placer, checkpoint_keys, component_dtype, declared_class,
                                    ensure_memory, estimate_bytes, iter_tensors, load_state_dict, meta_keys,
                                    param_dtype)
from lisa_kit.checkpoint.safe import refuse_remote_code
from lisa_kit.errors import CheckpointError

# LLaMA config fields LISA's config.json carries (model_type "llava" = original LLaVA).
_LLAMA_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "vocab_size", "hidden_act",
                 "rope_scaling", "rope_theta", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                 "pad_token_id", "initializer_range", "attention_bias", "pretraining_tp")


# The components whose weights a released checkpoint holds (the CLIP tower is separate).
LISA_PARTS = ("llm", "projector", "mask_decoder", "seg_head")


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


def _read_json(f: Path) -> dict:
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {f.name}: {e}", file=f) from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{f.name} must hold a JSON object, not {type(data).__name__}", file=f)
    return data


def read_sam_config(f: Path) -> dict:
    """A ``sam_config.json`` (SAM's sizes, as lisa_kit's export writes it), checked against
    the SAM component's config keys: every problem is a :class:`CheckpointError` naming the file."""
    from lisa_kit.components.sam import sam_config

    cfg = _read_json(f)
    for k, v in cfg.items():
        items = v if isinstance(v, list) else [v]
        if not all(isinstance(x, (int, float)) for x in items):  # bool is an int: flags pass
            raise CheckpointError(f"{f.name}: {k} must be a number, a boolean or a list of numbers, not {v!r}",
                                  key=k, file=f)
    try:
        sam_config("custom", cfg)
    except ValueError as e:
        raise CheckpointError(f"{f.name}: {e}", file=f) from e
    return cfg


def lisa_recipe(path: str | Path, vision_tower: str | None = None, sam: str | dict | None = None,
                seg_hidden: str = "previous") -> dict:
    """The recipe (plain dict) of a released LISA checkpoint, derived from its config.

    ``sam``: ``vit_h`` (LISA's default), ``vit_l``/``vit_b``, a dict of SAM sizes, or the
    path of a JSON file of them (the tiny fixture's ``sam_tiny_config.json``)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"not a checkpoint directory (no config.json): {path}")
    refuse_remote_code(path)
    cfg = _read_json(path / "config.json")
    llm_cfg = {"model_type": "llama", **{k: cfg[k] for k in _LLAMA_FIELDS if k in cfg and cfg[k] is not None}}
    if isinstance(sam, (str, Path)) and str(sam).endswith(".json"):
        sam = read_sam_config(Path(sam))
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


def route_lisa_key(k: str) -> tuple[str, str]:
    """A released-LISA key -> ``(part, key in that component's layout)``; ``part`` is a
    component kind or ``unused``."""
    if k.startswith("model.mm_projector."):
        return "projector", "proj." + k[len("model.mm_projector."):]
    if k.startswith("model.visual_model."):
        return "mask_decoder", k[len("model.visual_model."):]
    if k.startswith("model.text_hidden_fcs.0."):
        return "seg_head", "layers." + k[len("model.text_hidden_fcs.0."):]
    if k.startswith("model.vision_tower.vision_tower."):
        return "vision_encoder", "model." + k[len("model.vision_tower.vision_tower."):]
    if k.endswith("rotary_emb.inv_freq"):
        return "unused", k  # a persistent buffer in transformers 4.31, recomputed now
    if k.startswith(("model.", "lm_head.")):
        return "llm", k  # LlamaForCausalLM's own layout
    return "unused", k


def split_lisa_state(state: dict[str, torch.Tensor], projector_name: str = "linear") -> dict[str, dict[str, torch.Tensor]]:
    """Released-LISA keys -> per-component state dicts in each component's own layout."""
    parts: dict[str, dict[str, torch.Tensor]] = {k: {} for k in ("llm", "projector", "mask_decoder", "seg_head",
                                                                   "vision_encoder", "unused")}
    for k, v in state.items():
        part, key = route_lisa_key(k)
        parts[part][key] = v
    return parts


def _is_peft(keys) -> bool:
    return any(k.startswith("base_model.model.") or ".lora_A" in k for k in keys)


def _targets(model) -> dict:
    return {"llm": model.llm.model, "projector": model.projector, "mask_decoder": model.mask_decoder,
            "seg_head": model.seg_head, "vision_encoder": model.vision_encoder}


def lisa_bytes(path: str | Path, dtype: torch.dtype | None = None, classes: dict | None = None,
               parts: Callable[[str], bool] = lambda part: True) -> int:
    """Bytes the checkpoint's tensors take once loaded at ``dtype`` (a load without ``dtype``,
    and the keys a component keeps, in float32 as the components are built); from headers
    only. ``classes``: kind -> what the recipe builds (:func:`~lisa_kit.checkpoint.io.declared_class`;
    missing: the kind's interface); ``parts``: which components' keys to count."""
    classes = classes or {}

    def dtype_for(k):
        part, key = route_lisa_key(k)
        owner = classes.get(part, declared_class(part, None))
        return param_dtype(owner, key, dtype) or torch.float32

    return estimate_bytes(path, dtype_for, keep=lambda k: parts(route_lisa_key(k)[0]))


def load_lisa_weights(model, path: str | Path, lora_alpha: float = 16, lora_r: int | None = None,
                      strict: bool = True, dtype: torch.dtype | None = None,
                      device: torch.device | str | None = None) -> list[LoadReport]:
    """Load a LISA checkpoint's weights into a built model (its components possibly built
    without memory), one tensor at a time, each cast once to ``dtype`` (but the keys a
    component keeps: :func:`~lisa_kit.checkpoint.io.param_dtype`) and placed on ``device``.
    Returns one report per component."""
    path = Path(path)
    if _is_peft(checkpoint_keys(path)):  # LoRA pairs may sit in different shards: merged in memory
        merged = merge_peft(load_state_dict(path), lora_alpha=lora_alpha, lora_r=lora_r)
        source = ((k, v, path) for k, v in merged.items())
    else:
        source = iter_tensors(path)
    targets = _targets(model)
    placement = device if isinstance(device, Placement) else None

    def where(mod):
        return placement.device_for(mod, model.llm.model) if placement else device

    placers = {kind: Placer(mod, kind, dtype=dtype, device=where(mod), file=path)
               for kind, mod in targets.items()}
    # A component that renames keys (transformers' SAM; CLIP 4.x/5.x layouts) sees its whole part at once.
    collected = {kind: {} for kind, mod in targets.items() if hasattr(mod, "normalize_keys")}
    unused: list[str] = []
    for k, v, f in source:
        part, key = route_lisa_key(k)
        if part == "unused":
            if not k.endswith("inv_freq"):
                unused.append(k)
            continue
        if part == "llm" and key == "model.embed_tokens.weight" and v.shape[0] != model.llm.vocab_size:
            raise CheckpointError(f"checkpoint vocabulary {v.shape[0]} != tokenizer size {model.llm.vocab_size}",
                                  component="llm", key=key, file=f)
        if part in collected:
            collected[part][key] = v
        else:
            placers[part].put(key, v, f)
    if unused and strict:
        bad = sorted(unused)
        raise CheckpointError(f"keys that belong to no component: {bad[:5]}", key=bad[0], file=path)
    loaded = ["llm", "projector", "mask_decoder", "seg_head"]
    for kind, state in collected.items():
        if not state:
            continue
        # A decoder that cannot use SAM's weights at all (SAM2: its weights come from its own
        # `pretrained`) returns None and stays as built.
        state = targets[kind].normalize_keys(state)
        if state is None:
            if meta_keys(targets[kind]):  # built empty, and nothing will fill it
                raise CheckpointError(f"the {kind} cannot take this checkpoint's SAM weights and names no weights of "
                                      "its own (give it `pretrained:`)", component=kind, file=path)
            loaded.remove(kind)
            continue
        for key, v in state.items():
            placers[kind].put(key, v)
    if "vision_encoder" not in loaded and placers["vision_encoder"].seen:
        loaded.append("vision_encoder")
    reports = [placers[kind].finish(strict) for kind in loaded]
    if placement is not None:
        placement.dispatch(model)
    elif device is not None:
        model.to(device)  # buffers; the parameters are there already
    return reports


def _lisa_needed(recipe: dict, path: str | Path, dtype: torch.dtype | None,
                 parts: Callable[[str], bool] = lambda part: True) -> int:
    """Bytes the checkpoint's parts accepted by ``parts`` and the CLIP tower it names take at ``dtype``."""
    classes = {kind: declared_class(kind, recipe["model"].get(kind)) for kind in LISA_PARTS}
    needed = lisa_bytes(path, dtype, classes, parts)
    tower = (recipe["model"]["vision_encoder"] or {}).get("pretrained")
    if tower and parts("vision_encoder"):
        try:
            needed += estimate_bytes(tower, lambda k: component_dtype("vision_encoder", dtype))
        except CheckpointError:
            pass  # no readable weights there: the tower's build reports it
    return needed


def ensure_lisa_memory(recipe: dict, path: str | Path, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> None:
    """Refuse (:class:`~lisa_kit.errors.InsufficientMemoryError`) before reading anything
    when the checkpoint and the CLIP tower it names will not fit ``device`` at ``dtype``."""
    ensure_memory(_lisa_needed(recipe, path, dtype), device, str(path))


def plan_lisa(recipe: dict, path: str | Path, dtype: torch.dtype | None, device_map, registry=None) -> Placement:
    """The multi-device :class:`~lisa_kit.checkpoint.device_map.Placement` of a LISA
    checkpoint, planned before anything is read (the LLM built on the meta device)."""
    from lisa_kit.builder import build_component

    llm = build_component("llm", recipe["model"]["llm"], registry, empty=True)
    return plan(llm, _lisa_needed(recipe, path, dtype, lambda part: part != "llm"),
                lambda k, t: param_dtype(llm.model, k, dtype) or t.dtype, device_map,
                llm_bytes=lisa_bytes(path, dtype, parts=lambda part: part == "llm"))


def import_lisa_hf(path: str | Path, vision_tower: str | None = None, sam: str | dict | None = None,
                   seg_hidden: str = "previous", registry=None, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None, device_map=None):
    """Build the reference recipe for a released LISA checkpoint and load its weights:
    the parts the checkpoint holds are built without memory and filled one tensor at a
    time in ``dtype`` on ``device`` (see :func:`load_lisa_weights`). ``device_map``
    (replaces ``device``): see :mod:`lisa_kit.checkpoint.device_map`."""
    from lisa_kit.builder import build_model

    if sam is None and (Path(path) / "sam_config.json").exists():  # written by lisa_kit's export
        sam = str(Path(path) / "sam_config.json")
    recipe = lisa_recipe(path, vision_tower=vision_tower, sam=sam, seg_hidden=seg_hidden)
    if device_map is not None:
        device = plan_lisa(recipe, path, dtype, device_map, registry)
    else:
        ensure_lisa_memory(recipe, path, dtype, device)
    model = build_model(recipe, registry, empty=LISA_PARTS, dtype=dtype)
    load_lisa_weights(model, path, dtype=dtype, device=device)
    return model
