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

from dataclasses import dataclass, field

from lisa_kit.tokenizer import Tokenizer

IGNORE = -100
IMAGE = object()  # sentinel part: "an image goes here"


@dataclass(frozen=True)
class Tok:
    """A whole token placed by the library, looked up in the tokenizer by its text."""

    text: str


@dataclass(frozen=True)
class Template:
    """``system``, then per round ``user_prefix + message + assistant_prefix + answer + eos``.

    Only ``llava_v1`` (LISA's) is defined so far; the fields are meant to cover other
    Vicuna-style templates as they are added.
    """

    name: str
    system: str
    user_prefix: str
    assistant_prefix: str
    system_sep: str = " "
    round_sep: str = ""
    eos: bool = True


LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions.")

TEMPLATES: dict[str, Template] = {
    # LLaVA v1 / Vicuna v1.1: "SYSTEM USER: q ASSISTANT: a</s>USER: ..."
    "llava_v1": Template("llava_v1", LLAVA_SYSTEM, "USER: ", " ASSISTANT:"),
}


def get_template(name: str) -> Template:
    from lisa_kit.errors import UnknownComponentError

    if name not in TEMPLATES:
        raise UnknownComponentError("conversation template", name, TEMPLATES)
    return TEMPLATES[name]


def parse_answer(text: str, markers: tuple[str, ...] = ("[SEG]",)) -> list:
    """Split a library-made answer at its markers: ``"Sure, [SEG]."`` ->
    ``[" Sure,", Tok("[SEG]"), "."]``. The leading space makes the answer continue the
    prompt the way the joined conversation string did."""
    parts: list = []
    rest = " " + text
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

    def add(self, user: list | str, answer: list | str | None = None) -> "Conversation":
        if isinstance(user, str):
            user = [user]
        if isinstance(answer, str):
            answer = parse_answer(answer)
        self.rounds.append((list(user), answer))
        return self

    def pieces(self) -> list[tuple[object, bool]]:
        """Flatten to ``(part, supervised)`` pairs."""
        t = self.template
        out: list[tuple[object, bool]] = [(t.system + t.system_sep, False)]
        for r, (user, answer) in enumerate(self.rounds):
            if r and t.round_sep:
                out.append((t.round_sep, False))
            out.append((t.user_prefix, False))
            out.extend((p, False) for p in user)
            out.append((t.assistant_prefix, False))
            if answer is None:
                if r != len(self.rounds) - 1:
                    raise ValueError("only the last round may leave its answer open")
                break
            out.extend((p, True) for p in answer)
            if t.eos:
                out.append((EOS, True))
        return out


EOS = Tok("\x00eos")  # resolved to the tokenizer's eos id


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
        elif isinstance(p, Tok):
            flat.append((tokenizer.token_id(p.text), s))
        elif isinstance(p, str):
            flat.append((p, s))
        else:
            raise TypeError(f"unsupported conversation part {p!r}")
    ids: list[int] = []
    labels: list[int] = []
    if tokenizer.bos_id is not None:
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
