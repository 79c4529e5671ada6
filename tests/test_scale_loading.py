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


def _bf16_run(llm_dir):
    return ["train.precision=bf16", "train.val=null", "train.workers=0", "train.batch_size=2",
            "train.grad_accumulation=1", "train.warmup_steps=1", "data.samples_per_epoch=4",
            "data.sources.synthetic.options.size=8", f"model.llm.pretrained={llm_dir}", "model.llm.config=null"]


def test_training_reads_frozen_pretrained_weights_straight_into_the_training_precision(saved_llm, tmp_path,
                                                                                      monkeypatch):
    """bf16 training: the pretrained LLM's frozen weights are already bf16 when the model is
    built (the old path built fp32 and cast afterwards: the CPU peak was the fp32 model);
    trainable parameters are fp32 masters of the loaded values."""
    from lisa_kit.train import trainable
    from lisa_kit.train.loop import Trainer

    at_cast = []
    cast = trainable.cast_frozen

    def recording_cast(model, dtype):
        at_cast.append({p.dtype for p in model.llm.model.base_model.parameters() if not p.requires_grad})
        return cast(model, dtype)

    monkeypatch.setattr(trainable, "cast_frozen", recording_cast)
    tr = Trainer("lisa-tiny-synthetic", tmp_path / "run", overrides=_bf16_run(saved_llm), progress=False)
    assert at_cast == [{torch.bfloat16}]
    params = dict(tr.model.named_parameters())
    assert all(params[n].dtype == torch.float32 for n in tr.trainable_names)
    frozen = [p for n, p in params.items() if n not in tr.trainable_names]
    assert frozen and {p.dtype for p in frozen} == {torch.bfloat16}
    # The input embeddings train: fp32 masters holding the bf16-loaded values.
    emb = tr.model.llm.model.get_input_embeddings().weight
    assert emb.requires_grad and emb.dtype == torch.float32
    assert torch.equal(emb, emb.to(torch.bfloat16).float())



def test_fingerprint_of_an_fp32_load_rounded_to_bf16_equals_the_bf16_load():
    """A bf16 run fingerprints its frozen weights as loaded (bf16); rebuilding the model in
    fp32 (export, merge) fingerprints the same weights when rounded to the recorded dtype."""
    from lisa_kit.train.checkpointing import frozen_fingerprint

    torch.manual_seed(0)
    fp32 = torch.nn.Linear(64, 32).requires_grad_(False)
    bf16 = torch.nn.Linear(64, 32).requires_grad_(False)
    bf16.load_state_dict(fp32.state_dict())
    bf16.to(torch.bfloat16)
    assert frozen_fingerprint(fp32) != frozen_fingerprint(bf16)
    assert frozen_fingerprint(fp32, torch.bfloat16) == frozen_fingerprint(bf16)


def test_bf16_run_resumes_and_reloads_for_export(saved_llm, tmp_path):
    """The fingerprint of bf16-loaded frozen weights checks on resume (bf16 again) and when
    the trained model is rebuilt in fp32 (export's load_trained_model)."""
    from lisa_kit.train.checkpointing import load_trained_model
    from lisa_kit.train.loop import Trainer

    ov = _bf16_run(saved_llm) + ["train.steps=2", "train.save_every=1"]
    Trainer("lisa-tiny-synthetic", tmp_path / "run", overrides=ov, stop_after=1, progress=False).fit()
    assert Trainer(None, tmp_path / "run", resume=tmp_path / "run", progress=False).fit()["step"] == 2
    model = load_trained_model(tmp_path / "run")
    assert model.llm.model.get_input_embeddings().weight.dtype == torch.float32
