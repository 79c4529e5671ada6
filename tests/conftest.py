import importlib.util
import os
from pathlib import Path

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_script():
    """``repo_script("benchmarks/scale.py")``: one of the repository's scripts (``benchmarks/``,
    ``scripts/``: not a package) imported as a module, so tests call its functions."""
    def load(relpath: str):
        path = REPO / relpath
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return load


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny recipe, built once (tests must not mutate its weights)."""
    from lisa_kit.builder import build_model
    from lisa_kit.testing import tiny_recipe

    torch.manual_seed(0)
    return build_model(tiny_recipe()).eval()


@pytest.fixture
def one_thread():
    """CPU training steps of these tiny models are dominated by overheads; one thread is
    as fast and does not collapse when other processes share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
