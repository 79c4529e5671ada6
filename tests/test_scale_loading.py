"""Real-size loading leftovers (issue 12): pretrained parts read straight into their final
dtype, frozen training parts loaded in their final dtype, the multi-device plan, and the
thread-safety of building without memory. Tiny configs only; each test takes seconds."""
from __future__ import annotations

import pytest
import torch

from lisa_kit.builder import build_model
from lisa_kit.checkpoint.io import cast_component
from lisa_kit.components.hf_causal_lm import TINY_LLAMA
from lisa_kit.testing import tiny_recipe, tiny_tokenizer_dir


@pytest.fixture(scope="module")
def saved_llm(tmp_path_factory):
    """A tiny LLaMA saved by transformers in fp32 (a `pretrained:` directory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("llm")
    cfg = dict(TINY_LLAMA)
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).save_pretrained(out)
    return out


def _pretrained_recipe(path):
    return tiny_recipe(llm={"name": "hf_causal_lm", "pretrained": str(path), "tokenizer": str(tiny_tokenizer_dir())})


def _build(recipe, dtype, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(recipe, dtype=dtype)


def test_pretrained_llm_is_read_straight_into_the_asked_dtype(saved_llm):
    """The LLM's weights come out of the build in bf16 (no fp32 model first), bit-identical
    to the fp32 load cast afterwards -- the rows the added tokens get included."""
    recipe = _pretrained_recipe(saved_llm)
    direct = _build(recipe, torch.bfloat16)
    params = dict(direct.llm.named_parameters())
    assert params and {p.dtype for p in params.values()} == {torch.bfloat16}
    reference = _build(recipe, None)
    cast_component(reference.llm, torch.bfloat16)
    ref = dict(reference.llm.named_parameters())
    assert ref.keys() == params.keys()
    assert direct.llm.vocab_size > TINY_LLAMA["vocab_size"]  # [SEG] and the image tokens were added
    for k, p in params.items():
        assert torch.equal(p, ref[k]), k
