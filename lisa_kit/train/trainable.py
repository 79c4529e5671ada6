"""Which parameters train: LISA's set.

LISA's ``train_ds.py`` freezes the CLIP tower and ``mm_projector``; SAM is frozen except
its ``mask_decoder`` (``initialize_lisa_modules``, ``--train_mask_decoder``); peft freezes
the LLM except the LoRA adapters; then every parameter whose name contains ``lm_head``,
``embed_tokens``, ``mask_decoder`` or ``text_hidden_fcs`` is made trainable again: the
whole input-embedding matrix and the output head, SAM's mask decoder and the seg head.
Without LoRA (``lora.r: 0``) LISA leaves the whole LLM trainable, and so does this.

Here, by component (names never matter):

=====================  =========================================================
vision encoder         frozen (``train_vision_encoder: true`` trains it)
projector              frozen (``train_projector: true`` trains it)
LLM                    LoRA adapters (or everything when LoRA is off; nothing with
                       ``train_llm: false``), plus the input
                       embeddings (``train_embeddings``) and output head (``train_lm_head``)
mask decoder           SAM: the ``mask_decoder`` submodule (``train_mask_decoder``); the
                       image encoder only with the model's ``train_image_encoder``; the
                       prompt encoder frozen. Other decoders: everything but ``image_encoder``
seg head               trainable (``train_seg_head``), with the seg-layer mix of
                       ``model.seg_layers: mix`` (its softmax weights)
=====================  =========================================================
"""
from __future__ import annotations

import torch
from torch import nn


def _decoder_part(mask_decoder: nn.Module) -> list[nn.Parameter]:
    inner = getattr(mask_decoder, "mask_decoder", None)
    if isinstance(inner, nn.Module):
        return list(inner.parameters())
    return [p for n, p in mask_decoder.named_parameters() if not n.startswith("image_encoder.")]


def set_trainable(model, cfg) -> list[str]:
    """Set ``requires_grad`` on ``model`` (a :class:`~lisa_kit.model.LisaModel`, LoRA
    already applied when ``cfg.lora.r > 0``) by LISA's rule; ``cfg`` is a
    :class:`~lisa_kit.train.config.TrainConfig`. Returns the trainable parameter names."""
    for p in model.parameters():
        p.requires_grad_(False)
    lm = model.llm.model
    if not cfg.train_llm:
        pass
    elif cfg.uses_lora:
        for n, p in lm.named_parameters():
            if "lora_" in n:
                p.requires_grad_(True)
    else:
        for p in lm.parameters():
            p.requires_grad_(True)
    if cfg.train_embeddings:
        lm.get_input_embeddings().weight.requires_grad_(True)
    if cfg.train_lm_head:
        head = lm.get_output_embeddings()
        if head is not None:
            head.weight.requires_grad_(True)
    if cfg.train_projector:
        for p in model.projector.parameters():
            p.requires_grad_(True)
    if cfg.train_vision_encoder:
        for p in model.vision_encoder.parameters():
            p.requires_grad_(True)
    if cfg.train_mask_decoder:
        for p in _decoder_part(model.mask_decoder):
            p.requires_grad_(True)
    if getattr(model, "train_image_encoder", False):
        enc = getattr(model.mask_decoder, "image_encoder", None)
        for p in (enc.parameters() if isinstance(enc, nn.Module) else ()):
            p.requires_grad_(True)
    if cfg.train_seg_head:
        for p in model.seg_head.parameters():
            p.requires_grad_(True)
        seg_layers = getattr(model, "seg_layers", None)  # the learned layer mix, when there is one
        for p in (seg_layers.parameters() if seg_layers is not None else ()):
            p.requires_grad_(True)
    names = trainable_names(model)
    if not names:
        from lisa_kit.errors import RecipeError

        raise RecipeError("nothing would train: every part is frozen; switch on one of train.train_llm, "
                          "train_embeddings, train_lm_head, train_projector, train_vision_encoder, "
                          "train_mask_decoder, train_seg_head (or model.train_image_encoder)", key="train")
    return names


def trainable_parameters(model) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every trainable parameter, in ``named_parameters`` order
    (each tensor once, under its first name)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def param_groups(named: list[tuple[str, nn.Parameter]], cfg) -> list[dict]:
    """AdamW parameter groups for ``train.lr_scale``: one group per distinct multiplier,
    in order of first appearance (each group keeps ``named_parameters`` order, so an
    index-keyed optimizer state saved by one run loads into the next), each with its
    ``lr`` already scaled and the multiplier under ``"lr_scale"``. Without ``lr_scale``:
    one group, as before. Raises :class:`~lisa_kit.errors.RecipeError` for a prefix that
    names no trained parameter (a typo would otherwise train at the full rate)."""
    from lisa_kit.errors import RecipeError
    from lisa_kit.train.config import under

    for prefix in cfg.lr_scale:
        if not any(under(n, prefix) for n, _ in named):
            tops = sorted({n.split(".")[0] for n, _ in named})
            raise RecipeError(f"names no trained parameter (trained parameters are under: {', '.join(tops)})",
                              key=f"train.lr_scale.{prefix}")
    groups: dict[float, list[nn.Parameter]] = {}
    for n, p in named:
        groups.setdefault(cfg.scale_for(n), []).append(p)
    return [{"params": ps, "lr": cfg.lr * scale, "lr_scale": scale} for scale, ps in groups.items()]


def trainable_names(model) -> list[str]:
    return [n for n, _ in trainable_parameters(model)]


def summary(model) -> dict[str, dict[str, int]]:
    """Trainable and total parameter counts per component."""
    out = {}
    for kind in ("vision_encoder", "projector", "llm", "mask_decoder", "fusion", "seg_head"):
        comp = getattr(model, kind)
        params = list(comp.parameters())
        out[kind] = {"trainable": sum(p.numel() for p in params if p.requires_grad),
                     "total": sum(p.numel() for p in params)}
    return out


def cast_frozen(model, dtype: torch.dtype) -> int:
    """Store frozen floating-point parameters in ``dtype`` (trainable ones stay fp32
    master weights). Returns how many tensors were cast."""
    n = 0
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += 1
    return n


def upcast_trainable(model) -> int:
    """Make every trainable floating-point parameter an fp32 master weight (the model was
    loaded in its frozen precision, so the trainable parts read from files came in bf16/
    fp16 too). LISA does the same: its DeepSpeed bf16 run takes fp32 masters of the
    bf16-loaded model. Returns how many tensors were cast."""
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.to(torch.float32)
            n += 1
    return n
