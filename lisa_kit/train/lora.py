"""LoRA on the LLM, as LISA trains it (peft, ``task_type=CAUSAL_LM``, ``bias="none"``).

:func:`apply_lora` replaces ``model.llm.model`` (a transformers causal LM) by a peft
``PeftModel`` around it, in place. Adapters go on the LLM's linear layers whose name ends
in one of ``targets`` (LISA's ``find_linear_layers`` excludes the vision tower, the
projector, SAM and the seg head by name; here the search never leaves the LLM, so those
cannot be hit). The LLM component keeps working unchanged: peft injects the adapters
into the same decoder modules the component calls, and the embeddings, head and config
are reached through the ``PeftModel``.

:func:`merge_lora` folds the adapters into the base weights (``merge_and_unload``) and
puts the plain transformers model back.
"""
from __future__ import annotations

import warnings

from torch import nn

from lisa_kit.errors import RecipeError


def _base_lm(model) -> nn.Module:
    llm = getattr(model, "llm", None)
    inner = getattr(llm, "model", None)
    if not isinstance(inner, nn.Module):
        raise RecipeError("LoRA needs an LLM component holding a transformers model as `.model` "
                          f"(got {type(llm).__name__})", key="train.lora")
    return inner


def has_lora(model) -> bool:
    from peft import PeftModel

    return isinstance(_base_lm(model), PeftModel)


def lora_target_names(lm: nn.Module, targets: list[str]) -> list[str]:
    """Names (inside ``lm``) of the linear layers LoRA adapts: ``nn.Linear`` modules whose
    last name component is one of ``targets``."""
    wanted = set(targets)
    return sorted(n for n, m in lm.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in wanted)


def apply_lora(model, r: int = 8, alpha: float = 16, dropout: float = 0.05,
               targets: list[str] | tuple[str, ...] = ("q_proj", "v_proj")) -> list[str]:
    """Wrap ``model.llm.model`` with peft LoRA in place; returns the adapted module names
    (relative to the LLM). All base weights of the LLM end up frozen (peft's rule);
    :mod:`lisa_kit.train.trainable` decides what else trains."""
    from peft import LoraConfig, PeftModel, get_peft_model

    lm = _base_lm(model)
    if isinstance(lm, PeftModel):
        raise RecipeError("the LLM already has LoRA adapters", key="train.lora")
    names = lora_target_names(lm, list(targets))
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if isinstance(m, nn.Linear)})
        raise RecipeError(f"no linear layer of the LLM is named {list(targets)}; its linear layers are "
                          f"named {', '.join(linear)}", key="train.lora.targets")
    cfg = LoraConfig(r=int(r), lora_alpha=alpha, lora_dropout=float(dropout), target_modules=names,
                     bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft asks transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model.llm.model = get_peft_model(lm, cfg)
    return names


def merge_lora(model):
    """Fold the adapters into the LLM's weights and put the plain transformers model back
    as ``model.llm.model``. Returns ``model`` (unchanged when it has no adapters)."""
    from peft import PeftModel

    lm = _base_lm(model)
    if isinstance(lm, PeftModel):
        model.llm.model = lm.merge_and_unload()
    return model
