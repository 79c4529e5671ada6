"""Process groups and model wrapping for multi-process training.

Launch with ``torchrun`` (its ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``
environment is detected); one process per GPU (``nccl``) or per CPU worker (``gloo``).

Strategies (``train.strategy``):

* ``ddp``: every rank holds the model; gradients of the trainable parameters are averaged
  (``DistributedDataParallel``, ``find_unused_parameters`` since SAM's IoU head and a
  batch without ``[SEG]`` leave parameters without gradient).
* ``fsdp2``: ``torch.distributed.fsdp.fully_shard`` on each LLM decoder layer and on the
  whole model: parameters, gradients and optimizer state are sharded; checkpoints gather
  full state dicts on save (rank 0 writes).
* ``zero2``: ZeRO stage 2, LISA's DeepSpeed setting, on torch's own engine: the same
  ``fully_shard`` with ``reshard_after_forward=False``, so gradients and optimizer state
  are sharded while the gathered parameters stay from forward to backward (no second
  all-gather: faster than ``fsdp2``, more memory). DeepSpeed itself is not used: it would
  need its own engine and loop, and this gives its stage-2 memory layout.
* ``single``: one process (an error under a multi-process launch).

Rank 0 logs and writes; every collective here is called on all ranks.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


SHARDED = ("fsdp2", "zero2")


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    strategy: str = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        """Parameters live as FSDP2 shards (``fsdp2`` or ``zero2`` over several processes)."""
        return self.distributed and self.strategy in SHARDED


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank under ``torchrun`` (0 otherwise), known before the group is joined."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(strategy: str = "ddp", device: str | None = None) -> DistEnv:
    """Detect a ``torchrun`` launch and join the process group (``nccl`` on CUDA, ``gloo``
    otherwise). A single process returns ``DistEnv(strategy="single")``."""
    world = launched_world_size()
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if world <= 1:
        return DistEnv(device=torch.device("cuda", 0) if use_cuda else torch.device("cpu"))
    if strategy == "single":
        from lisa_kit.errors import RecipeError

        raise RecipeError(f"launched with {world} processes but the strategy is `single`; use ddp, fsdp2 or zero2",
                          key="train.strategy")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev, backend = torch.device("cuda", local_rank), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev, backend=backend,
                   strategy=strategy)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum a few floats over ranks (float64)."""
    if not env.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device if env.backend == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def failed_ranks(failed: bool, env: DistEnv) -> list[int]:
    """The ranks on which ``failed`` is true (collective: every rank calls it, failed or not;
    ``[]`` or ``[0]`` in one process). Called in place of the next collective after work that
    may fail on some ranks only, so every rank learns of it and none is left waiting."""
    if not env.distributed:
        return [0] if failed else []
    flags = all_reduce_sum([float(failed and r == env.rank) for r in range(env.world_size)], env)
    return [r for r, f in enumerate(flags) if f]


def raise_on_any_failure(failure: BaseException | None, env: DistEnv, wrap, others) -> None:
    """Agree on a failure (collective, in place of the next collective after work that may
    fail on some ranks only): returns when no rank failed; else every rank raises a typed
    error, so none is left waiting for a rank that will never join. The failed rank raises a
    :class:`~lisa_kit.errors.LisaKitError` as it is and another error as ``wrap(failure)``
    (a ``LisaKitError``) chained to it; the ranks that did not fail raise
    :class:`~lisa_kit.errors.RankFailedError` with the message ``others(ranks)``."""
    from lisa_kit.errors import LisaKitError, RankFailedError

    ranks = failed_ranks(failure is not None, env)
    if not ranks:
        return
    if isinstance(failure, LisaKitError):
        raise failure
    if failure is not None:
        raise wrap(failure) from failure
    raise RankFailedError(others(ranks), ranks=ranks)


def group_env() -> DistEnv:
    """A :class:`DistEnv` for the process group this process has joined (one process: the default)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistEnv()
    backend = dist.get_backend()
    dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), device=dev, backend=backend)


def all_gather_object(obj, env: DistEnv) -> list:
    if not env.distributed:
        return [obj]
    out: list = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, env: DistEnv):
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _decoder_layers(model) -> list[nn.Module]:
    """The LLM's transformer blocks (``nn.ModuleList`` named ``layers``/``h``/``blocks``)."""
    lm = model.llm.model
    for name, mod in lm.named_modules():
        if isinstance(mod, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks") and len(mod):
            return list(mod)
    return []


def wrap_model(model: nn.Module, env: DistEnv, step_module: nn.Module | None = None,
               param_dtype: torch.dtype | None = None) -> nn.Module:
    """The module the training step calls. ``step_module`` (default ``model``) computes
    the loss from ``model``: DDP wraps it, so DDP finds exactly the parameters that reach
    the loss (SAM's IoU head, or the seg head of a batch without ``[SEG]``, produce
    outputs but never gradients). FSDP2 shards ``model`` in place (each LLM decoder layer,
    then the whole model; ``param_dtype``: the dtype parameters are gathered in, fp32
    shards kept, gradients reduced in fp32) and ``step_module`` is called as is."""
    step_module = model if step_module is None else step_module
    if not env.distributed:
        return step_module
    if env.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.local_rank] if env.device.type == "cuda" else None
        return DistributedDataParallel(step_module, device_ids=ids, find_unused_parameters=True)
    if env.strategy in SHARDED:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(env.device.type, (env.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        keep = env.strategy == "zero2"  # ZeRO-2: parameters not resharded between forward and backward
        for layer in _decoder_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=not keep)
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=not keep)
        return step_module
    raise ValueError(f"unknown strategy {env.strategy!r}")


def unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


def full_state(model: nn.Module, names: list[str], env: DistEnv) -> dict[str, torch.Tensor]:
    """CPU copies of the named parameters of ``model`` (the unwrapped model), gathered
    from shards under FSDP2 (collective there: call on every rank)."""
    if env.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        wanted = set(names)
        return {k: v for k, v in sd.items() if k in wanted}
    params = dict(model.named_parameters())
    return {n: params[n].detach().to("cpu", copy=True) for n in names}


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv) -> dict:
    """The optimizer state to save: ``optimizer.state_dict()`` (parameters by index), or
    under FSDP2 the full state keyed by parameter name (collective)."""
    if env.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, env: DistEnv) -> None:
    if env.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        # strict=False: parameters that never got a gradient (SAM's IoU head) have no state
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    optimizer.load_state_dict(state)
