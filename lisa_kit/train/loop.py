"""The trainer: LISA's training loop on lisa_kit's components.

One optimizer step = ``grad_accumulation`` micro-batches of ``batch_size`` samples per
rank, drawn from :class:`~lisa_kit.datasets.hybrid.HybridDataset` (sample ``i`` of epoch
``e`` is a pure function of ``(seed, e, i)``) through :class:`ResumableSampler`
(``DistributedSampler``'s order, started at any position). Each micro-batch is collated
into a :class:`~lisa_kit.model.Batch`, run under autocast, scored by
:func:`~lisa_kit.loss.lisa_loss` with the recipe's ``loss:`` weights, and backpropagated;
then the gradients are clipped, AdamW steps and the warmup/decay schedule advances.

Loss normalisation (``train.loss_norm``):

* ``micro_batch`` (LISA/DeepSpeed): every micro-batch's loss is its own mean (CE over its
  supervised tokens, BCE/Dice over its masks) divided by ``grad_accumulation``; ranks
  average. The step's loss is the mean of the per-(rank, micro-batch) means.
* ``global``: CE is the mean over every supervised token of the step and the mask terms
  the mean over every mask of the step, across micro-batches and ranks (counts are
  all-reduced before the backward passes). How the global batch is split -- ranks,
  micro-batches -- then does not change the loss or the gradient.

The run directory gets ``recipe.yaml`` (resolved) and ``env.json`` (library versions, git
commit) at start, ``train.jsonl`` (one line per optimizer step: step, loss, ce, bce, dice,
lr, grad_norm, samples_per_s, time), ``val.jsonl``, ``tb/`` (TensorBoard, when
installed) and ``checkpoints/`` (:mod:`lisa_kit.train.checkpointing`).

Faults: SIGINT/SIGTERM stop the run at the next step boundary with a checkpoint
(:mod:`lisa_kit.train.signals`; ranks agree on the step through an all-reduce); a resume
verifies the checkpoint and falls back to the previous intact one, and drops a torn last
line of the logs; a failed write (full disk) is a :class:`~lisa_kit.errors.TrainingError`
naming the file and the checkpoint that is still intact.
"""
from __future__ import annotations

import errno
import json
import math
import os
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from lisa_kit.errors import CheckpointError, DataError, InputError, LisaKitError, RecipeError, TrainingError
from lisa_kit.provenance import git_state, versions
from lisa_kit.train import checkpointing as ckpt
from lisa_kit.train.config import TrainConfig
from lisa_kit.train.distributed import (SHARDED, DistEnv, all_gather_object, all_reduce_sum, barrier, full_state,
                                        init_distributed, launched_rank, load_optimizer_state, optimizer_state,
                                        raise_on_any_failure, wrap_model)
from lisa_kit.train.signals import StopSignals, exit_code, stderr_line

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ResumableSampler(Sampler[int]):
    """``DistributedSampler``'s indices (same permutation for ``(seed, epoch)``, same
    padding, rank ``r`` takes every ``world``-th) starting at position ``start`` of this
    rank's list, so a resumed run skips exactly the samples already consumed."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0):
        self.n, self.rank, self.world_size, self.shuffle, self.seed = n, rank, world_size, shuffle, seed
        self.epoch = 0
        self.start = 0
        self.num_samples = math.ceil(n / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rank_indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        total = self.num_samples * self.world_size
        pad = total - len(idx)
        if pad > 0:
            idx += (idx * math.ceil(pad / len(idx)))[:pad]
        return idx[self.rank:total:self.world_size]

    def __iter__(self):
        return iter(self.rank_indices()[self.start:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def _as_list(samples):
    return samples


class LossModule(torch.nn.Module):
    """``model`` plus :func:`~lisa_kit.loss.lisa_loss`: ``forward(batch)`` returns the
    loss parts and ``n_tokens`` (supervised next-token targets after fusion). What DDP
    wraps, so only the loss is its output.

    ``link_unused`` (several DDP ranks): a batch whose loss reaches no trainable parameter (only
    the mask path trains and its samples hold no ``[SEG]``) also returns ``unused_link``, a
    zero tied to every trainable parameter inside this forward, so that rank's backward joins
    the others' gradient reduction (DDP counts a parameter used outside forward twice)."""

    def __init__(self, model, weights, link_unused: bool = False):
        super().__init__()
        self.model = model
        self.weights = weights
        self.link_unused = link_unused

    def forward(self, batch):
        from lisa_kit.conversation import IGNORE
        from lisa_kit.loss import lisa_loss

        out = self.model(batch)
        parts = lisa_loss(out.logits, out.fused.labels, out.pred_masks, batch.gt_masks, self.weights)
        parts["n_tokens"] = (out.fused.labels[:, 1:] != IGNORE).sum()
        if self.link_unused and torch.is_grad_enabled() and not parts["loss"].requires_grad:
            parts["unused_link"] = _zero_link(p for p in self.parameters() if p.requires_grad)
        return parts


def _append_line(path: Path, record: dict) -> None:
    """Append ``record`` as one JSON line in one ``write`` (a kill leaves at most a torn
    last line, which a resume drops). An ``OSError`` carries ``path`` as its filename."""
    data = (json.dumps(record) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            while data:
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)
    except OSError as e:
        e.filename = e.filename or str(path)
        raise


def _read_log(path: Path, upto: int) -> list[str]:
    """The lines of the JSON-lines log ``path`` of steps ``<= upto``. Lines that are not
    a JSON object with an integer ``step`` (the torn last line of a killed run, damage)
    are dropped with a warning naming them."""
    keep, bad = [], []
    for no, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            step = None
        if not isinstance(step, int):
            bad.append(no)
        elif step <= upto:
            keep.append(line)
    if bad:
        warnings.warn(f"{path}: dropped {len(bad)} unreadable line(s) (line {', '.join(map(str, bad))}; a torn "
                      "last line is what a killed run leaves)", stacklevel=3)
    return keep


def _write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _flatten(d, prefix=""):
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


#: Parameter-name prefixes of the parts every batch's token loss reaches.
UPSTREAM_OF_TOKENS = ("llm.", "projector.", "vision_encoder.")


def _zero_link(params) -> torch.Tensor:
    """``0`` tied to every parameter of ``params`` (:class:`LossModule`'s ``link_unused``)."""
    return torch.stack([p.sum() * 0.0 for p in params]).sum()


class Trainer:
    """Train the model a recipe describes.

    ``recipe``: a name, path, mapping or :class:`~lisa_kit.recipes.Recipe` (``None`` with
    ``resume``: the checkpoint's own); ``overrides``: ``key=value`` strings; ``out_dir``:
    the run directory; ``resume``: a run or checkpoint directory to continue from (its
    newest complete checkpoint); ``stop_after``: stop (with a checkpoint) once this global
    step is reached, the schedule still spanning ``train.steps``.
    """

    def __init__(self, recipe=None, out_dir: str | os.PathLike | None = None, *, overrides=(), resume=None,
                 stop_after: int | None = None, progress: bool = True, device: str | None = None, registry=None):
        from omegaconf import OmegaConf

        from lisa_kit.builder import load
        from lisa_kit.conversation import recipe_template
        from lisa_kit.datasets.hybrid import hybrid_from_config
        from lisa_kit.loss import LossWeights
        from lisa_kit.recipes import (check_recipe, env_free, load_recipe, load_yaml_safely, persisted_yaml,
                                      recipe_env_origins)
        from lisa_kit.train.lora import apply_lora
        from lisa_kit.train.trainable import (cast_frozen, param_groups, set_trainable, trainable_parameters,
                                             upcast_trainable)

        self.progress = progress
        self.stop_after = stop_after
        self.stopped_by: int | None = None  # the signal that stopped fit()
        resume_from, resumed, damaged = None, None, []
        if resume is not None:
            resume_from, resumed, damaged = ckpt.find_resumable(resume)
            for path, why in damaged if launched_rank() == 0 else ():
                warnings.warn(f"checkpoint {path} is damaged, passed over: {why}", stacklevel=2)
            if damaged and launched_rank() == 0:
                warnings.warn(f"resuming from {resume_from}, the newest intact checkpoint", stacklevel=2)
        if recipe is None:
            if resume_from is None:
                raise InputError("a recipe is needed (or resume= a run to take it from)")
            if not resumed.recipe_yaml:
                raise CheckpointError("the checkpoint holds no recipe; give one", file=resume_from / ckpt.RECIPE_FILE)
            # Bounded (alias bombs, size) and typed; ${oc.env:...} resolved by load_recipe below.
            recipe = load_yaml_safely(resumed.recipe_yaml, origin=str(resume_from / ckpt.RECIPE_FILE))
        self.recipe = load_recipe(recipe if not hasattr(recipe, "cfg") else OmegaConf.to_container(recipe.cfg),
                                  overrides)
        check_recipe(self.recipe, registry=registry)
        self.recipe_yaml = persisted_yaml(self.recipe)  # environment values stay ${oc.env:...}
        self.plain = OmegaConf.to_container(self.recipe.cfg, resolve=True)
        self.cfg = cfg = TrainConfig.from_recipe(self.plain)
        name = self.plain.get("name") or (self.recipe.path.stem if self.recipe.path else "run")
        self.out = Path(out_dir) if out_dir is not None else (
            resume_from.parent.parent if resume_from is not None and resume_from.parent.name == "checkpoints"
            else Path("runs") / str(name))
        self.ckpt_root = self.out / "checkpoints"
        self.env: DistEnv = init_distributed(cfg.strategy, device)
        env = self.env

        if resumed is not None and resumed.recipe_yaml:
            old = _flatten(load_yaml_safely(resumed.recipe_yaml, origin=str(resume_from / ckpt.RECIPE_FILE))
                           .get("model", {}))
            new = _flatten(env_free(self.plain, recipe_env_origins(self.recipe)).get("model", {}))
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if diff:
                raise CheckpointError("the recipe's model differs from the one the checkpoint was trained with",
                                      key=f"model.{diff[0]}", file=resume_from / ckpt.RECIPE_FILE)

        # -- model: build (seeded), LoRA, trainable set -------------------------------------
        torch.manual_seed(cfg.seed)
        # Frozen weights are read straight into their training precision (the CPU peak is the
        # final model, never an fp32 model first); FSDP2 keeps fp32 and casts through its policy.
        frozen_dtype = cfg.frozen_dtype if not env.sharded else None
        # A checkpoint of an older version fingerprinted its frozen weights in fp32 before the
        # cast: resumed the way it was built (fp32 load, then the cast below).
        legacy = resumed is not None and ckpt.FINGERPRINT_DTYPE not in resumed.meta
        read_dtype = None if legacy else frozen_dtype
        self.fingerprint_dtype = read_dtype
        model = load(self.recipe, registry=registry, dtype=read_dtype)
        if cfg.uses_lora:
            apply_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets)
        if cfg.activation_checkpointing:
            try:
                model.llm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            except (ValueError, AttributeError) as e:
                raise RecipeError(f"the LLM does not support activation checkpointing: {e}",
                                  key="train.activation_checkpointing") from e
        self.trainable_names = set_trainable(model, cfg)
        if env.distributed and env.strategy in SHARDED and not any(
                n.startswith(UPSTREAM_OF_TOKENS) for n in self.trainable_names):
            # A batch without [SEG] would then reach no trainable parameter on one rank while
            # the others' sharded backward waits for it (DDP handles that: LossModule).
            raise RecipeError(f"{env.strategy} needs a trainable part that every batch's token loss reaches "
                              "(the LLM, LoRA, embeddings, head, projector or vision encoder); to train only "
                              "the seg head and mask decoder on several ranks use train.strategy=ddp",
                              key="train.strategy")
        if read_dtype is not None:
            upcast_trainable(model)
        self.fingerprint = ckpt.frozen_fingerprint(model, read_dtype)
        if resumed is not None:
            ckpt.check_fingerprint(resumed.meta.get("frozen_fingerprint"), self.fingerprint)
            ckpt.load_trainable(model, resumed.weights, self.trainable_names, file=resume_from / ckpt.WEIGHTS_FILE)
        self.dtype = DTYPES[cfg.precision]
        if frozen_dtype is not None:
            # Parts with random initial weights (built in fp32) that stay frozen; before the
            # move, so the accelerator never holds frozen weights in fp32 (LISA-7B: 27 GB in
            # fp32, 13.5 GB in bf16 -- the difference between fitting 24 GB or not).
            cast_frozen(model, frozen_dtype)
        model.to(env.device)
        self.model = model
        self.weights = LossWeights(**{k: float(v) for k, v in (self.plain.get("loss") or {}).items()})
        step_module = LossModule(model, self.weights, link_unused=env.distributed and env.strategy == "ddp")
        self.module = wrap_model(model, env, step_module,
                                 param_dtype=self.dtype if cfg.precision != "fp32" else None)
        named = trainable_parameters(model)  # after FSDP2: the sharded parameters
        self.params = [p for _, p in named]
        self.optimizer = torch.optim.AdamW(param_groups(named, cfg), lr=cfg.lr, betas=tuple(cfg.betas),
                                           eps=cfg.eps, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cfg.lr_factor)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.precision == "fp16")

        # -- data ---------------------------------------------------------------------------
        self.template = recipe_template(self.plain, model.tokenizer)
        data_cfg = self.plain.get("data") or {}
        self.dataset = hybrid_from_config(data_cfg, self.template, seed=cfg.seed, reject_token=model.reject_token,
                                          geometry=getattr(model, "text_geometry", None))
        self.sampler = ResumableSampler(len(self.dataset), env.rank, env.world_size, cfg.shuffle, cfg.seed)
        if self.sampler.num_samples < cfg.batch_size:
            raise DataError(f"data.samples_per_epoch={len(self.dataset)} gives {self.sampler.num_samples} samples per "
                            f"rank and epoch, fewer than train.batch_size={cfg.batch_size}")
        self._val_reader = None

        # -- state ----------------------------------------------------------------------------
        self.step = 0
        self.epoch = 0
        self.position = 0  # samples of this epoch consumed by this rank
        self.skipped = 0  # steps dropped for a non-finite loss (train.nonfinite: skip)
        self.best_giou: float | None = None
        self.last_val: dict | None = None
        self._last_record: dict | None = None  # train.jsonl's last line
        self._log_failure: tuple[OSError, str] | None = None  # rank 0's first failed log write and the log
        self.resumed_from = resume_from
        self.damaged = [p for p, _ in damaged]  # newer checkpoints passed over, set aside by fit()
        if resumed is not None:
            self._restore(resumed)
            if env.is_main:
                print(f"resumed from {resume_from}: step {self.step}, epoch {self.epoch}, sample {self.position} of "
                      f"the epoch on each of {env.world_size} rank(s)", file=sys.stderr, flush=True)
        else:
            import random

            torch.manual_seed(cfg.seed + env.rank)
            np.random.seed(cfg.seed + env.rank)
            random.seed(cfg.seed + env.rank)

    # -- resume ------------------------------------------------------------------------------
    def _restore(self, data: ckpt.CheckpointData) -> None:
        try:
            self._restore_state(data)
        except (KeyError, IndexError, TypeError, ValueError) as e:  # a checkpoint of another layout
            raise CheckpointError(f"the checkpoint's training state does not fit this run: {e!r}",
                                  file=self.resumed_from) from e

    def _restore_state(self, data: ckpt.CheckpointData) -> None:
        meta, env = data.meta, self.env
        fmt = "fqn" if env.sharded else "index"
        if meta.get("optimizer_format", "index") != fmt:
            raise CheckpointError(f"the checkpoint's optimizer state was saved under strategy {meta.get('strategy')!r} "
                                  f"and cannot be loaded under {env.strategy!r} with {env.world_size} process(es)")
        load_optimizer_state(self.model, self.optimizer, data.state["optimizer"], env)
        self.scheduler.load_state_dict(data.state["scheduler"])
        if data.state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(data.state["scaler"])
        self.step = int(meta["step"])
        self.epoch = int(meta["epoch"])
        old_world = int(meta.get("world_size", 1))
        consumed = int(meta["position"]) * old_world
        if old_world != env.world_size:
            warnings.warn(f"resuming a {old_world}-process run with {env.world_size} processes: the samples of the "
                          "current epoch are redistributed, so the run does not replay exactly", stacklevel=2)
        self.position = consumed // env.world_size
        self.best_giou = meta.get("best_giou")
        self.last_val = meta.get("val")
        rngs = data.rng
        ckpt.set_rng_state(rngs[env.rank] if env.rank < len(rngs) else rngs[0])

    # -- data --------------------------------------------------------------------------------
    def _micro_batches(self):
        cfg = self.cfg
        while True:
            self.dataset.set_epoch(self.epoch)
            self.sampler.set_epoch(self.epoch)
            self.sampler.start = self.position
            g = torch.Generator()
            g.manual_seed(cfg.seed)  # DataLoader seeds its workers from this, not the global RNG
            # Samples cross to the main process as they are (conversation.IMAGE pickles as itself).
            loader = DataLoader(self.dataset, batch_size=cfg.batch_size, sampler=self.sampler, num_workers=cfg.workers,
                                collate_fn=_as_list, drop_last=True, generator=g)
            order = self.sampler.rank_indices()
            for samples in loader:
                first = self.position
                self.position += len(samples)
                # where the samples came from: named when their loss is not finite
                yield samples, (self.epoch, order[first:self.position])
            self.epoch += 1
            self.position = 0

    def _collate(self, samples):
        from lisa_kit.data import collate

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*truncated to.*")
            return collate(samples, self.model, max_length=self.cfg.max_length)

    def _autocast(self):
        if self.cfg.precision == "fp32":
            return nullcontext()
        return torch.autocast(device_type=self.env.device.type, dtype=self.dtype)

    # -- one optimizer step ------------------------------------------------------------------
    def train_step(self, micro: list[list], where: list | None = None) -> dict:
        """One optimizer step over the micro-batches ``micro`` (lists of samples);
        ``where[i]``: ``(epoch, dataset indices)`` of micro-batch ``i``, named in the error
        of a non-finite loss."""
        from lisa_kit.conversation import IGNORE

        cfg, env = self.cfg, self.env
        module = self.module
        module.train()
        batches = [self._collate(s) for s in micro]
        n_tok = [int((b.labels[:, 1:] != IGNORE).sum()) for b in batches]
        n_mask = [sum(int(g.shape[0]) for g in (b.gt_masks or [])) for b in batches]
        if cfg.loss_norm == "global":
            tot_tok, tot_mask = all_reduce_sum([float(sum(n_tok)), float(sum(n_mask))], env)
        acc = len(batches)
        logged = np.zeros(4)  # loss, ce, bce, dice
        bad_micro: list[int] = []  # this rank's micro-batches with a non-finite loss
        ddp = hasattr(module, "no_sync")
        for i, batch in enumerate(batches):
            batch = batch.to(env.device)
            sync = module.no_sync() if ddp and i < acc - 1 else nullcontext()
            with sync:
                with self._autocast():
                    parts = module(batch)
                if int(parts["n_tokens"]) != n_tok[i]:
                    raise RuntimeError(f"{int(parts['n_tokens'])} supervised tokens after fusion, {n_tok[i]} before")
                if cfg.loss_norm == "global":
                    zero = parts["loss"].new_zeros(())
                    ce = parts["ce_loss"] * (n_tok[i] / tot_tok) if n_tok[i] else zero
                    wm = n_mask[i] / tot_mask if tot_mask else 0.0
                    bce, dice = parts["mask_bce_loss"] * wm, parts["mask_dice_loss"] * wm
                    total = ce + bce + dice
                    objective = total * env.world_size
                else:
                    ce, bce, dice = (parts[k] / acc for k in ("ce_loss", "mask_bce_loss", "mask_dice_loss"))
                    total = parts["loss"] / acc
                    objective = total
                # A loss that reaches no trainable parameter (only the mask path trains and
                # these samples hold no [SEG]) has nothing to backpropagate: alone, its step
                # leaves gradients unset, as for any part a step does not reach; with several
                # ranks it backpropagates the forward's zero link, to join the reduction.
                if "unused_link" in parts:
                    objective = objective + parts["unused_link"]
                if objective.requires_grad:
                    self.scaler.scale(objective).backward()
            if not torch.isfinite(total.detach()).all():
                bad_micro.append(i)
            logged += [float(total.detach()), float(ce.detach()), float(bce.detach()), float(dice.detach())]
        logged = np.asarray(all_reduce_sum(logged.tolist(), env))
        if cfg.loss_norm != "global":
            logged /= env.world_size
        if not np.isfinite(logged[0]):  # reduced: every rank takes the same branch
            return self._nonfinite(logged, bad_micro, where)
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.clip_grad_norm if cfg.clip_grad_norm else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lr = cfg.lr * cfg.lr_factor(self.step)  # the recipe's rate (LambdaLR's), before any lr_scale
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        logged = [float(v) for v in logged]
        return {"step": self.step, "loss": logged[0], "ce": logged[1], "bce": logged[2], "dice": logged[3],
                "lr": lr, "grad_norm": float(grad_norm),
                "samples": sum(len(s) for s in micro) * env.world_size}

    def _nonfinite(self, logged, bad_micro: list[int], where: list | None) -> dict:
        """A NaN/inf loss in step ``self.step + 1``: stop naming the samples, or (with
        ``train.nonfinite: skip``) drop the gradients and go on without an optimizer step."""
        from lisa_kit.errors import TrainingError

        parts = dict(zip(("loss", "ce", "bce", "dice"), (float(v) for v in logged)))
        named = [f"micro-batch {i} (epoch {where[i][0]}, samples {where[i][1]})" if where else f"micro-batch {i}"
                 for i in bad_micro]
        here = (f"rank {self.env.rank}: " + "; ".join(named)) if named else "another rank's micro-batch"
        msg = (f"non-finite loss at step {self.step + 1} ({', '.join(f'{k}={v}' for k, v in parts.items())}) "
               f"in {here}")
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.nonfinite == "stop":
            raise TrainingError(msg + "; set train.nonfinite: skip to skip such steps")
        warnings.warn(msg + ": step skipped", stacklevel=2)
        self.skipped += 1
        return {"step": self.step, "skipped": True, **parts}

    # -- validation --------------------------------------------------------------------------
    def val_reader(self):
        if self._val_reader is None and self.cfg.val is not None:
            from lisa_kit.datasets import open_dataset

            v = self.cfg.val
            root = v.root if v.root is not None else (self.plain.get("data") or {}).get("root")
            self._val_reader = open_dataset(v.dataset, root, v.split, **(v.options or {}))
        return self._val_reader

    def validate(self) -> dict | None:
        """Teacher-forced validation (LISA's ``validate()``): every query asked with the
        answer ``"[SEG]."``, masks at the original size, gIoU/cIoU by
        :class:`~lisa_kit.metrics.SegMetrics`; ranks split the images and their statistics
        are gathered. ``None`` without ``train.val``."""
        from lisa_kit.evaluate import Evaluator, Query, queries_of
        from lisa_kit.metrics import SegMetrics, all_gather_metrics

        reader = self.val_reader()
        if reader is None:
            return None
        env = self.env
        model = self.model
        was_training = model.training
        model.eval()
        ev = Evaluator(model, reader, modes=("teacher",), progress=False)
        n = len(reader) if self.cfg.val.limit is None else min(self.cfg.val.limit, len(reader))
        per_rank = math.ceil(n / env.world_size)
        order = list(range(n)) * env.world_size
        mine = order[:per_rank * env.world_size][env.rank::env.world_size]
        metrics = SegMetrics()
        lockstep = env.sharded
        t0 = time.perf_counter()
        for i in mine:
            record = reader[i]
            qs = queries_of(record)
            image = record.image()
            if not qs:
                if lockstep:  # every rank must run the same number of sharded forwards
                    h, w = image.shape[:2]
                    with self._autocast():
                        ev.teacher(record, image, [Query("object", "phrase", np.zeros((h, w), np.uint8), "-", "-")])
                continue
            with self._autocast():
                logits = ev.teacher(record, image, qs)
            preds = [(lg > 0).cpu().numpy() for lg in logits]
            metrics.add_sample(preds, [q.gt for q in qs], keys=[q.key for q in qs], sample_key=i)
        res = all_gather_metrics(metrics).result()
        model.train(was_training)
        return {"step": self.step, "giou": res["giou"], "ciou": res["ciou"], "n_queries": res["n_queries"],
                "n_images": res["n_samples"], "seconds": time.perf_counter() - t0,
                "dataset": f"{self.cfg.val.dataset}:{self.cfg.val.split}"}

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self, name: str | None = None) -> Path | None:
        """Write a checkpoint (collective; rank 0 writes). ``name``: ``step_XXXXXX`` by
        default (then older ones are pruned to ``keep_last``), or e.g. ``best``."""
        env = self.env
        what = f"the checkpoint {name or ckpt.step_name(self.step)} of step {self.step}"
        weights = full_state(self.model, self.trainable_names, env)
        optim = optimizer_state(self.model, self.optimizer, env)
        rngs = all_gather_object(ckpt.rng_state(), env)
        path, failure = None, None
        try:
            if env.is_main:
                path = self._write(name, weights, optim, rngs)
        except Exception as e:  # any failure, not only I/O: the other ranks must hear of it
            failure = e
        self._agree_on_failure(failure, what)
        return path

    def _agree_on_failure(self, failure: BaseException | None, what: str) -> None:
        """In place of a barrier after rank 0 wrote ``what``: every rank learns whether the
        write failed anywhere and raises a typed error, so none waits in a collective that
        the failed rank never joins (an I/O error says what and where; another failure is a
        :class:`TrainingError` chained to it; the ranks that did not fail raise
        :class:`RankFailedError`)."""
        def wrap(e: BaseException) -> LisaKitError:
            if isinstance(e, OSError):
                return self._write_error(e, what)
            return TrainingError(f"could not write {what}: {type(e).__name__}: {e}")

        raise_on_any_failure(failure, self.env, wrap,
                             lambda ranks: f"rank {', '.join(map(str, ranks))} could not write {what} "
                                           "(its error says why)")

    def _write(self, name, weights, optim, rngs) -> Path:
        """rank 0: write the checkpoint ``name`` (default ``step_XXXXXX``, then prune)."""
        env = self.env
        meta = {"step": self.step, "epoch": self.epoch, "position": self.position,
                "world_size": env.world_size, "batch_size": self.cfg.batch_size, "strategy": env.strategy,
                "optimizer_format": "fqn" if env.sharded else "index",
                "best_giou": self.best_giou, "val": self.last_val, "trainable": self.trainable_names,
                "frozen_fingerprint": self.fingerprint,
                ckpt.FINGERPRINT_DTYPE: ckpt.dtype_name(self.fingerprint_dtype)}
        state = {"optimizer": optim, "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}
        data = ckpt.CheckpointData(weights, state, rngs, meta, self.recipe_yaml)
        path = ckpt.write_checkpoint(self.ckpt_root, name or ckpt.step_name(self.step), data)
        if name is None:
            ckpt.prune_checkpoints(self.ckpt_root, self.cfg.keep_last)
        return path

    def _write_error(self, e: OSError, what: str) -> TrainingError:
        """The error for a failed write of ``what``: a full disk said as such, the file,
        and the newest checkpoint, which the failed write left intact."""
        reason = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded"}.get(
            e.errno, f"the write failed ({e.strerror or e})")
        found = ckpt.list_checkpoints(self.ckpt_root)
        kept = (f"the previous checkpoint {found[-1][1]} (step {found[-1][0]}) is intact" if found
                else "no checkpoint had been written yet")
        return TrainingError(f"{reason}: cannot write {what} ({e.filename}); {kept}; free space, then continue with "
                             f"`lisa-kit train --resume {self.out}`")

    # -- run files -------------------------------------------------------------------------------
    def _set_aside_damaged(self) -> None:
        """Rename this run's damaged checkpoints that the resume passed over to
        ``<name>.damaged`` (kept for a look): left as ``step_*`` they would count as the
        newest when pruning, which could delete the intact ones."""
        for path in self.damaged:
            if path.parent == self.ckpt_root and path.is_dir():
                aside, n = path.with_name(path.name + ".damaged"), 1
                while aside.exists():
                    aside, n = path.with_name(f"{path.name}.damaged{n}"), n + 1
                os.replace(path, aside)
                warnings.warn(f"damaged checkpoint {path} renamed to {aside.name}", stacklevel=3)

    def _start_run_files(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "recipe.yaml").write_text(self.recipe_yaml)
        env = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv, "versions": versions(),
               "git": git_state(), "world_size": self.env.world_size, "strategy": self.env.strategy,
               "device": str(self.env.device),
               "cuda": torch.cuda.get_device_name(self.env.device) if self.env.device.type == "cuda" else None,
               "resumed_from": str(self.resumed_from) if self.resumed_from else None, "start_step": self.step}
        name = "env.json" if self.resumed_from is None else f"env.resume_{ckpt.step_name(self.step)}.json"
        (self.out / name).write_text(json.dumps(env, indent=1))
        for log in ("train.jsonl", "val.jsonl"):  # drop lines of steps after the checkpoint we resume from
            path = self.out / log
            if path.exists():
                _write_atomic(path, "".join(ln + "\n" for ln in _read_log(path, self.step)))

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed
            return None
        return SummaryWriter(str(self.out / "tb"))

    # -- the loop ------------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train until ``train.steps`` (or ``stop_after``, or a SIGINT/SIGTERM: then with
        a checkpoint at the step boundary, and ``signal``/``exit_code`` in the summary);
        returns a summary."""
        env = self.env
        if self.ckpt_root.is_dir() and ckpt.list_checkpoints(self.ckpt_root) and self.resumed_from is None:
            raise CheckpointError("the run directory already has checkpoints; resume it or choose another output "
                                  "directory", file=self.out)
        main = env.is_main
        barrier(env)  # every rank has read its checkpoint before rank 0 tidies the directory
        failure = None
        try:
            if main:
                for note in ckpt.recover(self.ckpt_root):
                    warnings.warn(note, stacklevel=2)
                self._set_aside_damaged()
                self._start_run_files()
        except Exception as e:  # any failure: the other ranks must hear of it
            failure = e
        self._agree_on_failure(failure, "the run files")
        announce = stderr_line if main else (lambda text: None)
        with StopSignals(announce) as signals:  # also while saying where it stopped: torchrun may signal again
            saved = self._fit(signals)
            if self.stopped_by is not None:  # also on the ranks that only heard of another's signal
                signals.stopping(self.stopped_by)
            stopped = signal.Signals(self.stopped_by).name if self.stopped_by is not None else None
            if stopped and main:
                where = f"checkpoint {saved}" if saved else "no checkpoint"
                print(f"stopped by {stopped} at step {self.step} (epoch {self.epoch}, sample {self.position} of the "
                      f"epoch per rank); {where}; continue with `lisa-kit train --resume {self.out}`",
                      file=sys.stderr, flush=True)
        summary = {"step": self.step, "last": self._last_record, "val": self.last_val, "best_giou": self.best_giou,
                   "checkpoint": str(saved) if saved else None, "out": str(self.out)}
        if stopped:
            summary.update(signal=stopped, exit_code=exit_code(self.stopped_by))
        return summary

    def _fit(self, signals: StopSignals) -> Path | None:
        """The loop of :meth:`fit`; returns the checkpoint written at the last step done."""
        from tqdm import tqdm

        cfg, env = self.cfg, self.env
        end = cfg.steps if self.stop_after is None else min(cfg.steps, self.stop_after)
        main = env.is_main
        writer = self._tensorboard() if main else None
        bar = tqdm(total=end, initial=self.step, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr,
                   disable=not (self.progress and main))
        batches = self._micro_batches()
        saved = None
        try:
            while self.step < end:
                t0 = time.perf_counter()
                drawn = [next(batches) for _ in range(cfg.grad_accumulation)]
                stats = self.train_step([m for m, _ in drawn], [w for _, w in drawn])
                if stats.get("skipped"):  # no optimizer step, but a boundary: a signal still stops here
                    stop = self._step_boundary(signals)
                    if stop is not None:
                        saved, self.stopped_by = self.save(), stop
                        break
                    continue
                dt = time.perf_counter() - t0
                record = {"step": stats["step"], "loss": stats["loss"], "ce": stats["ce"], "bce": stats["bce"],
                          "dice": stats["dice"], "lr": stats["lr"], "grad_norm": stats["grad_norm"],
                          "samples_per_s": stats["samples"] / dt, "time": time.time(), "epoch": self.epoch}
                self._last_record = record
                saved = None
                if main:
                    self._log(self.out / "train.jsonl", record)
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == end:
                        bar.set_postfix(loss=f"{record['loss']:.4f}", ce=f"{record['ce']:.3f}",
                                        bce=f"{record['bce']:.3f}", dice=f"{record['dice']:.3f}",
                                        lr=f"{record['lr']:.2e}", sps=f"{record['samples_per_s']:.1f}")
                        if writer is not None:
                            for k in ("loss", "ce", "bce", "dice", "lr", "grad_norm", "samples_per_s"):
                                writer.add_scalar(f"train/{k}", record[k], self.step)
                val_due = cfg.val is not None and cfg.val_every > 0 and (
                    self.step % cfg.val_every == 0 or self.step == cfg.steps)
                if val_due:
                    self._run_validation(writer, bar)
                stop = self._step_boundary(signals)
                if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == end or stop is not None:
                    saved = self.save()
                if stop is not None:
                    self.stopped_by = stop
                    break
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        return saved

    def _log(self, path: Path, record: dict) -> None:
        """rank 0: append ``record`` to a log; a failed write is raised at the step boundary."""
        try:
            _append_line(path, record)
        except OSError as e:
            self._log_failure = self._log_failure or (e, path.name)

    def _step_boundary(self, signals: StopSignals) -> int | None:
        """Agree across ranks, once per step, on stopping: the signal to stop for (SIGTERM
        before SIGINT when ranks got different ones) or ``None``; a failed log write on
        rank 0 is a :class:`TrainingError` on every rank."""
        got = signals.received
        flags = [float(got == signal.SIGINT), float(got == signal.SIGTERM), float(self._log_failure is not None)]
        n_int, n_term, n_failed = all_reduce_sum(flags, self.env)
        if n_failed:
            if self._log_failure is not None:
                e, what = self._log_failure
                raise self._write_error(e, what) from e
            raise TrainingError(f"rank 0 could not write its log at step {self.step} (its error says why)")
        return signal.SIGTERM if n_term else signal.SIGINT if n_int else None

    def _run_validation(self, writer=None, bar=None) -> dict | None:
        res = self.validate()
        if res is None:
            return None
        self.last_val = res
        if self.env.is_main:
            self._log(self.out / "val.jsonl", res)
            if writer is not None:
                writer.add_scalar("val/giou", res["giou"], self.step)
                writer.add_scalar("val/ciou", res["ciou"], self.step)
            if bar is not None:
                bar.write(f"step {self.step}: val gIoU {res['giou']:.4f} cIoU {res['ciou']:.4f} "
                          f"({res['n_queries']} queries)")
        if self.best_giou is None or res["giou"] > self.best_giou:
            self.best_giou = res["giou"]
            self.save(ckpt.BEST)
        return res


def train(recipe=None, out_dir=None, **kwargs) -> dict:
    """Build a :class:`Trainer` and run it; tears the process group down afterwards."""
    from lisa_kit.train.distributed import cleanup

    try:
        return Trainer(recipe, out_dir, **kwargs).fit()
    finally:
        cleanup()
