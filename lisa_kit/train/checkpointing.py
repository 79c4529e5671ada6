"""Atomic training checkpoints.

A run directory keeps its checkpoints under ``checkpoints/``::

    checkpoints/step_000500/     one per save (the newest ``keep_last`` are kept)
        trainable.safetensors    the trained parameters, by name (fp32)
        state.pt                 optimizer, LR scheduler and GradScaler state (torch.save;
                                 read back with torch.load(weights_only=True))
        rng.pt                   every rank's RNG states: python, numpy, torch CPU, CUDA
        recipe.yaml              the resolved recipe (model, data and train sections)
        trainer.json             step, data position (epoch, samples consumed per rank),
                                 world size, strategy, best gIoU, a fingerprint of the
                                 frozen weights
        manifest.json            size and sha256 of each file above; written last
    checkpoints/best/            the same, for the best validation gIoU so far

A checkpoint is written into ``<name>.tmp/`` (every file fsynced) and renamed into place
in one ``os.replace``: a process killed while saving leaves at most a ``.tmp`` directory,
which :func:`latest_checkpoint` ignores (the previous checkpoint stays the latest), and
the next save of that name removes it. A name that exists already (``best``) is replaced
in four moves -- write the new one, rename the old one aside (``<name>.old``), rename the
new one in, remove the old one -- and :func:`recover` (run before each save and when a
trainer starts) completes or undoes a replacement that a kill interrupted, so ``best/``
exists whenever it has existed. :func:`find_resumable` checks every file against the
manifest and falls back from a damaged newest checkpoint to the previous intact one. A
write that fails (full disk) removes its ``.tmp`` and leaves the previous checkpoints as
they were.

Only the trained parameters are stored: the frozen ones come from the recipe (pretrained
files, or the seeded random initialisation of the tiny recipes), and the fingerprint
catches a recipe that no longer gives the same weights.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lisa_kit.checkpoint.io import save_safetensors
from lisa_kit.errors import CheckpointError

FORMAT = 2  # 2: with manifest.json; 1 (no manifest) is still read
READABLE_FORMATS = (1, 2)
STEP_RE = re.compile(r"^step_(\d+)$")
BEST = "best"
WEIGHTS_FILE = "trainable.safetensors"
STATE_FILE = "state.pt"
RNG_FILE = "rng.pt"
RECIPE_FILE = "recipe.yaml"
META_FILE = "trainer.json"  # with the weights: marks a complete checkpoint
MANIFEST_FILE = "manifest.json"  # written last: {file: {"size", "sha256"}} of every other file
HASH_CHUNK = 1 << 20  # bytes read at a time when hashing
RESUME_KEYS = ("step", "epoch", "position")  # what a trainer needs from trainer.json to go on
RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust std::io::Error) reports errno


def step_name(step: int) -> str:
    return f"step_{step:06d}"


# -- RNG ---------------------------------------------------------------------------------

def rng_state() -> dict:
    """This process's RNG states in a form ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, np.int64).copy()), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


# -- frozen-weight fingerprint ----------------------------------------------------------------

# Meta key: the precision the frozen fingerprint was taken in (the frozen weights' training
# dtype: ``bf16``/``fp16``; ``None``: fp32). Checkpoints without it fingerprinted fp32 values.
FINGERPRINT_DTYPE = "frozen_fingerprint_dtype"
_DTYPE_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def fingerprint_dtype(meta: dict) -> torch.dtype | None:
    """The dtype a checkpoint's frozen fingerprint was taken in (``None``: fp32)."""
    return _DTYPE_NAMES.get(meta.get(FINGERPRINT_DTYPE))


def dtype_name(dtype: torch.dtype | None) -> str | None:
    return next((k for k, v in _DTYPE_NAMES.items() if v == dtype), None)


def frozen_fingerprint(model, dtype: torch.dtype | None = None) -> dict[str, list[float]]:
    """``name -> [sum, sum of squares]`` (float64) of every frozen parameter, its values
    rounded to ``dtype`` first when given (a model loaded in fp32 fingerprints as the same
    weights loaded straight into bf16: the load's cast is the same rounding)."""
    out = {}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not p.requires_grad:
                t = (p.detach().to(dtype) if dtype is not None else p.detach()).double()
                out[n] = [float(t.sum()), float((t * t).sum())]
    return out


def check_fingerprint(saved: dict | None, current: dict, rel: float = 1e-7) -> None:
    if not saved:
        return
    for name, (s, q) in saved.items():
        if name not in current:
            raise CheckpointError("a frozen parameter of the checkpoint is missing from the model built from the "
                                  "recipe", key=name)
        cs, cq = current[name]
        if abs(cs - s) > rel * max(1.0, abs(q)) or abs(cq - q) > rel * max(1.0, abs(q)):
            raise CheckpointError("the recipe builds different frozen weights than the run was trained with "
                                  "(changed pretrained files, seed or model settings?)", key=name)


# -- writing --------------------------------------------------------------------------------

@dataclass
class CheckpointData:
    """What one checkpoint holds (see the module docstring)."""

    weights: dict[str, torch.Tensor]
    state: dict
    rng: list[dict]
    meta: dict
    recipe_yaml: str


def _write_torch(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text(text: str, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _seal(path: Path) -> dict:
    """``{"size", "sha256"}`` of the file ``path``, after fsyncing it (so the manifest
    describes what is on disk; a full disk may only show here, at fsync)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_checkpoint(root: str | os.PathLike, name: str, data: CheckpointData) -> Path:
    """Write ``data`` as ``root/name`` atomically (see the module docstring). A failed
    write (full disk, ...) removes the partial ``.tmp`` and raises an ``OSError`` (also
    when torch or safetensors wrapped it) with the file being written as its
    ``filename``; existing checkpoints are untouched."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    recover(root)
    tmp = root / f"{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    current = tmp
    try:
        tmp.mkdir()
        writers = [(WEIGHTS_FILE, lambda p: save_safetensors(data.weights, p)),
                   (STATE_FILE, lambda p: _write_torch(data.state, p)),
                   (RNG_FILE, lambda p: _write_torch({"ranks": data.rng}, p)),
                   (RECIPE_FILE, lambda p: _write_text(data.recipe_yaml, p)),
                   (META_FILE, lambda p: _write_text(json.dumps({"format": FORMAT, **data.meta}, indent=1), p))]
        manifest = {}
        for file, write in writers:
            current = tmp / file
            write(current)
            manifest[file] = _seal(current)
        current = tmp / MANIFEST_FILE
        _write_text(json.dumps({"format": FORMAT, "files": manifest}, indent=1), current)
        _fsync_dir(tmp)
    except Exception as e:
        os_error = _os_error(e)
        if os_error is None:  # not an I/O failure: a bug to see as it is
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # frees the space the partial copy took
        if os_error.filename is None:
            os_error.filename = str(current)
        raise os_error from (None if os_error is e else e)
    final = root / name
    old = root / f"{name}.old"
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(root)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    return final


def _os_error(exc: BaseException) -> OSError | None:
    """The ``OSError`` behind ``exc``: itself, one it was raised from or during (torch.save
    on a full disk raises ``RuntimeError("... unexpected pos ...")`` while handling the
    file's ``OSError``), or the errno in a safetensors message; ``None`` if there is none."""
    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    m = RUST_OS_ERROR.search(str(exc))
    if m:
        code = int(m.group(1))
        return OSError(code, os.strerror(code))
    return None


def recover(root: str | os.PathLike) -> list[str]:
    """Finish what a process killed inside :func:`write_checkpoint` or
    :func:`prune_checkpoints` left under ``root``; returns what was done, one line each.

    ``<name>.old`` without ``<name>``: killed between the two renames of a replacement --
    the new ``<name>.tmp`` goes in when it is intact, else the old one goes back.
    ``<name>.old`` beside ``<name>``: only its removal was left. ``*.deleting``: a pruned
    checkpoint, renamed before its removal. Call it from one process at a time."""
    root = Path(root)
    done: list[str] = []
    if not root.is_dir():
        return done
    for old in sorted(root.glob("*.old")):
        name = old.name[:-len(".old")]
        final, tmp = root / name, root / f"{name}.tmp"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            continue
        try:
            verify_checkpoint(tmp)
            intact = is_complete(tmp)
        except CheckpointError:
            intact = False
        if intact:
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
            done.append(f"{final}: completed the replacement a kill interrupted")
        else:
            os.replace(old, final)
            shutil.rmtree(tmp, ignore_errors=True)  # the unfinished new version
            done.append(f"{final}: restored the previous version (its replacement was interrupted)")
    for doomed in root.glob("*.deleting"):
        shutil.rmtree(doomed, ignore_errors=True)
    if done:
        _fsync_dir(root)
    return done


# -- finding ---------------------------------------------------------------------------------

def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / META_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of the complete ``step_*`` checkpoints under ``root``, oldest
    first; ``.tmp``/``.old`` leftovers and incomplete directories are ignored."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and is_complete(p):
            out.append((int(m.group(1)), p))
    return sorted(out)


def checkpoints_dir(path: str | os.PathLike) -> Path:
    """``path/checkpoints`` for a run directory, else ``path``."""
    path = Path(path)
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def latest_checkpoint(path: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: ``path`` itself when it is one, else the newest
    complete ``step_*`` under ``path`` (a run directory or its ``checkpoints/``)."""
    path = Path(path)
    if is_complete(path):
        return path
    found = list_checkpoints(checkpoints_dir(path))
    return found[-1][1] if found else None


def prune_checkpoints(root: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` ``step_*`` checkpoints (0 keeps all);
    ``best/`` is never touched. A directory is renamed before it is deleted, so a kill
    mid-way never leaves a half-deleted ``step_*``."""
    if keep_last <= 0:
        return []
    removed = []
    for _, p in list_checkpoints(root)[:-keep_last]:
        doomed = p.with_name(p.name + ".deleting")
        os.replace(p, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(p)
    return removed


# -- reading ---------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"unreadable {path.name}: {e}", file=path) from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path.name} holds {type(value).__name__}, not an object", file=path)
    return value


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Check every file of the checkpoint ``path`` against its manifest (size, then
    sha256); a :class:`CheckpointError` names the first file that differs. Format-1
    checkpoints (written before manifests) only need a readable ``trainer.json``."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        meta = _read_json(path / META_FILE)
        if meta.get("format") == 1:
            return
        raise CheckpointError(f"no {MANIFEST_FILE}: the checkpoint is incomplete", file=path)
    files = _read_json(manifest_path).get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{MANIFEST_FILE} lists no files", file=manifest_path)
    for name, want in files.items():
        f = path / name
        if not isinstance(want, dict) or not f.is_file():
            raise CheckpointError("a file of the manifest is missing", file=f)
        size = f.stat().st_size
        if size != want.get("size"):
            raise CheckpointError(f"{size} bytes, the manifest says {want.get('size')} (truncated?)", file=f)
        if _sha256(f) != want.get("sha256"):
            raise CheckpointError("contents differ from the manifest's sha256 (corrupted)", file=f)


def read_checkpoint(path: str | os.PathLike, verify: bool = True) -> CheckpointData:
    """Everything in a checkpoint directory (tensors on CPU); pickles are read with
    ``weights_only=True``. ``verify``: check the files against the manifest first. Any
    damage is a :class:`CheckpointError` naming the file."""
    from safetensors.torch import load_file

    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"not a complete training checkpoint (no {META_FILE} or {WEIGHTS_FILE})", file=path)
    if verify:
        verify_checkpoint(path)
    meta = _read_json(path / META_FILE)
    if meta.get("format") not in READABLE_FORMATS:
        raise CheckpointError(f"unsupported checkpoint format {meta.get('format')!r}", file=path / META_FILE)
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        rng = torch.load(path / RNG_FILE, map_location="cpu", weights_only=True)["ranks"]
        weights = load_file(str(path / WEIGHTS_FILE))
        recipe = (path / RECIPE_FILE).read_text() if (path / RECIPE_FILE).is_file() else ""
    except Exception as e:  # torch/safetensors raise many types on damaged files
        raise CheckpointError(f"cannot read the training state: {e}", file=path) from e
    return CheckpointData(weights, state, rng, meta, recipe)


def check_resumable(data: CheckpointData, path: Path) -> None:
    """``trainer.json`` has what a trainer needs to go on (non-negative integer step,
    epoch and data position)."""
    for key in RESUME_KEYS:
        value = data.meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"{META_FILE} has no usable {key!r} (found {value!r})", key=key,
                                  file=path / META_FILE)


def find_resumable(path: str | os.PathLike) -> tuple[Path, CheckpointData, list[tuple[Path, str]]]:
    """The checkpoint to resume from, read and verified: ``path`` itself when it is one
    (an error when damaged), else the newest intact ``step_*`` under ``path`` (a run
    directory or its ``checkpoints/``). Returns ``(checkpoint, data, damaged)``,
    ``damaged`` listing the newer checkpoints passed over and why."""
    path = Path(path)
    if is_complete(path):
        data = read_checkpoint(path)
        check_resumable(data, path)
        return path, data, []
    damaged: list[tuple[Path, str]] = []
    for _, ck in reversed(list_checkpoints(checkpoints_dir(path))):
        try:
            data = read_checkpoint(ck)
            check_resumable(data, ck)
        except CheckpointError as e:
            damaged.append((ck, str(e)))
            continue
        return ck, data, damaged
    detail = "; ".join(f"{p.name}: {why}" for p, why in damaged)
    raise CheckpointError("nothing to resume: no complete checkpoint" + (f" ({detail})" if detail else ""),
                          file=path)


def load_trainable(model, weights: dict[str, torch.Tensor], names: list[str], file=None) -> None:
    """Copy ``weights`` into the trainable parameters ``names`` of ``model``; every name
    must be there with its shape."""
    missing = [n for n in names if n not in weights]
    unexpected = [k for k in weights if k not in set(names)]
    if missing or unexpected:
        key = (missing or unexpected)[0]
        raise CheckpointError(f"the checkpoint's trained parameters do not fit the model: {len(missing)} missing, "
                              f"{len(unexpected)} unexpected (LoRA or trainable settings changed?)", key=key, file=file)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            p, w = params[n], weights[n]
            if tuple(p.shape) != tuple(w.shape):
                raise CheckpointError(f"shape {tuple(w.shape)} in the checkpoint, {tuple(p.shape)} in the model",
                                      key=n, file=file)
            p.copy_(w.to(p.dtype))


def load_trained_model(path: str | os.PathLike, merge: bool = False, registry=None):
    """The model a training checkpoint describes: built from its recipe (``weights:``
    applied, the run's seed for random initialisations), LoRA applied, the trained
    parameters loaded; ``merge=True`` folds LoRA into the LLM. ``path``: a checkpoint or
    a run directory (its newest checkpoint). Returned in eval mode, fp32, on CPU."""
    from omegaconf import OmegaConf

    from lisa_kit.builder import load
    from lisa_kit.recipes import load_recipe, load_yaml_safely
    from lisa_kit.train.config import TrainConfig
    from lisa_kit.train.lora import apply_lora, merge_lora
    from lisa_kit.train.trainable import set_trainable

    ck = latest_checkpoint(path)
    if ck is None:
        raise CheckpointError("no training checkpoint found", file=path)
    data = read_checkpoint(ck)  # verified: a damaged checkpoint is an error, not a model
    # Bounded and typed (alias bombs, size); ${oc.env:...} resolved from this environment.
    recipe = load_recipe(load_yaml_safely(data.recipe_yaml, origin=str(ck / RECIPE_FILE)))
    cfg = TrainConfig.from_recipe(OmegaConf.to_container(recipe.cfg, resolve=True))
    torch.manual_seed(cfg.seed)
    model = load(recipe, registry=registry)
    if cfg.uses_lora:
        apply_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets)
    names = set_trainable(model, cfg)
    check_fingerprint(data.meta.get("frozen_fingerprint"), frozen_fingerprint(model, fingerprint_dtype(data.meta)))
    load_trainable(model, data.weights, names, file=ck / WEIGHTS_FILE)
    if merge:
        merge_lora(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
