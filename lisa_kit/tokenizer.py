"""Text <-> token ids, with user text that can never become a control token.

Prompts are built as a list of *pieces*: ``str`` (plain text) or ``int`` (a token id
the library placed on purpose: ``[SEG]``, ``</s>``, an image slot). Plain text is
encoded with special-token parsing **off**, so a user typing ``[SEG]`` or ``<image>``
gets ordinary word pieces.

Two implementations:

* :class:`SentencePieceTokenizer` for LLaMA/Vicuna/Llama-2 style ``tokenizer.model``
  directories (every released LISA checkpoint). It reproduces the tokenisation LISA
  was trained with (transformers 4.31 slow ``LlamaTokenizer``, ``legacy=True``): text
  between special tokens is encoded chunk by chunk, each chunk gets SentencePiece's
  dummy-prefix ``▁``, and tokens added with ``add_tokens`` (``[SEG]``, ``<im_start>``,
  ``<im_end>``) swallow the whitespace on both sides.
* :class:`HFTokenizer` for any other tokenizer directory (Llama-3, Qwen, Mistral…),
  through ``transformers.AutoTokenizer``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from lisa_kit.errors import CheckpointError


class Tokenizer:
    """Common interface. Ids of added tokens come after the base vocabulary."""

    bos_id: int | None
    eos_id: int
    pad_id: int
    model_max_length: int

    def __len__(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    # -- tokens ---------------------------------------------------------------
    def token_id(self, token: str) -> int:
        """Id of a whole token string (``"[SEG]"``, ``"</s>"``). Never returns the id of a
        *piece* of it (e.g. the lone ``▁`` that ``encode("[SEG]")[0]`` can give)."""
        tid = self._lookup(token)
        if tid is None:
            raise CheckpointError(f"tokenizer has no token {token!r}; add it with add_special_tokens()",
                                  component="tokenizer", key=token)
        return tid

    def has_token(self, token: str) -> bool:
        return self._lookup(token) is not None

    def _lookup(self, token: str) -> int | None:  # pragma: no cover - interface
        raise NotImplementedError

    def add_special_tokens(self, tokens: list[str]) -> int:  # pragma: no cover - interface
        """Add whole tokens (``[SEG]``…) at the end of the vocabulary; returns how many were new."""
        raise NotImplementedError

    # -- text -----------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:  # pragma: no cover - interface
        """Plain text -> ids. Never produces a special/added token."""
        raise NotImplementedError

    def strips_around(self, token_id: int) -> bool:
        """Whether whitespace next to this token is dropped (LISA's added tokens do)."""
        return False

    def encode_chunk(self, text: str, prev_id: int | None = None, next_id: int | None = None) -> list[int]:
        """Encode text that sits between two library-placed tokens (``None`` = none).

        Whitespace next to a token for which :meth:`strips_around` is true is removed
        first, as the original tokenizer did.
        """
        if prev_id is not None and prev_id >= 0 and self.strips_around(prev_id):
            text = text.lstrip()
        if next_id is not None and next_id >= 0 and self.strips_around(next_id):
            text = text.rstrip()
        return self.encode_text(text) if text else []

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:  # pragma: no cover
        raise NotImplementedError

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:  # pragma: no cover
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> None:  # pragma: no cover
        raise NotImplementedError


def _content(v) -> str | None:
    if v is None:
        return None
    if isinstance(v, dict):
        return v.get("content")
    return str(v)


class SentencePieceTokenizer(Tokenizer):
    """LLaMA-family ``tokenizer.model`` + ``added_tokens.json`` + ``special_tokens_map.json``."""

    def __init__(self, model_file: str | os.PathLike, added_tokens: dict[str, int] | None = None,
                 bos: str | None = "<s>", eos: str = "</s>", unk: str = "<unk>", pad: str | None = None,
                 model_max_length: int = 2048, add_bos: bool = True, padding_side: str = "right"):
        import sentencepiece as spm

        self.model_file = str(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=self.model_file)
        self.base_size = self.sp.get_piece_size()
        self.added: dict[str, int] = dict(sorted((added_tokens or {}).items(), key=lambda kv: kv[1]))
        for tok, tid in self.added.items():
            if tid < self.base_size:
                raise CheckpointError(f"added token {tok!r} has id {tid} inside the base vocabulary",
                                      component="tokenizer", key=tok)
        self._added_by_id = {v: k for k, v in self.added.items()}
        self.special = {"bos": bos, "eos": eos, "unk": unk, "pad": pad or unk}
        self.bos_id = self.token_id(bos) if (bos and add_bos) else None
        self._bos_token = bos
        self.eos_id = self.token_id(eos)
        self.unk_id = self.token_id(unk)
        self.pad_id = self.token_id(pad or unk)
        self.model_max_length = int(model_max_length)
        self.padding_side = padding_side

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "SentencePieceTokenizer":
        path = Path(path)
        cfg = json.loads((path / "tokenizer_config.json").read_text()) if (path / "tokenizer_config.json").exists() else {}
        smap = json.loads((path / "special_tokens_map.json").read_text()) if (path / "special_tokens_map.json").exists() else {}
        added = json.loads((path / "added_tokens.json").read_text()) if (path / "added_tokens.json").exists() else {}
        if not added and "added_tokens_decoder" in cfg:  # newer transformers keep them here
            import sentencepiece as spm
            base = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model")).get_piece_size()
            added = {v["content"]: int(k) for k, v in cfg["added_tokens_decoder"].items() if int(k) >= base}

        def pick(name, default):
            return _content(smap.get(name)) or _content(cfg.get(name)) or default

        mml = cfg.get("model_max_length", 2048)
        if not isinstance(mml, int) or mml > 10**8:  # HF writes a huge sentinel when unset
            mml = 2048
        return cls(path / "tokenizer.model", added, bos=pick("bos_token", "<s>"), eos=pick("eos_token", "</s>"),
                   unk=pick("unk_token", "<unk>"), pad=pick("pad_token", None), model_max_length=mml,
                   add_bos=cfg.get("add_bos_token", True), padding_side=cfg.get("padding_side", "right"))

    def __len__(self) -> int:
        return self.base_size + len(self.added)

    def _lookup(self, token: str) -> int | None:
        if token in self.added:
            return self.added[token]
        tid = self.sp.piece_to_id(token)
        # piece_to_id answers unk for unknown strings; only accept a real match.
        if tid == self.sp.unk_id() and token != self.sp.id_to_piece(tid):
            return None
        return tid

    def add_special_tokens(self, tokens: list[str]) -> int:
        n = 0
        for t in tokens:
            if self._lookup(t) is None:
                self.added[t] = len(self)
                self._added_by_id[self.added[t]] = t
                n += 1
        return n

    def strips_around(self, token_id: int) -> bool:
        # transformers 4.31: tokens added as plain strings strip both sides; bos/eos/unk
        # are AddedToken(lstrip=False, rstrip=False) and keep their neighbours' spaces.
        return token_id in self._added_by_id

    def encode_text(self, text: str) -> list[int]:
        # Each chunk gets SentencePiece's dummy prefix "▁". A chunk that continues
        # after a space ("ASSISTANT:" | " Sure") therefore drops that one space: the
        # prefix re-creates it, exactly as tokenising the joined string would.
        if text.startswith(" "):
            text = text[1:]
        if not text:
            return []
        return list(self.sp.encode(text))

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self._added_by_id.get(i) or self.sp.id_to_piece(i) for i in ids]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Pieces between special tokens decoded by SentencePiece; special tokens joined
        with single spaces (the transformers 4.31 rendering, ``[SEG] </s>``)."""
        specials = set(self._added_by_id) | {self.eos_id, self.unk_id}
        if self.bos_id is not None:
            specials.add(self.bos_id)
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i < 0:
                continue
            if i in specials:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    out.append(self.convert_ids_to_tokens([i])[0])
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return " ".join(s for s in out if s)

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if Path(self.model_file).resolve() != (path / "tokenizer.model").resolve():
            shutil.copyfile(self.model_file, path / "tokenizer.model")
        (path / "added_tokens.json").write_text(json.dumps(self.added, indent=2))
        (path / "special_tokens_map.json").write_text(json.dumps(
            {"bos_token": self.special["bos"], "eos_token": self.special["eos"],
             "unk_token": self.special["unk"], "pad_token": self.special["pad"]}, indent=2))
        (path / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": self.bos_id is not None,
             "add_eos_token": False, "model_max_length": self.model_max_length,
             "padding_side": self.padding_side, "bos_token": self.special["bos"],
             "eos_token": self.special["eos"], "unk_token": self.special["unk"],
             "pad_token": self.special["pad"]}, indent=2))


class HFTokenizer(Tokenizer):
    """Any ``transformers`` tokenizer directory (fast tokenizers, chat templates)."""

    def __init__(self, tok):
        self.tok = tok
        if tok.pad_token_id is None:
            tok.pad_token = tok.unk_token or tok.eos_token
        self.bos_id = tok.bos_token_id if getattr(tok, "add_bos_token", True) else None
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id
        mml = tok.model_max_length
        self.model_max_length = mml if isinstance(mml, int) and mml < 10**8 else 4096

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "HFTokenizer":
        from transformers import AutoTokenizer

        from lisa_kit.checkpoint.safe import hf_load

        return cls(hf_load(AutoTokenizer.from_pretrained, path, component="tokenizer"))

    def __len__(self) -> int:
        return len(self.tok)

    def _lookup(self, token: str) -> int | None:
        tid = self.tok.convert_tokens_to_ids(token)
        if tid is None or (tid == self.tok.unk_token_id and token != self.tok.unk_token):
            return None
        return tid

    def add_special_tokens(self, tokens: list[str]) -> int:
        new = [t for t in tokens if self._lookup(t) is None]
        return self.tok.add_tokens(new, special_tokens=True) if new else 0

    def encode_text(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False, split_special_tokens=True).input_ids)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return self.tok.convert_ids_to_tokens([i for i in ids if i >= 0])

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode([i for i in ids if i >= 0], skip_special_tokens=skip_special_tokens)

    def save(self, path: str | os.PathLike) -> None:
        self.tok.save_pretrained(str(path))


def load_tokenizer(path: str | os.PathLike, kind: str = "auto") -> Tokenizer:
    """``kind``: ``auto`` (SentencePiece when the dir is a LLaMA-style ``tokenizer.model``
    with the legacy behaviour, else transformers), ``sentencepiece`` or ``hf``."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"tokenizer directory not found: {path}", component="tokenizer")
    from lisa_kit.checkpoint.safe import refuse_remote_code

    refuse_remote_code(path, "tokenizer")  # also checks that its JSON files are readable
    if kind == "auto":
        cfg = {}
        if (path / "tokenizer_config.json").exists():
            cfg = json.loads((path / "tokenizer_config.json").read_text())
        llama_sp = (path / "tokenizer.model").exists() and "Llama" in str(cfg.get("tokenizer_class", "Llama"))
        kind = "sentencepiece" if llama_sp and cfg.get("legacy", True) else "hf"
    if kind == "sentencepiece":
        return SentencePieceTokenizer.from_dir(path)
    if kind == "hf":
        return HFTokenizer.from_dir(path)
    raise CheckpointError(f"unknown tokenizer kind {kind!r}; use auto, sentencepiece or hf", component="tokenizer")
