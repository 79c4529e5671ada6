"""Reading weights one tensor at a time and placing them into (possibly empty) modules.

Loading never holds more than the final model plus one tensor in flight:

* :func:`empty_weights` builds modules whose parameters live on the ``meta`` device (no
  memory); buffers are created for real, so tables a checkpoint does not hold (RoPE
  ``inv_freq``, SAM's ``pixel_mean``, CLIP's ``position_ids``) come out exactly as a normal
  build makes them.
* :func:`iter_tensors` streams a checkpoint (one file, or a HF directory with
  ``model.safetensors`` / ``pytorch_model.bin`` / a sharded ``*.index.json``) shard by
  shard: safetensors tensor by tensor with plain reads (header checked against the file
  size), ``.bin`` with ``torch.load(mmap=True, weights_only=True)``, each tensor copied
  out of the mapping and its pages released. Nothing here unpickles code.
* :class:`Placer` casts each tensor once to its target dtype and device and assigns it
  to the parameter or buffer it names (ties between parameters are kept); at the end it
  reports missing and unexpected keys. :func:`load_into` is the same for a dict.
* :func:`estimate_bytes` / :func:`ensure_memory` refuse a load that cannot fit, before
  anything is read.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lisa_kit.errors import CheckpointError, InsufficientMemoryError

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")

def fp32_prefixes(component) -> tuple[str, ...]:
    """The key prefixes ``component`` (a module, or its class before it is built) keeps in
    the precision it was built in; ``()``: none (the component takes the precision whole).
    Declared by the component (:attr:`lisa_kit.interfaces.MaskDecoder.fp32_prefixes`)."""
    return tuple(getattr(component, "fp32_prefixes", ()) or ())


def param_dtype(component, key: str, dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype the floating tensor ``key`` (a state-dict key of ``component``) is stored in
    when the model is asked for ``dtype``; ``None``: the dtype it was built in.

    The one precision rule: the streaming loader (:class:`Placer`), the estimates that
    refuse a load that cannot fit, and the cast of a built model
    (:func:`cast_component`) all ask it. LISA casts the whole model (``model.bfloat16()``);
    a component keeps fp32 only under the prefixes it declares (SAM: its prompt encoder,
    whose positional encoding segment-anything builds in fp32, and its small mask decoder)."""
    if dtype is None or key.startswith(fp32_prefixes(component)):
        return None
    return dtype


def component_dtype(kind: str, dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype a whole ``kind`` component is cast to when nothing is known of it but its
    kind (its interface's declaration): ``None`` for a mask decoder (kept as built)."""
    from lisa_kit import interfaces

    iface = {"mask_decoder": interfaces.MaskDecoder}.get(kind)
    return param_dtype(iface, "", dtype)


def declared_class(kind: str, node: dict | None, registry=None):
    """What a recipe node of ``kind`` builds, for its declared constants, without building:
    its spec's ``component_class``, else the kind's interface (``None``: a kind without one
    or a node the registry does not know, whose errors the build reports)."""
    from lisa_kit import interfaces

    iface = {"mask_decoder": interfaces.MaskDecoder}.get(kind)
    name = (node or {}).get("name")
    if name is None:
        return iface
    from lisa_kit.errors import LisaKitError
    from lisa_kit.registry import get_registry

    try:
        spec = (registry or get_registry()).get(kind, name)
    except LisaKitError:  # an unknown name: the build raises it again, where it is reported
        return iface
    return spec.component_class or iface


def cast_component(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast a built component in place by :func:`param_dtype` (parameters keep their
    identity, so ties stay tied). Non-persistent float buffers (pixel mean/std, RoPE
    tables) keep their precision, as transformers' ``from_pretrained(dtype=...)`` leaves
    them; a component already in ``dtype`` is left as it is (no copies)."""
    with torch.no_grad():
        for prefix, mod in module.named_modules():
            pre = f"{prefix}." if prefix else ""
            for name, p in mod._parameters.items():
                target = param_dtype(module, pre + name, dtype) if p is not None and p.is_floating_point() else None
                if target is not None and p.dtype != target:
                    p.data = p.data.to(target)
            for name, b in mod._buffers.items():
                if b is None or not b.is_floating_point() or name in mod._non_persistent_buffers_set:
                    continue
                target = param_dtype(module, pre + name, dtype)
                if target is not None and b.dtype != target:
                    mod._buffers[name] = b.to(target)


# -- building without memory -------------------------------------------------------------
@contextmanager
def empty_weights():
    """Inside, every parameter a module registers *in this thread* is moved to the ``meta``
    device (shape and dtype kept, no memory); buffers stay real. Initialisers then run on
    meta tensors, which costs nothing. Weights must be assigned afterwards (:class:`Placer`).

    Thread-safe: ``nn.Module.register_parameter`` is patched once while any thread is inside
    (a count under a lock) and the patch asks a thread-local flag, so other threads keep
    building real modules, and nested or concurrent uses restore the original exactly once."""
    global _patched_users, _saved_register
    depth = getattr(_empty_state, "depth", 0)
    _empty_state.depth = depth + 1
    with _patch_lock:
        if _patched_users == 0:
            _saved_register = nn.Module.register_parameter
            nn.Module.register_parameter = _register_maybe_meta
        _patched_users += 1
    try:
        yield
    finally:
        with _patch_lock:
            _patched_users -= 1
            if _patched_users == 0:
                nn.Module.register_parameter = _saved_register
        _empty_state.depth = depth


_patch_lock = threading.Lock()
_patched_users = 0  # threads (and nested uses) inside empty_weights, under _patch_lock
_saved_register = nn.Module.register_parameter  # what the patch wraps (set when it is installed)
_empty_state = threading.local()  # .depth: this thread's nesting of empty_weights


def _register_maybe_meta(module, name, param):
    if getattr(_empty_state, "depth", 0) and param is not None and param.device.type != "meta":
        extra = {k: v for k, v in param.__dict__.items() if k != "_is_param"}
        param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        param.__dict__.update(extra)
    _saved_register(module, name, param)


def meta_keys(module: nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``module`` that hold no data (meta)."""
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return [k for k, t in named if t.device.type == "meta"]


# -- reading ------------------------------------------------------------------------------
def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The weight files of ``path`` in load order; every shard an index names must exist."""
    path = Path(path)
    if not path.is_dir():
        if not path.exists():
            raise CheckpointError(f"checkpoint file not found: {path}", file=path)
        return [path]
    for index in INDEX_FILES:
        f = path / index
        if f.exists():
            shards = sorted(set(_weight_map(f).values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise CheckpointError(f"the shard index names {len(missing)} file(s) that are not there: "
                                      f"{', '.join(missing[:5])}", file=f)
            return [path / s for s in shards]
    for single in SINGLE_FILES:
        if (path / single).exists():
            return [path / single]
    raise CheckpointError(f"no weights in {path} (looked for {', '.join(SINGLE_FILES)} and shard indexes)",
                          file=path)


def _weight_map(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the shard index: {e}", file=index) from e
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise CheckpointError("the shard index has no weight_map of key -> file", file=index)
    if any(Path(v).name != v for v in wm.values()):
        raise CheckpointError("the shard index names files outside its directory", file=index)
    return wm


def _torch_load(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """A torch pickle of tensors and whether it is memory-mapped (no copy until a tensor is
    used); files in torch's legacy (pre-zip) format cannot be mapped and are read whole."""
    mapped = True
    try:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            sd, mapped = torch.load(str(path), map_location="cpu", weights_only=True), False
    except Exception as e:  # pickles with code, truncated or corrupt files
        raise CheckpointError(f"cannot read {path} as a tensor checkpoint (weights_only): "
                              f"{type(e).__name__}: {e}", file=path) from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors", file=path)
    return sd, mapped


_MADV_DONTNEED = 4  # <sys/mman.h>


def _drop_pages(t: torch.Tensor) -> None:
    """Let the kernel drop the resident pages of a memory-mapped tensor that has been read
    (they are the file's, unmodified: a later read would fetch them again). Keeps the
    process's resident memory at the model plus one tensor while a large shard is read."""
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    page = mmap.PAGESIZE
    lo, hi = -(-start // page) * page, end // page * page  # whole pages inside this tensor only
    if hi > lo and _libc is not None:
        _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


try:
    _libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
except OSError:  # pragma: no cover
    _libc = None


def _bin_tensors(path: Path, want=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a torch pickle, each copied out of the file mapping into its own memory
    (aligned, independent of the file), the mapping's pages released as it goes."""
    sd, mapped = _torch_load(path)
    for k, v in sd.items():
        if want is not None and not want(k):
            continue
        if not mapped:
            yield k, v
            continue
        own = v.clone()
        _drop_pages(v)
        yield k, own


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "C64": torch.complex64,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}
_HEADER_LEN_BYTES = 8  # safetensors: a little-endian u64 header length, the JSON header, then the data
_MAX_HEADER_BYTES = 100 * 1000 * 1000  # the safetensors library's own cap on the JSON header


def _safetensors_header(path: Path) -> tuple[int, dict]:
    """``(data start, {key: (dtype, shape, begin, end)})`` of a safetensors file, checked
    against the file's size (a truncated file is reported, not read past)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(_HEADER_LEN_BYTES)
        n = int.from_bytes(raw, "little") if len(raw) == _HEADER_LEN_BYTES else -1
        if n < 0 or _HEADER_LEN_BYTES + n > size or n > _MAX_HEADER_BYTES:
            raise CheckpointError(f"{path.name} is not a safetensors file or is truncated (header runs past the end)",
                                  file=path)
        try:
            header = json.loads(fh.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path.name}: unreadable safetensors header: {e}", file=path) from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: the safetensors header is not a mapping", file=path)
    start, out = _HEADER_LEN_BYTES + n, {}
    for k, info in header.items():
        if k == "__metadata__":
            continue
        try:
            name, shape, (begin, end) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
            if not (isinstance(begin, int) and isinstance(end, int)):
                raise TypeError("data_offsets must be integers")
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path.name}: malformed header entry", key=k, file=path) from e
        dtype = _SAFETENSORS_DTYPES.get(name)
        if dtype is None:
            raise CheckpointError(f"{path.name}: tensor dtype {name} cannot be loaded", key=k, file=path)
        if end - begin != _numel(shape) * dtype.itemsize or begin < 0:
            raise CheckpointError(f"{path.name}: header offsets do not match the tensor's shape", key=k, file=path)
        if start + end > size:
            raise CheckpointError(f"{path.name} is truncated: {k} ends at byte {start + end} of {size}", key=k,
                                  file=path)
        out[k] = (dtype, tuple(shape), begin, end)
    return start, out


def _read_safetensors(path: Path, want=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a safetensors file, each read into its own freshly allocated (aligned)
    memory with plain file reads: nothing is memory-mapped, so the page cache never counts
    against the process, and kernels see the same alignment as for any torch tensor.
    ``want(key)`` false: the tensor is not read at all."""
    start, entries = _safetensors_header(path)
    with open(path, "rb") as fh:
        for k, (dtype, shape, begin, end) in entries.items():
            if want is not None and not want(k):
                continue
            buf = torch.empty(end - begin, dtype=torch.uint8)
            fh.seek(start + begin)
            if fh.readinto(memoryview(buf.numpy())) != end - begin:
                raise CheckpointError(f"{path.name} is truncated", key=k, file=path)
            yield k, buf.view(dtype).reshape(shape)


def _file_tensors(path: Path, want=None) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix == ".safetensors":
        yield from _read_safetensors(path, want)
    else:
        yield from _bin_tensors(path, want)


def iter_tensors(path: str | os.PathLike, want=None) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """``(key, tensor, file)`` of every tensor of a checkpoint, one shard open at a time;
    with ``want(key) -> bool``, only the tensors it wants (safetensors: the others are
    never read, e.g. the language model's when only a VLM's vision tower is loaded)."""
    for f in checkpoint_files(path):
        yield from ((k, v, f) for k, v in _file_tensors(f, want))
        _trim_heap()


def _trim_heap() -> None:
    """Hand the heap's free pages back to the system (glibc keeps the holes that per-tensor
    read and cast buffers leave, some hundreds of MB over a 7B-sized load)."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def checkpoint_keys(path: str | os.PathLike) -> list[str]:
    """The tensor names of a checkpoint, read from its index or headers (no tensor data)."""
    p = Path(path)
    for index in INDEX_FILES:
        if p.is_dir() and (p / index).exists():
            return list(_weight_map(p / index))
    return [k for k, _, _ in header_entries(path)]


def header_entries(path: str | os.PathLike) -> Iterator[tuple[str, tuple[int, ...], torch.dtype]]:
    """``(key, shape, dtype)`` of every tensor of a checkpoint (a file or a directory, see
    :func:`checkpoint_files`) without reading data: safetensors headers (checked against the
    file size), a memory-mapped torch pickle's tensors (``weights_only``; a ``state_dict``
    wrapper unwrapped). The one header reader: loading, estimates and export ask it."""
    for f in checkpoint_files(path):
        if f.suffix == ".safetensors":
            for k, (dtype, shape, _, _) in _safetensors_header(f)[1].items():
                yield k, shape, dtype
        else:
            for k, v in _torch_load(f)[0].items():
                yield k, tuple(v.shape), v.dtype


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The whole state of a checkpoint as one dict (``.bin`` tensors stay memory-mapped).
    For small files and tools; model loading streams with :func:`iter_tensors`."""
    return {k: v for k, v, _ in iter_tensors(path)}


# -- memory ------------------------------------------------------------------------------
def estimate_bytes(path: str | os.PathLike, dtype_for: Callable[[str], torch.dtype | None] = lambda k: None,
                   keep: Callable[[str], bool] = lambda k: True) -> int:
    """Bytes the tensors of ``path`` take once loaded: floating tensors at ``dtype_for(key)``
    (``None``: as stored), others as stored; only the keys ``keep`` accepts. Read from headers only."""
    total = 0
    for k, shape, dt in header_entries(path):
        if not keep(k):
            continue
        target = dtype_for(k) if dt.is_floating_point else None
        total += _numel(shape) * (target or dt).itemsize
    return total


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def available_bytes(device: torch.device | str | None) -> int | None:
    """Free memory of ``device``: ``torch.cuda.mem_get_info`` on CUDA, ``MemAvailable`` of
    ``/proc/meminfo`` on CPU; ``None`` when it cannot be told (other platforms)."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the file counts kB
    except OSError:
        return None
    return None


def ensure_memory(needed: int, device: torch.device | str | None, what: str) -> None:
    """Raise :class:`InsufficientMemoryError` when ``needed`` bytes exceed what ``device`` has free."""
    free = available_bytes(device)
    if free is not None and needed > free:
        gib = 1024 ** 3
        raise InsufficientMemoryError(
            f"loading {what} needs about {needed / gib:.1f} GiB on {torch.device(device or 'cpu')} but only "
            f"{free / gib:.1f} GiB is free; use a lower precision (bf16), another device, or free memory",
            file=what)


# -- placing ------------------------------------------------------------------------------
@dataclass
class LoadReport:
    component: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"{self.component}:"]
        if self.missing:
            parts.append(f"missing {len(self.missing)} keys (e.g. {', '.join(self.missing[:5])})")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)} keys (e.g. {', '.join(self.unexpected[:5])})")
        if len(parts) == 1:
            parts.append("all keys matched")
        return " ".join(parts)


def _kind(t: torch.Tensor) -> str:
    return "float" if t.is_floating_point() else "bool" if t.dtype == torch.bool else \
        "complex" if t.is_complex() else "int"


class Placer:
    """Assigns checkpoint tensors to the parameters and buffers of ``module`` by name.

    Each tensor is converted once: floating tensors to ``dtype`` as the module's own rule
    gives it per key (:func:`param_dtype`: prefixes the module declares keep the dtype the
    slot was built with; ``dtype=None``: every slot's own), everything to ``device`` (``None``: the slot's device, CPU for a
    meta slot; a callable: ``key -> device``, a device map's placement). Parameters shared under several names
    (tied embeddings) stay shared.
    ``copy``: never keep the given tensors themselves (they belong to the caller, e.g. another
    module's state dict); tensors read by :func:`iter_tensors` are the loader's own and are
    kept when already in the target dtype and device.
    ``put`` checks shapes and dtypes; :meth:`finish` reports (strict: raises on) missing
    and unexpected keys and refuses a module left with meta tensors."""

    def __init__(self, module: nn.Module, component: str, dtype: torch.dtype | None = None,
                 device: torch.device | str | Callable[[str], torch.device] | None = None,
                 file: str | os.PathLike | None = None, copy: bool = False):
        self.module, self.component, self.dtype, self.file, self.copy = module, component, dtype, file, copy
        fixed = torch.device(device) if device is not None and not callable(device) else None
        self.device_for: Callable[[str], torch.device | None] = device if callable(device) else (lambda key: fixed)
        self.expected = set(module.state_dict(keep_vars=True))
        self.seen: set[str] = set()
        self.unexpected: list[str] = []
        # Names under which the same Parameter object is registered (ties): assigned together.
        groups: dict[int, list[str]] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        self.tied = {n: names for names in groups.values() if len(names) > 1 for n in names}

    def _slot(self, key: str) -> tuple[nn.Module, str, torch.Tensor, bool]:
        prefix, _, name = key.rpartition(".")
        mod = self.module.get_submodule(prefix) if prefix else self.module
        if name in mod._parameters:
            return mod, name, mod._parameters[name], True
        return mod, name, mod._buffers[name], False

    def put(self, key: str, value: torch.Tensor, file: str | os.PathLike | None = None) -> None:
        file = file or self.file
        if key not in self.expected:
            self.unexpected.append(key)
            return
        mod, name, old, is_param = self._slot(key)
        if tuple(old.shape) != tuple(value.shape):
            raise CheckpointError(f"shape mismatch for {self.component}.{key}: checkpoint {tuple(value.shape)}, "
                                  f"model {tuple(old.shape)}", component=self.component, key=key, file=file)
        if _kind(old) != _kind(value) or value.dtype not in _LOADABLE:
            raise CheckpointError(f"{self.component}.{key} is stored as {value.dtype}, which cannot be loaded into "
                                  f"a {old.dtype} tensor", component=self.component, key=key, file=file)
        dtype = (param_dtype(self.module, key, self.dtype) if old.is_floating_point() else None) or old.dtype
        device = self.device_for(key) or (old.device if old.device.type != "meta" else torch.device("cpu"))
        with torch.no_grad():
            new = value.to(device=device, dtype=dtype, copy=self.copy)
            if new.data_ptr() % _ALIGNMENT:  # e.g. a view into someone's memory-mapped file
                new = new.clone()
        if is_param:
            param = nn.Parameter(new, requires_grad=old.requires_grad)
            for other in self.tied.get(key, [key]):
                m, n, _, _ = self._slot(other)
                m._parameters[n] = param
                self.seen.add(other)
        else:
            mod._buffers[name] = new
        self.seen.add(key)

    def finish(self, strict: bool = True) -> LoadReport:
        report = LoadReport(self.component, sorted(self.expected - self.seen), sorted(self.unexpected))
        if strict and (report.missing or report.unexpected):
            raise CheckpointError(f"checkpoint does not fit {report}", component=self.component,
                                  key=(report.missing or report.unexpected)[0], file=self.file)
        empty = meta_keys(self.module)
        if empty:
            raise CheckpointError(f"{self.component} was built without weights and the checkpoint does not give "
                                  f"{len(empty)} of them (e.g. {', '.join(empty[:5])})", component=self.component,
                                  key=empty[0], file=self.file)
        return report


# torch's CPU allocator aligns to 64 bytes; kernels vectorise differently on other addresses
# (last-bit differences), so a memory-mapped tensor off that alignment is copied.
_ALIGNMENT = 64

# Dtypes a checkpoint tensor may be stored in (float8 and complex weights are refused by name).
_LOADABLE = {torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
             torch.int8, torch.uint8, torch.bool}


def load_into(module: nn.Module, state: dict[str, torch.Tensor], component: str, strict: bool = True,
              dtype: torch.dtype | None = None, device: torch.device | str | None = None,
              file: str | os.PathLike | None = None) -> LoadReport:
    """Assign copies of ``state``'s tensors to ``module`` (built normally or under
    :func:`empty_weights`); shapes must match (the error names the key); with ``strict`` any
    missing or unexpected key is an error naming the component."""
    placer = Placer(module, component, dtype=dtype, device=device, file=file, copy=True)
    for k, v in state.items():
        placer.put(k, v)
    return placer.finish(strict)


def load_file_into(module: nn.Module, path: str | os.PathLike, component: str, strict: bool = True,
                   dtype: torch.dtype | None = None,
                   device: torch.device | str | Callable[[str], torch.device] | None = None,
                   keys: Callable[[str], str | None] | None = None) -> LoadReport:
    """:func:`load_into` streaming from a checkpoint file or directory, one tensor at a time.
    ``keys``: the module's key for a file's key (``None``: not for this module, skipped)."""
    placer = Placer(module, component, dtype=dtype, device=device, file=path)
    for k, v, f in iter_tensors(path):
        key = keys(k) if keys is not None else k
        if key is not None:
            placer.put(key, v, f)
    return placer.finish(strict)


def save_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Atomic: written to a temporary name, then renamed. Tensors that share memory (tied
    embeddings) are stored as separate copies, which loads back into the tied module."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        v = v.detach().cpu()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone().contiguous() if ptr in seen else v.contiguous()
        seen.add(ptr)
    try:
        save_file(out, str(tmp))
        os.replace(tmp, path)
    except BaseException:  # a full disk, an interrupt: no half-written file left beside the real one
        tmp.unlink(missing_ok=True)
        raise
