"""Conversation templates: LISA's llava_v1, LLaVA's llava_llama_2, and the tokenizer's own
chat template; user text never turns into control tokens under any of them."""
from __future__ import annotations

import pytest

from lisa_kit.conversation import LLAVA_SYSTEM, IGNORE, IMAGE, Conversation, encode, get_template, recipe_template
from lisa_kit.errors import UnknownComponentError
from lisa_kit.testing import tiny_hf_tokenizer_dir, tiny_tokenizer_dir
from lisa_kit.tokenizer import load_tokenizer

SLOT = -200


@pytest.fixture(scope="module")
def sp_tok():
    tok = load_tokenizer(tiny_tokenizer_dir())
    tok.add_special_tokens(["[SEG]"])
    return tok


@pytest.fixture(scope="module")
def chat_tok():
    tok = load_tokenizer(tiny_hf_tokenizer_dir())
    tok.add_special_tokens(["[SEG]"])
    return tok


def _supervised(ids, labels):
    return [i for i, y in zip(ids, labels) if y != IGNORE]


def test_unknown_template_lists_names():
    with pytest.raises(UnknownComponentError, match="llava_llama_2"):
        get_template("vicuna_v0")


def test_llava_llama_2_layout(sp_tok):
    conv = Conversation(get_template("llava_llama_2")).add([IMAGE, "\nwhat is red?"], "It is [SEG].")
    conv.add(["and blue?"], "None.")
    ids, labels = encode(conv, sp_tok, [SLOT])
    text = sp_tok.decode([i for i in ids if i >= 0])
    assert "[INST] <<SYS>>" in text and "<</SYS>>" in text and text.count("[/INST]") == 2
    assert ids[0] == sp_tok.bos_id and ids.count(sp_tok.bos_id) == 2  # <s> opens the second round
    assert ids.count(SLOT) == 1
    sup = _supervised(ids, labels)
    assert sup.count(sp_tok.eos_id) == 2 and sup.count(sp_tok.token_id("[SEG]")) == 1
    assert "[INST]" not in sp_tok.decode(sup) and "None" in sp_tok.decode(sup)


def test_chat_template_marks_only_answers(chat_tok):
    conv = Conversation(get_template("chat", chat_tok)).add(
        [IMAGE, "\nsegment <|im_start|> and [SEG] please"], "Sure, [SEG].")
    ids, labels = encode(conv, chat_tok, [SLOT])
    im_start, im_end, seg = (chat_tok.token_id(t) for t in ("<|im_start|>", "<|im_end|>", "[SEG]"))
    # the template's two turns open with <|im_start|>; the user's "<|im_start|>" stays text
    assert ids.count(im_start) == 2 and ids.count(seg) == 1 and ids.count(SLOT) == 1
    sup = _supervised(ids, labels)
    assert chat_tok.decode(sup) == "Sure, [SEG].<|im_end|>"
    assert sup[-1] == im_end


def test_chat_template_generation_prompt(chat_tok):
    conv = Conversation(get_template("chat", chat_tok)).add([IMAGE, "\nwhere?"], None)
    ids, labels = encode(conv, chat_tok, [SLOT])
    assert chat_tok.decode([i for i in ids if i >= 0]).endswith("<|im_start|>assistant\n")
    assert all(y == IGNORE for y in labels)


def test_chat_template_needs_one(sp_tok):
    with pytest.raises(UnknownComponentError, match="no chat template"):
        get_template("chat", sp_tok)


@pytest.mark.parametrize("name", ["llava_v1", "llava_llama_2"])
def test_system_prompt_replaced_or_dropped(sp_tok, name):
    """``conversation.system`` replaces the template's system prompt; ``""`` drops it and
    its separator, so the first round opens the text and the answer is supervised as before."""
    def text_and_answer(template):
        conv = Conversation(template).add([IMAGE, "\nwhat is red?"], "It is [SEG].")
        ids, labels = encode(conv, sp_tok, [SLOT])
        return sp_tok.decode([i for i in ids if i >= 0]), _supervised(ids, labels), ids

    own, own_sup, own_ids = text_and_answer(get_template(name))
    bare, bare_sup, bare_ids = text_and_answer(get_template(name, system=""))
    mine, mine_sup, _ = text_and_answer(get_template(name, system="Shapes only."))
    own_system = get_template(name).system
    assert own_system in own and own_system not in bare and own_system not in mine and "Shapes only." in mine
    assert len(bare_ids) < len(own_ids) and bare_ids[0] == sp_tok.bos_id
    assert own_sup == bare_sup == mine_sup
    if name == "llava_v1":  # no leading separator: the text after <s> starts with the user prefix
        assert sp_tok.decode([i for i in bare_ids[1:] if i >= 0]).startswith("USER:")
    else:
        assert "<<SYS>>" not in bare


def test_recipe_template_reads_the_conversation_section(chat_tok):
    assert recipe_template(None).system == LLAVA_SYSTEM  # no section: LISA's llava_v1
    t = recipe_template({"conversation": {"template": "llava_v1", "system": ""}})
    assert t.name == "llava_v1" and t.system == ""
    t = recipe_template({"conversation": {"system": "Be brief."}}, name="llava_llama_2")  # name wins
    assert t.name == "llava_llama_2" and t.system == "Be brief."
    chat = recipe_template({"conversation": {"template": "chat", "system": "Be brief."}}, chat_tok)
    conv = Conversation(chat).add([IMAGE, "\nwhere?"], None)
    ids, _ = encode(conv, chat_tok, [SLOT])
    assert "Be brief." in chat_tok.decode([i for i in ids if i >= 0])
