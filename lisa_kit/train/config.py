"""The recipe's ``train:`` section as a typed :class:`TrainConfig`.

Every value is a recipe value; the defaults are LISA's ``train_ds.py`` (dvlab-research/LISA)
and its DeepSpeed config::

    train:
      steps: 5000                  # optimizer steps: --epochs 10 x --steps_per_epoch 500
      lr: 3.0e-4                   # --lr; AdamW, weight_decay 0, betas (--beta1, --beta2)
      min_lr: 0.0                  # WarmupDecayLR warmup_min_lr
      warmup_steps: 100            # WarmupDecayLR warmup_num_steps (linear), then linear decay to
                                   # min_lr at `steps` (total_num_steps)
      betas: [0.9, 0.95]
      eps: 1.0e-8
      weight_decay: 0.0
      batch_size: 2                # per device and micro-batch (--batch_size)
      grad_accumulation: 10        # --grad_accumulation_steps
      clip_grad_norm: 1.0          # gradient_clipping (0 or null: off)
      precision: bf16              # bf16 | fp16 | fp32 (default: the recipe's top-level `precision`,
                                   # else bf16); autocast, fp16 with a GradScaler
      activation_checkpointing: true   # --gradient_checkpointing
      lora: {r: 8, alpha: 16, dropout: 0.05, targets: [q_proj, v_proj]}   # r: 0 = no LoRA (the whole LLM trains)
      train_mask_decoder: true     # --train_mask_decoder (SAM's mask_decoder submodule)
      train_embeddings: true       # LISA trains embed_tokens (the whole matrix) ...
      train_lm_head: true          # ... and lm_head
      train_projector: false       # LISA freezes mm_projector
      train_vision_encoder: false  # ... and the CLIP tower (true: for towers trained from scratch)
      train_llm: true              # false: no LoRA and the LLM's own weights frozen (embeddings/head
                                   # still follow train_embeddings / train_lm_head)
      train_seg_head: true         # LISA trains text_hidden_fcs
      nonfinite: stop              # a NaN/inf loss: stop (naming the step and samples) | skip the step
      loss_norm: micro_batch       # micro_batch (LISA: mean of per-micro-batch means) | global
      strategy: ddp                # ddp | fsdp2 | zero2 | single (used when launched by torchrun)
      log_every: 1
      save_every: 500              # LISA saves once per epoch (500 steps)
      keep_last: 2                 # step_* checkpoints kept (0: all); best/ is extra
      val_every: 500               # LISA validates once per epoch; 0 = never
      val: {dataset: reason_seg, split: val, root: null, options: {}, limit: null}   # null = no validation
      seed: 0
      max_length: 512              # --model_max_length (text tokens per row, for collate)
      workers: 4                   # --workers
      shuffle: true
      cast_frozen: true            # bf16/fp16: frozen weights loaded straight into that dtype (LISA
                                   # loads the model in bf16); trained weights are fp32 masters of
                                   # the loaded values
      lr_scale: {}                 # parameter-name prefix -> multiplier of lr (and min_lr) for the
                                   # trained parameters under it, e.g. {mask_decoder.image_encoder: 0.1}
                                   # to move a pretrained encoder slowly; the longest prefix wins;
                                   # a prefix that names no trained parameter is an error (LISA: none)

Unknown keys and wrong types raise :class:`~lisa_kit.errors.RecipeError` naming
``train.<key>``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lisa_kit.errors import RecipeError

PRECISIONS = ("bf16", "fp16", "fp32")
STRATEGIES = ("ddp", "fsdp2", "zero2", "single")
LOSS_NORMS = ("micro_batch", "global")
NONFINITE = ("stop", "skip")
NONFINITE = ("stop", "skip")


@dataclass
class LoraSettings:
    """peft LoRA on the LLM (LISA: ``--lora_r 8 --lora_alpha 16 --lora_dropout 0.05
    --lora_target_modules q_proj,v_proj``). ``r: 0`` trains the whole LLM instead."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class ValSettings:
    """The held-out reader validated on every ``val_every`` steps (LISA: ``ReasonSeg|val``).
    ``root`` defaults to ``data.root``; ``options`` go to the reader; ``limit`` caps the
    number of images."""

    dataset: str = "reason_seg"
    split: str = "val"
    root: str | None = None
    options: dict = field(default_factory=dict)
    limit: int | None = None


@dataclass
class TrainConfig:
    steps: int = 5000
    lr: float = 3e-4
    min_lr: float = 0.0
    warmup_steps: int = 100
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    batch_size: int = 2
    grad_accumulation: int = 10
    clip_grad_norm: float | None = 1.0
    precision: str | None = None
    activation_checkpointing: bool = True
    lora: LoraSettings = field(default_factory=LoraSettings)
    train_mask_decoder: bool = True
    train_embeddings: bool = True
    train_lm_head: bool = True
    train_projector: bool = False
    train_vision_encoder: bool = False
    train_llm: bool = True
    train_seg_head: bool = True
    nonfinite: str = "stop"
    loss_norm: str = "micro_batch"
    strategy: str = "ddp"
    log_every: int = 1
    save_every: int = 500
    keep_last: int = 2
    val_every: int = 500
    val: ValSettings | None = field(default_factory=ValSettings)
    seed: int = 0
    max_length: int | None = 512
    workers: int = 4
    shuffle: bool = True
    cast_frozen: bool = True
    lr_scale: dict = field(default_factory=dict)

    # -- derived -------------------------------------------------------------------
    @property
    def uses_lora(self) -> bool:
        """LoRA adapters are added to the LLM (``lora.r > 0`` and the LLM trains)."""
        return self.train_llm and self.lora.r > 0

    @property
    def frozen_dtype(self):
        """The ``torch.dtype`` frozen weights are stored in (``cast_frozen`` with bf16/fp16);
        ``None``: fp32 like the rest. A sharded run (FSDP2) casts through its policy instead."""
        import torch

        if self.precision in (None, "fp32") or not self.cast_frozen:
            return None
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` for optimizer step ``step`` (0-based): DeepSpeed's
        ``WarmupDecayLR`` with ``warmup_type: linear``: ``step / warmup_steps`` during the
        warmup, then ``(steps - step) / (steps - warmup_steps)``, floored at 0, mapped to
        ``[min_lr, lr]``."""
        if step < self.warmup_steps:
            gamma = step / self.warmup_steps
        else:
            gamma = max(0.0, (self.steps - step) / max(1.0, self.steps - self.warmup_steps))
        if self.lr == 0:
            return 0.0
        return (self.min_lr + (self.lr - self.min_lr) * gamma) / self.lr

    def scale_for(self, name: str) -> float:
        """The ``lr_scale`` multiplier of parameter ``name``: the entry with the longest
        prefix that is ``name`` itself or ends at one of its dots; 1.0 when none does."""
        best, factor = -1, 1.0
        for prefix, value in self.lr_scale.items():
            if under(name, prefix) and len(prefix) > best:
                best, factor = len(prefix), float(value)
        return factor

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_recipe(cls, recipe) -> "TrainConfig":
        """From a loaded recipe (:class:`~lisa_kit.recipes.Recipe`, DictConfig or dict)."""
        from lisa_kit.builder import _plain

        cfg = _plain(getattr(recipe, "cfg", recipe))
        node = cfg.get("train") or {}
        if not isinstance(node, dict):
            raise RecipeError(f"must be a mapping, got {node!r}", key="train")
        out = _build(cls, node, "train")
        if out.precision is None:
            top = cfg.get("precision")
            if top is not None:
                if top not in PRECISIONS:
                    raise RecipeError(f"must be one of {', '.join(PRECISIONS)}, got {top!r}", key="precision")
                out.precision = top
            else:
                out.precision = "bf16"
        out.lr_scale = _flat(out.lr_scale, "train.lr_scale")
        _check(out)
        return out


def under(name: str, prefix: str) -> bool:
    """Parameter ``name`` is ``prefix`` itself or lies below it (a match ends at a dot, so
    ``mask_decoder`` does not take ``mask_decoder_extra.weight``)."""
    return name == prefix or name.startswith(prefix + ".")


# -- checking --------------------------------------------------------------------------

_NESTED = {"lora": LoraSettings, "val": ValSettings}


def _coerce(value: Any, annotation: str, key: str) -> Any:
    """Check ``value`` against the (string) annotation of a field; ints pass as floats."""
    optional = "None" in annotation
    if value is None:
        if optional:
            return None
        raise RecipeError(f"must not be null (expected {annotation.replace(' | None', '')})", key=key)
    base = annotation.replace(" | None", "").strip()
    if base == "bool":
        if not isinstance(value, bool):
            raise RecipeError(f"expected true or false, got {value!r}", key=key)
        return value
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"expected an integer, got {value!r}", key=key)
        return value
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"expected a number, got {value!r}", key=key)
        return float(value)
    if base == "str":
        if not isinstance(value, str):
            raise RecipeError(f"expected a string, got {value!r}", key=key)
        return value
    if base == "dict":
        if not isinstance(value, dict):
            raise RecipeError(f"expected a mapping, got {value!r}", key=key)
        return dict(value)
    if base.startswith("list["):
        inner = base[5:-1]
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"expected a list of {inner}, got {value!r}", key=key)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


def _flat(node: dict, key: str, prefix: str = "") -> dict:
    """``{"a": {"b": 0.1}}`` -> ``{"a.b": 0.1}``: the override ``train.lr_scale.a.b=0.1``
    nests where the recipe's ``lr_scale: {a.b: 0.1}`` does not; both mean one prefix."""
    out = {}
    for k, v in node.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key, name + "."))
        elif name in out:
            raise RecipeError(f"{name!r} is given twice", key=key)
        else:
            out[name] = v
    return out


def _build(cls, node: dict, prefix: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in node.items():
        path = f"{prefix}.{key}"
        if key not in fields:
            raise RecipeError(f"unknown key; {prefix} takes: {', '.join(fields)}", key=path)
        if key in _NESTED and cls in (TrainConfig,):
            if value is None and key == "val":
                kwargs[key] = None
                continue
            if not isinstance(value, dict):
                raise RecipeError(f"expected a mapping, got {value!r}", key=path)
            kwargs[key] = _build(_NESTED[key], value, path)
            continue
        kwargs[key] = _coerce(value, str(fields[key].type), path)
    return cls(**kwargs)


def _check(c: TrainConfig) -> None:
    def bad(key: str, msg: str):
        raise RecipeError(msg, key=f"train.{key}")

    if c.precision not in PRECISIONS:
        bad("precision", f"must be one of {', '.join(PRECISIONS)}, got {c.precision!r}")
    if c.strategy not in STRATEGIES:
        bad("strategy", f"must be one of {', '.join(STRATEGIES)}, got {c.strategy!r}")
    if c.loss_norm not in LOSS_NORMS:
        bad("loss_norm", f"must be one of {', '.join(LOSS_NORMS)}, got {c.loss_norm!r}")
    if c.nonfinite not in NONFINITE:
        bad("nonfinite", f"must be one of {', '.join(NONFINITE)}, got {c.nonfinite!r}")
    for key in ("steps", "batch_size", "grad_accumulation", "log_every"):
        if getattr(c, key) < 1:
            bad(key, f"must be >= 1, got {getattr(c, key)}")
    for key in ("warmup_steps", "save_every", "val_every", "workers", "keep_last", "seed"):
        if getattr(c, key) < 0:
            bad(key, f"must be >= 0, got {getattr(c, key)}")
    if c.lr < 0 or c.min_lr < 0 or c.min_lr > c.lr:
        bad("lr" if c.lr < 0 else "min_lr", f"need 0 <= min_lr <= lr, got lr={c.lr}, min_lr={c.min_lr}")
    if len(c.betas) != 2 or not all(0 <= b < 1 for b in c.betas):
        bad("betas", f"must be two numbers in [0, 1), got {c.betas}")
    if c.eps <= 0:
        bad("eps", f"must be > 0, got {c.eps}")
    if c.weight_decay < 0:
        bad("weight_decay", f"must be >= 0, got {c.weight_decay}")
    if c.clip_grad_norm is not None and c.clip_grad_norm < 0:
        bad("clip_grad_norm", f"must be >= 0 (0 or null: off), got {c.clip_grad_norm}")
    if c.max_length is not None and c.max_length < 8:
        bad("max_length", f"must be >= 8 (or null: no limit), got {c.max_length}")
    if c.lora.r < 0:
        bad("lora.r", f"must be >= 0 (0: no LoRA), got {c.lora.r}")
    if not 0 <= c.lora.dropout < 1:
        bad("lora.dropout", f"must be in [0, 1), got {c.lora.dropout}")
    if c.lora.r > 0 and not c.lora.targets:
        bad("lora.targets", "needs at least one module name (e.g. [q_proj, v_proj])")
    for prefix, value in c.lr_scale.items():
        if not prefix or prefix.startswith(".") or prefix.endswith("."):  # keys are strings once flattened
            bad("lr_scale", f"keys are parameter-name prefixes such as mask_decoder.image_encoder, got {prefix!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            bad(f"lr_scale.{prefix}", f"must be a number >= 0, got {value!r}")
    if c.val is not None and c.val.limit is not None and c.val.limit < 1:
        bad("val.limit", f"must be >= 1 (or null: all), got {c.val.limit}")
