"""The tiny recipes of other LLM families (Qwen2, Llama-3, Mistral, Phi-3) through the
generic hf_causal_lm component, each with a tiny tokenizer carrying that family's special
tokens and a chat template in its style (`@tiny_hf_tokenizer:<family>`): the prompt has the
family's turn layout, a teacher-forced [SEG] answer gives a finite loss whose supervised
tokens are the answer and the family's end of turn, and generation answers with a mask."""
from __future__ import annotations

import pytest
import torch

from lisa_kit.api import Segmenter
from lisa_kit.builder import load
from lisa_kit.conversation import IMAGE, Conversation, encode, get_template
from lisa_kit.data import Sample, collate
from lisa_kit.loss import lisa_loss
from lisa_kit.testing import force_generation, synthetic_image

# recipe -> (transformers model_type, end-of-turn token, what the open assistant turn ends with)
LLM_RECIPES = {
    "lisa-tiny-qwen2": ("qwen2", "<|im_end|>", "<|im_start|>assistant\n"),
    "lisa-tiny-llama3": ("llama", "<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "lisa-tiny-mistral": ("mistral", "</s>", "[/INST]"),
    "lisa-tiny-phi3": ("phi3", "<|end|>", "<|assistant|>\n"),
}
QUESTION = "Can you segment the red square?"


@pytest.mark.parametrize("name", list(LLM_RECIPES))
def test_tiny_llm_recipe_trains_and_generates(name, monkeypatch):
    model_type, end_of_turn, assistant_head = LLM_RECIPES[name]
    torch.manual_seed(0)
    model = load(name).eval()
    tok = model.tokenizer
    assert model.llm.model.config.model_type == model_type
    assert tok.eos_id == tok.token_id(end_of_turn)
    template = get_template("chat", tok)

    open_turn = Conversation(template).add([IMAGE, "\n" + QUESTION], None)
    ids, _ = encode(open_turn, tok, model.fusion.wrap_image(tok))
    assert tok.decode([i for i in ids if i >= 0]).endswith(assistant_head)

    img, mask = synthetic_image(40, 52, 0)
    conv = Conversation(template).add([IMAGE, "\n" + QUESTION], "Sure, [SEG].")
    batch = collate([Sample(img, [conv], mask[None])], model)
    sup = batch.labels[batch.labels != -100].tolist()
    assert sup == tok.encode_text("Sure, ") + [model.seg_token_id] + tok.encode_text(".") + [tok.eos_id]
    out = model(batch)
    losses = lisa_loss(out.logits, out.fused.labels, out.pred_masks, batch.gt_masks)
    assert torch.isfinite(losses["loss"]) and losses["ce_loss"] > 0 and losses["mask_loss"] > 0
    losses["loss"].backward()
    assert model.seg_head.layers[0].weight.grad.abs().sum() > 0  # the [SEG] state reached the seg head

    seg = Segmenter(model)
    assert seg.template_name == "chat"
    force_generation(monkeypatch, lambda m: {0: m.seg_token_id, 1: m.tokenizer.eos_id})
    r = seg.seg(img, QUESTION)
    assert r.token_ids == [model.seg_token_id, tok.eos_id] and r.finished
    assert r.num_masks == 1 and r.masks.shape == (1, 40, 52) and r.text.strip() == "[SEG]"
