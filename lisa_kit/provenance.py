"""What produced a result: library versions and the git state of the checkout.

Written next to training runs, evaluation metrics and benchmark results, so numbers can
be traced to the code and libraries that made them.
"""
from __future__ import annotations

import importlib.metadata as md
import platform
import subprocess
from pathlib import Path


def git_state() -> dict:
    """``{"commit": sha or None, "dirty": bool or None}`` of the checkout lisa_kit runs
    from (``None`` outside a git checkout)."""
    import lisa_kit

    repo = Path(lisa_kit.__file__).resolve().parent.parent

    def git(*args):
        try:
            r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def versions() -> dict:
    """Versions of Python, lisa_kit and the libraries that shape its numbers (as the
    modules report them, local build tags included), plus ``git_commit``."""
    import torch
    import transformers

    import lisa_kit

    out = {"python": platform.python_version(), "lisa_kit": lisa_kit.__version__, "torch": torch.__version__,
           "transformers": transformers.__version__}
    for dist in ("peft", "numpy", "safetensors"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    out["git_commit"] = git_state()["commit"]
    return out
