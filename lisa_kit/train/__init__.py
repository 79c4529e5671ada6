"""Training: LISA's recipe (LoRA on the LLM, the mask decoder, seg head, embeddings and
head trained; AdamW with warmup and linear decay; CE + BCE + Dice) on lisa_kit models.

* :mod:`~lisa_kit.train.config`: the recipe's ``train:`` section (:class:`TrainConfig`)
* :mod:`~lisa_kit.train.lora`: :func:`apply_lora` / :func:`merge_lora`
* :mod:`~lisa_kit.train.trainable`: which parameters train
* :mod:`~lisa_kit.train.loop`: :class:`Trainer` (``lisa-kit train``)
* :mod:`~lisa_kit.train.checkpointing`: atomic, resumable checkpoints with a manifest
  (size, sha256 per file), recovery of interrupted saves; :func:`load_trained_model` for export
* :mod:`~lisa_kit.train.signals`: SIGINT/SIGTERM stop at a step boundary with a checkpoint
* :mod:`~lisa_kit.train.distributed`: torchrun, DDP, FSDP2
"""
from __future__ import annotations

from lisa_kit.train.config import TrainConfig

__all__ = ["TrainConfig", "Trainer", "train", "apply_lora", "merge_lora", "load_trained_model"]


def __getattr__(name):  # heavy modules load on first use
    if name in ("Trainer", "train"):
        from lisa_kit.train import loop

        return getattr(loop, name)
    if name in ("apply_lora", "merge_lora"):
        from lisa_kit.train import lora

        return getattr(lora, name)
    if name == "load_trained_model":
        from lisa_kit.train.checkpointing import load_trained_model

        return load_trained_model
    raise AttributeError(name)
