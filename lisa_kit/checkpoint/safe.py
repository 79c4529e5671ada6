"""The one policy for every transformers load: local files only, never code from a file.

A directory whose ``config.json`` or ``tokenizer_config.json`` carries ``auto_map`` asks
transformers to import Python shipped next to the weights; with ``trust_remote_code``
unset transformers then *prompts on stdin* ("Do you wish to run the custom code?").
lisa_kit never runs such code and never prompts: :func:`refuse_remote_code` raises a
:class:`CheckpointError` naming the file, and :data:`HF_LOAD_KWARGS` goes into every
``from_pretrained`` / ``AutoConfig`` / ``AutoTokenizer`` call (``trust_remote_code=False``
makes transformers refuse rather than ask, should a file slip past the check).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from lisa_kit.errors import CheckpointError

HF_LOAD_KWARGS: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}

# Files in which transformers looks for `auto_map` (the pointer to code in the directory).
_CODE_POINTERS = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")

T = TypeVar("T")


def refuse_remote_code(path: str | os.PathLike, component: str | None = None) -> None:
    """Raise :class:`CheckpointError` when the directory ``path`` asks for code of its own
    (``auto_map`` in one of its config files). Unreadable JSON is reported too, by file."""
    p = Path(path)
    if not p.is_dir():
        return
    for name in _CODE_POINTERS:
        f = p / name
        if not f.is_file():
            continue
        try:
            cfg = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {name}: {e}", component=component, file=f) from e
        if isinstance(cfg, dict) and cfg.get("auto_map"):
            raise CheckpointError(
                f"{name} asks to run Python code shipped with the model (auto_map: {sorted(cfg['auto_map'])}); "
                "lisa_kit never runs code from a checkpoint. Use a directory whose model transformers ships",
                component=component, key="auto_map", file=f)


def hf_load(fn: Callable[..., T], path: str | os.PathLike, *, component: str | None = None, what: str = "",
            **kwargs) -> T:
    """``fn(str(path), **HF_LOAD_KWARGS, **kwargs)`` after :func:`refuse_remote_code`; any
    failure (a pickle with code refused by ``weights_only``, a corrupt file, a bad config)
    becomes a :class:`CheckpointError` naming the directory."""
    refuse_remote_code(path, component)
    try:
        return fn(str(path), **HF_LOAD_KWARGS, **kwargs)
    except CheckpointError:
        raise
    except Exception as e:  # transformers raises OSError, ValueError, UnpicklingError, ...
        name = what or getattr(fn, "__qualname__", "a model").split(".")[0]  # the class, not its loader
        raise CheckpointError(f"cannot load {path} as {name}: {type(e).__name__}: {e}", component=component,
                              file=path) from e
