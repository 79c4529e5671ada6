import os

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is fastest, and immune to OpenMP spinning when the
    machine's cores are busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def sam2_model():
    """The lisa-tiny-sam2 recipe, built once (tests must not change its weights)."""
    from lisa_kit.builder import load

    torch.manual_seed(0)
    return load("lisa-tiny-sam2").eval()


@pytest.fixture(scope="session")
def save_spread_models(tmp_path_factory):
    """``save(decoders, spread)``: see :func:`_save_spread_models`."""
    return lambda decoders, spread: _save_spread_models(tmp_path_factory, decoders, spread)


def _save_spread_models(tmp_path_factory, decoders: dict, spread: float) -> dict:
    """name -> directory of a tiny random transformers model (``save_pretrained``, fp32)
    for each ``decoders[name] = (build, tiny config, make_config, class name)``, every
    weight drawn from ``N(0, spread)``: random init leaves some of these models at near-zero
    outputs, and comparisons must depend on the weights."""
    import transformers

    out = {}
    for name, (_, tiny, make, cls_name) in decoders.items():
        torch.manual_seed(0)
        model = getattr(transformers, cls_name)(make(tiny)).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, spread)
        out[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(out[name])
    return out
