"""LLaVA-Instruct-150k (LISA's VQA source) in its released layout.

Layout (``root`` is LISA's ``--dataset_dir``)::

    root/llava_dataset/<json_name>.json   # [{id, image, conversations: [{from, value}, ...]}]
    root/coco/train2017/<image>

``json_name`` is LISA's ``--vqa_data`` (default ``llava_instruct_150k``,
``utils/vqa_dataset.py:60-64``). One :class:`~lisa_kit.datasets.base.Record` per entry,
no targets, ``rounds`` = ``(human value, gpt value)`` pairs exactly as stored.

What LISA does with a conversation (``utils/vqa_dataset.py`` @ 3cb2d43) and where it
belongs here:

* ``preprocess_multimodal`` (``:16-28``, applied at ``:99-104``): in **every** turn that contains ``<image>``,
  all markers are removed, the text is stripped and ``"<image>\\n"`` is put in front. So
  ``"What is this?\\n<image>"`` is trained as ``"<image>\\nWhat is this?"``. The record
  keeps the text as stored; :func:`lisa_image_first` restates the rule for the prompt
  builder, and ``Record.meta["image_marker_round"]`` says which round holds the marker.
* a conversation whose first turn is not from ``human`` loses that turn (``:107-109``);
  the reader does the same (``meta["skipped_leading_turns"]``), since a round is a
  question/answer pair.
* roles must then alternate human/gpt (``:111-114``, an ``assert``); anything else
  (unknown role, two questions in a row, a missing answer, a non-string value) is a
  :class:`~lisa_kit.errors.DataError` naming the file, the entry index and the field.
  LISA would crash there, or (trailing question) build a prompt its collate rejects.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lisa_kit.datasets.base import DatasetReader, Record, register_dataset
from lisa_kit.errors import DataError

IMAGE_MARKER = "<image>"
#: LLaVA's speaker names: the question side and the answer side of a round.
HUMAN, GPT = "human", "gpt"


def lisa_image_first(text: str) -> str:
    """The turn text LISA trains on: every ``<image>`` removed, stripped, and one
    ``"<image>\\n"`` in front (``vqa_dataset.py:16-28``). Text without the marker is
    returned unchanged."""
    if IMAGE_MARKER not in text:
        return text
    return (IMAGE_MARKER + "\n" + text.replace(IMAGE_MARKER, "").strip()).strip()


def conversation_rounds(turns: Any, where: Path, index: int) -> tuple[list[tuple[str, str]], int]:
    """``conversations`` of entry ``index`` -> ``((question, answer) rounds, leading
    non-human turns dropped)``; :class:`DataError` for anything malformed."""
    field = f"[{index}].conversations"
    if not isinstance(turns, list) or not turns:
        raise DataError("entry needs a non-empty 'conversations' list", path=where, field=field)
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in (HUMAN, GPT):
            got = turn.get("from") if isinstance(turn, dict) else turn
            raise DataError(f"turn must have 'from' = {HUMAN!r} or {GPT!r}, got {got!r}", path=where,
                            field=f"{field}[{k}].from")
        if not isinstance(turn.get("value"), str):
            raise DataError("turn needs a string 'value'", path=where, field=f"{field}[{k}].value")
    skipped = 1 if turns[0]["from"] != HUMAN else 0  # LISA drops one leading non-human turn
    body = turns[skipped:]
    for j, turn in enumerate(body):
        expected = HUMAN if j % 2 == 0 else GPT
        if turn["from"] != expected:
            raise DataError(f"turns must alternate human/gpt; expected {expected!r} here", path=where,
                            field=f"{field}[{j + skipped}].from")
    if not body or len(body) % 2:
        raise DataError("conversation must end with a gpt answer", path=where,
                        field=f"{field}[{len(turns) - 1}]")
    rounds = [(body[j]["value"], body[j + 1]["value"]) for j in range(0, len(body), 2)]
    return rounds, skipped


@register_dataset("llava_instruct")
class LlavaInstructReader(DatasetReader):
    """LLaVA-Instruct conversations on COCO train2017 images (LISA's ``vqa`` source).

    Option ``json_name``: the annotation file under ``llava_dataset/`` without ``.json``
    (LISA's ``--vqa_data``). The file is loaded once; entries are checked lazily in
    ``__getitem__`` so one bad entry is reported by ``check`` instead of blocking all.
    """

    name = "llava_instruct"
    splits = ("train",)  # LISA trains on the whole file; there is no other split
    default_split = "train"

    def __init__(self, root: str | Path, split: str | None = None, *, json_name: str = "llava_instruct_150k"):
        super().__init__(root, split)
        self.json_path = self.root / "llava_dataset" / f"{json_name.removesuffix('.json')}.json"
        self.image_root = self.root / "coco" / "train2017"
        if not self.json_path.is_file():
            raise DataError("LLaVA-Instruct annotation file not found", path=self.json_path)
        try:
            # LISA opens it with the platform default encoding (UTF-8 on Linux).
            self.entries = json.loads(self.json_path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"not UTF-8: {e.reason} at byte {e.start}", path=self.json_path, field="<json>") from e
        except json.JSONDecodeError as e:
            raise DataError(f"corrupt JSON: {e.msg} at line {e.lineno} column {e.colno}", path=self.json_path,
                            field="<json>") from e
        if not isinstance(self.entries, list):
            raise DataError("expected a list of {id, image, conversations}", path=self.json_path, field="<root>")

    def __len__(self) -> int:
        return len(self.entries)

    def _entry(self, i: int) -> dict:
        entry = self.entries[i]
        if not isinstance(entry, dict):
            raise DataError("entry must be an object", path=self.json_path, field=f"[{i}]")
        if not isinstance(entry.get("image"), str) or not entry["image"]:
            raise DataError("entry needs an 'image' file name", path=self.json_path, field=f"[{i}].image")
        return entry

    def files(self, i: int) -> list[Path]:
        """``[image, annotation file]``; only the annotation file when the entry names no
        image (``check`` then reports the entry's DataError from ``__getitem__``)."""
        entry = self.entries[i]
        image = entry.get("image") if isinstance(entry, dict) else None
        if not isinstance(image, str) or not image:
            return [self.json_path]
        return [self.image_root / image, self.json_path]

    def __getitem__(self, i: int) -> Record:
        entry = self._entry(i)
        image_path = self.image_root / entry["image"]
        if not image_path.is_file():
            raise DataError(f"image of entry {i} not found", path=image_path, field=f"[{i}].image")
        rounds, skipped = conversation_rounds(entry.get("conversations"), self.json_path, i)
        marker_round = next((r for r, (q, a) in enumerate(rounds) if IMAGE_MARKER in q or IMAGE_MARKER in a),
                            None)
        key = str(entry.get("id", i))
        meta = {"index": i, "id": entry.get("id"), "image_marker_round": marker_round,
                "skipped_leading_turns": skipped}
        return Record(source=self.name, key=key, image_path=image_path, rounds=rounds, meta=meta)
