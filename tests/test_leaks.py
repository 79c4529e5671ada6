"""Processes that build tiny recipes leave nothing behind: the tiny tokenizers are built
once into the cache (content-addressed, renamed into place atomically) and reused."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lisa_kit.testing import CACHE_DIR_ENV

# What a process building tiny recipes does: the SentencePiece tokenizer through the
# recipe (`@tiny_tokenizer`) and the byte-level BPE one (`@tiny_hf_tokenizer`).
BUILD = """
from lisa_kit.testing import tiny_hf_tokenizer_dir, tiny_recipe
recipe = tiny_recipe()
print(recipe["model"]["llm"]["tokenizer"])
print(tiny_hf_tokenizer_dir())
"""


def _run(tmp: Path, cache: Path) -> list[str]:
    env = dict(os.environ, TMPDIR=str(tmp), **{CACHE_DIR_ENV: str(cache)}, HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", BUILD], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()


def _snapshot(directory: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}


def test_two_processes_reuse_one_cached_tokenizer_and_leave_no_temp_dirs(tmp_path):
    tmp, cache = tmp_path / "tmp", tmp_path / "cache"
    tmp.mkdir()
    first = _run(tmp, cache)
    temp_after_first, cache_after_first = _snapshot(tmp), _snapshot(cache)
    second = _run(tmp, cache)
    assert second == first  # the same directories, reused
    assert all(Path(p).parent == cache and (Path(p) / "tokenizer_config.json").is_file() for p in first)
    assert _snapshot(cache) == cache_after_first  # nothing rebuilt, no leftovers of a build
    assert _snapshot(tmp) == temp_after_first  # the second process added nothing to the temp dir
    assert not [name for name in _snapshot(tmp) if name.startswith("lisa_kit")]
