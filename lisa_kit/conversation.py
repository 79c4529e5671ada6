"""Conversation templates and prompt encoding.

A conversation is rounds of (user message, assistant answer). Messages are lists of
parts: ``str`` (plain text, whatever it contains), :data:`IMAGE` (an image slot the
fusion strategy fills), or :class:`Tok` (a token the library places on purpose, such as
``[SEG]``). User text is never parsed for markers. Library-made answers such as
LISA's ``"Sure, it is [SEG]."`` are turned into parts with :func:`parse_answer`.

``encode`` returns the token ids and the labels (answers and their end-of-sequence
supervised, everything else ``IGNORE``), built from the structure rather than by
re-tokenising prefixes and counting.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from lisa_kit.errors import UnknownComponentError
from lisa_kit.tokenizer import Tokenizer

IGNORE = -100
class _ImageSlot:
    """The part meaning "an image goes here". Pickles as a reference to :data:`IMAGE`, so
    ``part is IMAGE`` still holds in DataLoader workers."""

    def __reduce__(self):
        return "IMAGE"

    def __repr__(self) -> str:
        return "IMAGE"


IMAGE = _ImageSlot()


@dataclass(frozen=True)
class Tok:
    """A whole token placed by the library, looked up in the tokenizer by its text."""

    text: str


EOS = Tok("\x00eos")  # resolved to the tokenizer's eos id
BOS = Tok("\x00bos")  # resolved to the tokenizer's bos id


class Template:
    """How rounds become text: :meth:`pieces` flattens a conversation into
    ``(part, supervised)`` pairs; parts are ``str``, :data:`IMAGE`, :class:`Tok` or
    :data:`EOS`. ``adds_bos``: the template writes the BOS itself (chat templates)."""

    adds_bos = False  # (``name`` is set by each template)
    answer_lead = " "  # what separates the assistant prefix from the answer text

    def pieces(self, rounds: list[tuple[list, list | None]]) -> list[tuple[object, bool]]:  # pragma: no cover
        raise NotImplementedError


@dataclass(frozen=True)
class SeparatorTemplate(Template):
    """``system + system_sep``, then per round ``user_prefix + message + assistant_prefix +
    answer + eos`` (rounds joined by ``round_sep``): Vicuna v1.1 / LLaVA v1."""

    name: str
    system: str
    user_prefix: str
    assistant_prefix: str
    system_sep: str = " "
    round_sep: str = ""
    eos: bool = True

    def pieces(self, rounds):
        # An empty system prompt leaves no separator either: the first round opens the text.
        out: list[tuple[object, bool]] = [(self.system + self.system_sep, False)] if self.system else []
        for r, (user, answer) in enumerate(rounds):
            if r and self.round_sep:
                out.append((self.round_sep, False))
            out.append((self.user_prefix, False))
            out.extend((p, False) for p in user)
            out.append((self.assistant_prefix, False))
            if answer is None:
                break
            out.extend((p, True) for p in answer)
            if self.eos:
                out.append((EOS, True))
        return out


@dataclass(frozen=True)
class Llama2Template(Template):
    """LLaVA's ``llava_llama_2``: ``[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{q1} [/INST] {a1} </s>``
    then ``<s>[INST] {q2} [/INST] {a2} </s>``… (LLaVA's ``SeparatorStyle.LLAMA_2``). As in
    LLaVA's label masking, everything after ``[/INST]`` up to and including ``</s>`` is
    supervised."""

    name: str
    system: str

    def pieces(self, rounds):
        out: list[tuple[object, bool]] = []
        for r, (user, answer) in enumerate(rounds):
            if r:
                out.append((BOS, False))
            head = "[INST] " + (f"<<SYS>>\n{self.system}\n<</SYS>>\n\n" if r == 0 and self.system else "")
            out.append((head, False))
            out.extend((p, False) for p in user)
            out.append((" [/INST]", False))
            if answer is None:
                break
            out.extend((p, True) for p in answer)
            out.extend(((" ", True), (EOS, True)))
        return out


class ChatTemplate(Template):
    """The tokenizer's own chat template (Llama-3, Qwen2, Mistral, Phi-3 …).

    The Jinja template is rendered with a marker in place of every message part, so it
    never sees (and cannot reinterpret) user text, image slots or ``[SEG]``; the rendered
    text is split back at the markers. Template text is encoded with its special tokens
    (``<|im_start|>``…) as whole tokens. Supervised: the assistant's content and the
    template's end of turn after it, up to and including its first special token
    (``<|im_end|>``, ``<|eot_id|>``, ``</s>``).
    """

    _MARK = re.compile("\x00(\\d+)\x00|(\x01)|(\x02)")

    def __init__(self, tokenizer, system: str | None = None):
        hf = getattr(tokenizer, "tok", None)
        if hf is None or not getattr(hf, "chat_template", None):
            raise UnknownComponentError("conversation template", "chat", TEMPLATES,
                                        hint="the tokenizer has no chat template; choose a named template")
        self.name = "chat"
        self.answer_lead = ""  # the template's own assistant header ends the line
        self.hf = hf
        self.system = system
        specials = set(getattr(hf, "all_special_tokens", []))
        specials |= {t.content for t in getattr(hf, "added_tokens_decoder", {}).values() if t.special}
        self.specials = sorted((t for t in specials if t), key=len, reverse=True)
        bos = hf.bos_token
        probe = hf.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
        self.adds_bos = bool(bos) and probe.startswith(bos)

    def _split_specials(self, text: str, supervised: bool, out: list) -> None:
        i = 0
        while i < len(text):
            hit = next(((i, t) for t in self.specials if text.startswith(t, i)), None)
            if hit:
                out.append((Tok(hit[1]), supervised))
                i += len(hit[1])
                continue
            j = min([k for k in (text.find(t, i) for t in self.specials) if k >= 0] + [len(text)])
            out.append((text[i:j], supervised))
            i = j

    def pieces(self, rounds):
        parts: list = []

        def mark(msg):
            s = ""
            for p in msg:
                s += f"\x00{len(parts)}\x00"
                parts.append(p)
            return s

        messages = [{"role": "system", "content": self.system}] if self.system else []
        for user, answer in rounds:
            messages.append({"role": "user", "content": mark(user)})
            if answer is not None:
                messages.append({"role": "assistant", "content": "\x01" + mark(answer) + "\x02"})
        open_turn = rounds[-1][1] is None
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=open_turn)
        out: list[tuple[object, bool]] = []
        pos, inside, tail = 0, False, False
        for m in self._MARK.finditer(text):
            between = text[pos:m.start()]
            if tail and between:
                # end of the assistant's turn: supervise through its first special token
                first = min([k + len(t) for t in self.specials if (k := between.find(t)) >= 0] or [0])
                self._split_specials(between[:first], True, out)
                between = between[first:]
                tail = False
            self._split_specials(between, inside, out)
            if m.group(1) is not None:
                out.append((parts[int(m.group(1))], inside))
            elif m.group(2):
                inside = True
            else:
                inside, tail = False, True
            pos = m.end()
        rest = text[pos:]
        if tail and rest:
            first = min([k + len(t) for t in self.specials if (k := rest.find(t)) >= 0] or [0])
            self._split_specials(rest[:first], True, out)
            rest = rest[first:]
        self._split_specials(rest, False, out)
        return [(p, s) for p, s in out if p != ""]


LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions.")
LLAMA2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                 "that the user provides, and assist the user with a variety of tasks using natural language.")

TEMPLATES: dict[str, Template] = {
    # LLaVA v1 / Vicuna v1.1: "SYSTEM USER: q ASSISTANT: a</s>USER: ..."
    "llava_v1": SeparatorTemplate("llava_v1", LLAVA_SYSTEM, "USER: ", " ASSISTANT:"),
    "llava_llama_2": Llama2Template("llava_llama_2", LLAMA2_SYSTEM),
}
TEMPLATE_NAMES = (*TEMPLATES, "chat")


def get_template(name: str, tokenizer=None, system: str | None = None) -> Template:
    """A named template, or ``"chat"``: the tokenizer's own chat template. ``system``
    replaces the template's system prompt (``""``: none, though a chat template may still
    write the default its Jinja holds); ``None`` keeps the template's own."""
    if name == "chat":
        if tokenizer is None:
            raise ValueError("the 'chat' template needs the tokenizer")
        return ChatTemplate(tokenizer, system=system)
    if name not in TEMPLATES:
        raise UnknownComponentError("conversation template", name, TEMPLATE_NAMES)
    return TEMPLATES[name] if system is None else replace(TEMPLATES[name], system=system)


def recipe_template(recipe: dict | None, tokenizer=None, name: str | None = None) -> Template:
    """The template a recipe's ``conversation`` section names: ``template`` (default
    ``llava_v1``; ``name``, when given, wins) with ``system`` in place of its system prompt
    when the section sets one. Training, evaluation, the benchmark and the API all read the
    section through this, so a model is asked in the layout it was trained on."""
    section = (recipe or {}).get("conversation") or {}
    return get_template(name or section.get("template") or "llava_v1", tokenizer, section.get("system"))


def parse_answer(text: str, markers: tuple[str, ...] = ("[SEG]",), lead: str = " ") -> list:
    """Split a library-made answer at its markers: ``"Sure, [SEG]."`` ->
    ``[" Sure,", Tok("[SEG]"), "."]``. ``lead`` (the template's ``answer_lead``) makes the
    answer continue the prompt the way the joined conversation string did."""
    parts: list = []
    rest = lead + text
    while rest:
        hits = [(rest.find(m), m) for m in markers if m in rest]
        if not hits:
            parts.append(rest)
            break
        pos, m = min(hits)
        if pos:
            parts.append(rest[:pos])
        parts.append(Tok(m))
        rest = rest[pos + len(m):]
    return parts


@dataclass
class Conversation:
    """Rounds of ``(user_parts, answer_parts or None)``; ``None`` leaves the assistant
    turn open for generation."""

    template: Template
    rounds: list[tuple[list, list | None]] = field(default_factory=list)

    def add(self, user: list | str, answer: list | str | None = None,
            markers: tuple[str, ...] = ("[SEG]",)) -> "Conversation":
        """``answer`` as a string is library-made text: its ``markers`` become tokens."""
        if isinstance(user, str):
            user = [user]
        if isinstance(answer, str):
            answer = parse_answer(answer, markers, lead=self.template.answer_lead)
        self.rounds.append((list(user), answer))
        return self

    def pieces(self) -> list[tuple[object, bool]]:
        """Flatten to ``(part, supervised)`` pairs."""
        if any(a is None for _, a in self.rounds[:-1]):
            raise ValueError("only the last round may leave its answer open")
        return self.template.pieces(self.rounds)


def _merge_text(pieces: list[tuple[object, bool]]) -> list[tuple[object, bool]]:
    """Join neighbouring text parts with the same supervision: the tokenizer then sees
    exactly the strings the joined prompt would give it."""
    out: list[tuple[object, bool]] = []
    for p, s in pieces:
        if isinstance(p, str) and out and isinstance(out[-1][0], str) and out[-1][1] == s:
            out[-1] = (out[-1][0] + p, s)
        else:
            out.append((p, s))
    return out


def encode(conv: Conversation, tokenizer: Tokenizer, image_ids: list[int]) -> tuple[list[int], list[int]]:
    """Conversation -> ``(input_ids, labels)`` (equal length).

    ``image_ids`` is what the fusion strategy puts where an image goes (e.g.
    ``[<im_start>, IMAGE_SLOT, <im_end>]``).
    """
    flat: list[tuple[object, bool]] = []
    for p, s in _merge_text(conv.pieces()):
        if p is IMAGE:
            flat.extend((i, False) for i in image_ids)
        elif p is EOS:
            flat.append((tokenizer.eos_id, s))
        elif p is BOS:
            if tokenizer.bos_id is not None:
                flat.append((tokenizer.bos_id, s))
        elif isinstance(p, Tok):
            flat.append((tokenizer.token_id(p.text), s))
        elif isinstance(p, str):
            flat.append((p, s))
        else:
            raise TypeError(f"unsupported conversation part {p!r}")
    ids: list[int] = []
    labels: list[int] = []
    if tokenizer.bos_id is not None and not conv.template.adds_bos:
        ids.append(tokenizer.bos_id)
        labels.append(IGNORE)
    for i, (p, s) in enumerate(flat):
        if isinstance(p, int):
            chunk = [p]
        else:
            prev = flat[i - 1][0] if i > 0 else None
            nxt = flat[i + 1][0] if i + 1 < len(flat) else None
            chunk = tokenizer.encode_chunk(p, prev if isinstance(prev, int) else None,
                                           nxt if isinstance(nxt, int) else None)
        ids.extend(chunk)
        labels.extend(t if (s and t >= 0) else IGNORE for t in chunk)
    return ids, labels
