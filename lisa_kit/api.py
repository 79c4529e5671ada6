"""The Python API: an image and a question in, an answer and boolean masks out.

```python
from lisa_kit.api import Segmenter

seg = Segmenter.from_checkpoint("/ckpt/LISA-7B-v1", vision_tower="/ckpt/clip-vit-large-patch14",
                                device="cuda", precision="bf16")
res = seg.seg("street.jpg", "What can make the woman stand higher? Please output segmentation mask.")
res.text          # "Sure, [SEG] ."
res.masks         # bool (1, H, W) at the image's size after EXIF orientation
res.scores        # [0.93]  SAM's IoU prediction per mask
res.seg_spans     # [(6, 11)]: res.text[6:11] == "[SEG]"
```

* :meth:`Segmenter.from_recipe` (a recipe name or path plus ``key=value`` overrides),
  :meth:`Segmenter.from_checkpoint` (a lisa_kit checkpoint directory or a released LISA
  HF directory, detected from its files) and :func:`load` (either, or the shipped demo
  model when neither is named).
* :meth:`Segmenter.seg` answers one prompt; :meth:`Segmenter.seg_batch` answers several
  (left-padded into one generation batch; prompts about the same image share its
  encoding: pass the same object, the same path, or an ``int`` index into ``images``).
* User text is plain text: ``"[SEG]"`` or ``"<image>"`` typed by a user stay characters
  (see :mod:`lisa_kit.conversation`). ``history`` continues a conversation about the image.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lisa_kit.errors import InputError
from lisa_kit.interfaces import VisionEncoder, move_input, per_image

__all__ = ["Segmenter", "SegResult", "load", "DEMO_MODEL_DIR", "PRECISIONS", "QUANTIZATIONS"]

#: Where the shipped demo model (a lisa_kit native checkpoint) lives when installed.
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "demo_model"
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTIZATIONS = ("8bit", "4bit")
_PRECISION_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
SEG_TEXT = "[SEG]"


@dataclass
class SegResult:
    """One answer.

    ``text``: the answer, special tokens removed, each ``[SEG]`` written ``"[SEG]"``;
    ``masks``: bool ``(M, H, W)`` at the image's original size (after EXIF orientation),
    one per ``[SEG]`` in order (``M = 0`` when the answer has none); ``scores``: SAM's IoU
    prediction of each mask; ``seg_spans``: ``(start, end)`` of each ``[SEG]`` in ``text``;
    ``image_size``: ``(H, W)``; ``prompt``: the question as given; ``token_ids``: the
    generated ids (end of sequence included when produced); ``finished``: whether the
    answer ended by itself rather than at ``max_new_tokens``; ``rejected``: per mask,
    whether the model answered its target with the reject token (``[REJ]``, recipe
    ``model.reject_token``): that mask is empty, its score 0, and its span in ``seg_spans``
    is the ``[REJ]`` in ``text`` (all ``False`` for models without a reject token);
    ``stop``: why the answer ended: ``"end"`` (the model's end of sequence),
    ``"max_new_tokens"`` (the length asked for) or ``"context"`` (this row's prompt left
    fewer positions than ``max_new_tokens`` in the LLM, and they ran out);
    ``malformed`` (``model.prompt_strategy: text_geometry``, whose answers write boxes and
    points as text, :mod:`lisa_kit.geometry_answers`): per mask, why it is empty -- the
    answer (one empty mask) or that object is malformed -- ``None`` for a decoded mask
    (empty for ``[SEG]`` models); ``seg_spans`` then locate each object's text."""

    text: str
    masks: np.ndarray
    scores: list[float]
    seg_spans: list[tuple[int, int]]
    image_size: tuple[int, int]
    prompt: str
    token_ids: list[int] = field(default_factory=list, repr=False)
    finished: bool = True
    rejected: list[bool] = field(default_factory=list)
    stop: str = "end"
    malformed: list[str | None] = field(default_factory=list)

    @property
    def num_masks(self) -> int:
        return int(self.masks.shape[0])

    def no_mask_reason(self) -> str | None:
        """Why the answer came with no mask, for a person (``None`` when it has a ``[SEG]``):
        the answer was cut (:attr:`stop`) before any ``[SEG]``, or the model wrote none --
        LISA-style models were trained on questions that ask for a mask. For a text
        box/point answer (:attr:`malformed`): what was wrong with it or with each object
        that got an empty mask (also when other objects got theirs)."""
        bad = [(k, why) for k, why in enumerate(self.malformed) if why is not None]
        if bad:
            cut = f"the answer was cut ({self.stop}); " if self.stop != "end" else ""
            if len(self.malformed) == 1:
                return f"{cut}no mask: {bad[0][1]}"
            return cut + "; ".join(f"mask {k} is empty: {why}" for k, why in bad)
        if self.seg_spans:
            return None
        if self.stop != "end":
            return f"the answer was cut ({self.stop}) before any [SEG], so no mask was made; allow more new tokens"
        return ("the answer holds no [SEG], so no mask was made. LISA-style models were trained on questions that "
                "ask for a mask: try ending the question with 'Please output segmentation mask.'")

    def to_dict(self) -> dict:
        """JSON-able summary (no mask pixels): text, sizes, areas and scores."""
        return {"prompt": self.prompt, "text": self.text, "image_size": list(self.image_size),
                "seg_spans": [list(s) for s in self.seg_spans], "finished": self.finished, "stop": self.stop,
                "masks": [{"area": int(m.sum()), "score": float(s), "rejected": bool(r),
                           **({"malformed": why} if why is not None else {})}
                          for m, s, r, why in zip(self.masks, self.scores, self.rejected or [False] * len(self.scores),
                                                  self.malformed or [None] * len(self.scores))]}


# -- model sources ------------------------------------------------------------------
def _resolve_device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for but CUDA is not available here; use --device cpu")
    return dev


def _resolve_precision(precision) -> str:
    if precision is None:
        return "fp32"
    if isinstance(precision, torch.dtype):
        for k, v in PRECISIONS.items():
            if v == precision:
                return k
    name = _PRECISION_ALIASES.get(str(precision), str(precision))
    if name not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return name


def _check_quantization(quantization, device: torch.device) -> str | None:
    if quantization in (None, "", "none"):
        return None
    if quantization not in QUANTIZATIONS:
        raise InputError(f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)} or none")
    if device.type != "cuda":
        raise InputError(f"{quantization} quantization (bitsandbytes) needs a CUDA device; got {device}. "
                         "Use --device cuda, or drop the quantization on CPU")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise InputError(f"{quantization} quantization needs bitsandbytes: pip install bitsandbytes") from e
    return quantization


def _quantize_llm(model, quantization: str, compute_dtype: torch.dtype) -> None:
    """Replace the LLM decoder's ``nn.Linear`` layers (``lm_head`` kept, as transformers
    does) by bitsandbytes layers holding the current weights; they quantize when moved
    to the GPU. Settings come from a transformers ``BitsAndBytesConfig``."""
    import inspect

    import bitsandbytes as bnb
    from torch import nn
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        qcfg = BitsAndBytesConfig(load_in_8bit=True)
    else:
        qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    llm = model.llm
    hf = getattr(llm, "model", llm)
    skip = set(qcfg.llm_int8_skip_modules or [])
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    for name, module in list(hf.named_modules()):
        if type(module) is not nn.Linear or module is head or name.split(".")[-1] in skip:
            continue
        w = module.weight.data
        b = module.bias
        if quantization == "8bit":
            new = bnb.nn.Linear8bitLt(module.in_features, module.out_features, b is not None,
                                      has_fp16_weights=qcfg.llm_int8_has_fp16_weight,
                                      threshold=qcfg.llm_int8_threshold)
            new.weight = bnb.nn.Int8Params(w.to(torch.float16), requires_grad=False,
                                           has_fp16_weights=qcfg.llm_int8_has_fp16_weight)
        else:
            new = bnb.nn.Linear4bit(module.in_features, module.out_features, b is not None,
                                    compute_dtype=qcfg.bnb_4bit_compute_dtype,
                                    compress_statistics=qcfg.bnb_4bit_use_double_quant,
                                    quant_type=qcfg.bnb_4bit_quant_type)
            extra = {"module": new} if "module" in inspect.signature(bnb.nn.Params4bit.__new__).parameters else {}
            new.weight = bnb.nn.Params4bit(w.to(compute_dtype), requires_grad=False,
                                           quant_type=qcfg.bnb_4bit_quant_type,
                                           compress_statistics=qcfg.bnb_4bit_use_double_quant, **extra)
        if b is not None:
            new.bias = nn.Parameter(b.data.clone(), requires_grad=False)
        new.requires_grad_(False)
        hf.set_submodule(name, new)


def _cast(model, dtype: torch.dtype) -> None:
    """Cast the model to ``dtype`` as LISA's ``model.bfloat16()``, by the one precision rule
    (:func:`~lisa_kit.checkpoint.io.param_dtype`) the loader applies too:

    * Parts a component declares keep fp32 (SAM: its prompt encoder, whose positional
      encoding segment-anything builds in fp32 and which fails against bf16/fp16 weights,
      and its small mask decoder); SAM's image encoder takes ``dtype``. A decoder that
      declares nothing stays fp32 whole.
    * Non-persistent float buffers (RoPE frequencies) keep their precision, as
      transformers' ``from_pretrained(dtype=...)`` leaves them.
    """
    from lisa_kit.checkpoint.io import cast_component
    from lisa_kit.interfaces import KINDS

    for name in KINDS:  # a model loaded in `dtype` already is left as it is (no copies)
        cast_component(getattr(model, name), dtype)


def _load_target(device, precision, quantization) -> tuple[torch.device | None, torch.dtype | None]:
    """Where and in which precision a checkpoint is read, settled (and refused) before any
    weights are: the device (``None`` with quantization, which converts the LLM's weights
    on the CPU first) and the dtype (``None`` for fp32: the components' own precision)."""
    dev = _resolve_device(device)
    name = _resolve_precision(precision)
    if dev.type == "cpu" and name == "fp16":
        raise InputError("fp16 is not supported on CPU (half-precision matmuls are missing or very slow there); "
                         "use --precision bf16 or fp32, or --device cuda")
    dtype = PRECISIONS[name]
    quantized = _check_quantization(quantization, dev) is not None
    return (None if quantized else dev), (None if dtype == torch.float32 else dtype)


def _mapped_load(device_map, precision, quantization):
    """``(parsed device map, dtype to read in)`` for a multi-device load (``None``: fp32)."""
    from lisa_kit.checkpoint.device_map import parse_device_map

    if quantization:
        raise InputError("--device-map and --quantization cannot be combined (bitsandbytes converts the LLM "
                         "on one device)")
    spec = parse_device_map(device_map)
    dtype = PRECISIONS[_resolve_precision(precision)]
    return spec, (None if dtype == torch.float32 else dtype)


def _first_device(model) -> torch.device:
    """Where a device-mapped model takes its inputs: the device of the LLM's embeddings."""
    return model.llm.model.get_input_embeddings().weight.device


# -- the segmenter ------------------------------------------------------------------
class Segmenter:
    """A loaded model ready to answer: device, precision, conversation template and the
    length limit are settled once; :meth:`seg` / :meth:`seg_batch` run under
    ``torch.inference_mode``.

    ``model``: a :class:`~lisa_kit.model.LisaModel` (moved and cast in place);
    ``device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``; ``precision``: ``fp32``, ``bf16``
    or ``fp16`` (not on CPU); ``quantization``: ``8bit``/``4bit`` (bitsandbytes, CUDA, the
    LLM only); ``template``: conversation template name (default: the recipe's
    ``conversation.template``, else ``llava_v1``; ``chat`` = the tokenizer's own);
    ``max_new_tokens``: default answer length (the recipe's ``generation.max_new_tokens``,
    else 512); ``image_limits``: the :class:`~lisa_kit.images.ImageLimits` every image is
    checked against before it is decoded or resized (default: 64 Mpx, aspect ratio 32:1)."""

    def __init__(self, model, *, device="cpu", precision="fp32", quantization: str | None = None,
                 template: str | None = None, max_new_tokens: int | None = None, source: str | None = None,
                 image_limits=None):
        from lisa_kit.conversation import recipe_template
        from lisa_kit.images import DEFAULT_LIMITS, ImageLimits

        if image_limits is not None and not isinstance(image_limits, ImageLimits):
            raise InputError(f"image_limits must be a lisa_kit.images.ImageLimits, got {type(image_limits).__name__}")
        self.image_limits = image_limits or DEFAULT_LIMITS

        self.device = _resolve_device(device)
        self.precision = _resolve_precision(precision)
        self.dtype = PRECISIONS[self.precision]
        if self.device.type == "cpu" and self.precision == "fp16":
            raise InputError("fp16 is not supported on CPU (half-precision matmuls are missing or very slow there); "
                             "use --precision bf16 or fp32, or --device cuda")
        self.quantization = _check_quantization(quantization, self.device)
        recipe = model.recipe or {}
        self.template = recipe_template(recipe, model.tokenizer, name=template)
        self.template_name = self.template.name
        gen = recipe.get("generation") or {}
        self.max_new_tokens = int(max_new_tokens or gen.get("max_new_tokens") or 512)
        self.source = source
        model.eval()
        if self.dtype != torch.float32:
            _cast(model, self.dtype)
        if self.quantization:
            _quantize_llm(model, self.quantization, self.dtype)
        # A device map placed the LLM's layers over several devices (accelerate's hooks move
        # the hidden states) and the rest on the first: nothing to move.
        if getattr(getattr(model.llm, "model", None), "hf_device_map", None) is None:
            model.to(self.device)
        self.model = model
        self._num_image_tokens: int | None = getattr(model.vision_encoder, "num_tokens", None)
        self._drop_ids = self._special_ids()

    # -- construction ----------------------------------------------------------------
    @classmethod
    def from_recipe(cls, recipe="lisa-tiny", overrides: Sequence[str] = (), *, device="cpu", precision="fp32",
                    quantization: str | None = None, vision_tower: str | None = None, seed: int | None = 0,
                    device_map=None, **kwargs) -> "Segmenter":
        """Build the model a recipe names (name, path, loaded recipe or dict) with its
        ``weights:``. ``vision_tower``: shorthand for ``model.vision_encoder.pretrained=PATH``.
        ``seed`` makes random-weight recipes (``lisa-tiny``) reproducible without touching
        the global random state. ``device_map``: as :meth:`from_checkpoint`'s, for a recipe
        whose ``weights.format`` is ``lisa_hf`` or ``lisa_kit``."""
        from lisa_kit.builder import load as build_load

        overrides = list(overrides)
        if vision_tower is not None:
            overrides.append(f"model.vision_encoder.pretrained={vision_tower}")
        name = recipe if isinstance(recipe, (str, os.PathLike)) else getattr(recipe, "path", None) or "<recipe>"
        if device_map is not None:
            spec, dtype = _mapped_load(device_map, precision, quantization)
            model = build_load(recipe, overrides, dtype=dtype, device_map=spec)
            return cls(model, device=_first_device(model), precision=precision, source=str(name), **kwargs)
        load_device, load_dtype = _load_target(device, precision, quantization)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            model = build_load(recipe, overrides, dtype=load_dtype, device=load_device)
        return cls(model, device=device, precision=precision, quantization=quantization, source=str(name), **kwargs)

    @classmethod
    def from_checkpoint(cls, path, *, vision_tower: str | None = None, sam: str | dict | None = None,
                        device="cpu", precision="fp32", quantization: str | None = None, device_map=None,
                        **kwargs) -> "Segmenter":
        """Load a checkpoint directory, detected from its files:

        * ``recipe.yaml``: lisa_kit's own format (:func:`lisa_kit.checkpoint.native.load_model`);
        * ``config.json`` of a released LISA model (``model_type: llava`` with LISA's fields):
          imported with :func:`~lisa_kit.checkpoint.lisa_hf.import_lisa_hf`; its CLIP tower
          is not inside: ``vision_tower`` (a local CLIP directory) unless the config's
          ``vision_tower`` resolves next to it; ``sam``: SAM's size (default ``vit_h``).

        A transformers LLaVA directory has no trained ``[SEG]`` head or mask decoder and
        cannot segment: it is refused with a pointer to training.

        The weights are read one tensor at a time straight into ``precision`` on ``device``
        (never a float32 copy first); a checkpoint that cannot fit there is refused before
        reading (:class:`~lisa_kit.errors.InsufficientMemoryError`).

        ``device_map`` (replaces ``device``; for models larger than one GPU): ``"auto"``,
        ``"balanced"`` or a mapping / JSON text of device -> capacity: the LLM's decoder
        layers spread over the devices, everything else on the first, planned before any
        weight is read (:mod:`lisa_kit.checkpoint.device_map`)."""
        from lisa_kit.builder import load_checkpoint

        p = Path(path).expanduser()
        if device_map is not None:
            spec, dtype = _mapped_load(device_map, precision, quantization)
            model = load_checkpoint(p, vision_tower=vision_tower, sam=sam, dtype=dtype, device_map=spec)
            return cls(model, device=_first_device(model), precision=precision, source=str(p), **kwargs)
        load_device, load_dtype = _load_target(device, precision, quantization)
        model = load_checkpoint(p, vision_tower=vision_tower, sam=sam, dtype=load_dtype, device=load_device)
        return cls(model, device=device, precision=precision, quantization=quantization, source=str(p), **kwargs)

    @classmethod
    def from_default(cls, **kwargs) -> "Segmenter":
        """The shipped demo model (:data:`DEMO_MODEL_DIR`)."""
        if not (DEMO_MODEL_DIR / "recipe.yaml").exists():
            raise InputError(f"no model named and no demo model installed (looked in {DEMO_MODEL_DIR}); "
                             "pass --recipe NAME or --checkpoint DIR (Python: Segmenter.from_recipe / "
                             "Segmenter.from_checkpoint)")
        return cls.from_checkpoint(DEMO_MODEL_DIR, **kwargs)

    # -- properties ------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def max_positions(self) -> int | None:
        """How many positions the LLM takes (image tokens included), when it says."""
        llm = self.model.llm
        cfg = getattr(getattr(llm, "model", None), "config", None)
        if cfg is not None and callable(getattr(cfg, "get_text_config", None)):
            cfg = cfg.get_text_config()  # a VLM's config nests its LM's
        n = getattr(cfg, "max_position_embeddings", None) if cfg is not None else None
        n = n or getattr(llm, "max_positions", None)
        return int(n) if n else None

    @property
    def num_image_tokens(self) -> int:
        if self._num_image_tokens is None:  # a tower that does not say: measure once
            probe = np.zeros((32, 32, 3), np.uint8)
            with torch.inference_mode():
                enc = self.model.vision_encoder
                px = move_input(enc.collate([enc.preprocess(probe)]), self.device, self.dtype)
                self._num_image_tokens = int(per_image(enc(px))[0].shape[0])
        return self._num_image_tokens

    def _special_ids(self) -> set[int]:
        tok, model = self.tokenizer, self.model
        drop = {tok.eos_id, getattr(tok, "bos_id", None), getattr(tok, "pad_id", None), getattr(tok, "unk_id", None)}
        names = [*model.fusion.image_tokens(), *((model.recipe or {}).get("model", {}).get("extra_tokens") or [])]
        for name in names:
            if tok.has_token(name):
                drop.add(tok.token_id(name))
        drop |= set(getattr(tok, "_added_by_id", {}) or {})
        hf = getattr(tok, "tok", None)
        if hf is not None:
            drop |= set(getattr(hf, "all_special_ids", []) or [])
            drop |= {int(i) for i, t in (getattr(hf, "added_tokens_decoder", {}) or {}).items() if t.special}
        drop.discard(model.seg_token_id)
        drop.discard(None)
        return drop

    # -- prompts ---------------------------------------------------------------------
    def _conversation(self, prompt, history, what: str = "prompt"):
        from lisa_kit.conversation import IMAGE, Conversation

        _check_prompt(prompt, what)
        geometry = getattr(self.model, "text_geometry", None)  # text box/point answers: its instruction
        ask = geometry.ask if geometry is not None else str
        conv = Conversation(self.template)
        turns = list(history or [])
        for k, turn in enumerate(turns):
            try:
                q, a = turn
            except (TypeError, ValueError) as e:
                raise InputError(f"history[{k}] must be a (prompt, answer) pair") from e
            if isinstance(a, SegResult):
                a = a.text
            _check_prompt(q, f"history[{k}] prompt" if what == "prompt" else f"{what}'s history[{k}] prompt")
            _check_prompt(a, f"history[{k}] answer" if what == "prompt" else f"{what}'s history[{k}] answer",
                          allow_empty=True)
            # Answers are the model's own: their "[SEG]" become tokens again.
            markers = (self.model.seg_token, *([self.model.reject_token] if self.model.reject_token else []))
            conv.add([IMAGE, "\n" + ask(q)] if k == 0 else [ask(q)], a, markers=markers)
        conv.add([IMAGE, "\n" + ask(prompt)] if not turns else [ask(prompt)], None)
        return conv

    def prompt_ids(self, prompt: str, history=None, *, what: str = "prompt") -> list[int]:
        """The token ids :meth:`seg` feeds for ``prompt`` (the fusion's image slot included).
        ``what`` names the prompt in error messages (``prompts[3]`` in a batch)."""
        from lisa_kit.conversation import encode

        conv = self._conversation(prompt, history, what)
        ids, _ = encode(conv, self.tokenizer, self.model.fusion.wrap_image(self.tokenizer))
        return ids

    def _image_tokens(self, size: tuple[int, int] | None) -> int:
        """Visual tokens of an image of ``size`` (H, W): the tower's own count for towers
        whose count depends on the image, else the fixed :attr:`num_image_tokens`."""
        n = self.model.vision_encoder.tokens_for(tuple(size)) if size is not None else None
        return self.num_image_tokens if n is None else int(n)

    def _positions(self, ids: list[int], size: tuple[int, int] | None = None) -> tuple[int, int]:
        slots = sum(1 for i in ids if i == self.model.fusion.IMAGE_SLOT)
        return len(ids) - slots + slots * self._image_tokens(size), slots

    def _budget(self, ids: list[int], what: str = "prompt", size: tuple[int, int] | None = None) -> int:
        """New tokens that still fit after the prompt (its image of ``size`` (H, W) where
        the tower's token count depends on it); InputError naming ``what`` when none."""
        limit = self.max_positions
        if limit is None:
            return 1 << 30
        total, slots = self._positions(ids, size)
        if total >= limit:
            img = slots * self._image_tokens(size)
            raise InputError(f"the {what} is too long: {total} positions ({total - img} text tokens + {img} image "
                             f"tokens) but the LLM takes at most {limit} (max_position_embeddings); shorten the "
                             "prompt or the conversation history")
        return limit - total

    # -- images ----------------------------------------------------------------------
    @staticmethod
    def _image_key(src):
        if isinstance(src, (str, os.PathLike)):
            return ("path", os.path.realpath(os.fspath(src)))
        return ("obj", id(src))

    def _load(self, src) -> np.ndarray:
        """Through the one intake (:func:`lisa_kit.images.load_image`), within this
        segmenter's :attr:`image_limits`."""
        from PIL import Image

        from lisa_kit.images import load_image

        if not isinstance(src, (str, os.PathLike, np.ndarray, Image.Image)):
            raise InputError(f"an image is a path, a PIL image or an array; got {type(src).__name__}")
        return load_image(src, self.image_limits)

    # -- answering -------------------------------------------------------------------
    def seg(self, image, prompt: str, *, max_new_tokens: int | None = None, history=None) -> SegResult:
        """Answer ``prompt`` about ``image`` (path, PIL image or RGB array); ``history``:
        earlier ``(prompt, answer)`` turns about the same image."""
        return self.seg_batch([image], [prompt], max_new_tokens=max_new_tokens,
                              histories=None if history is None else [history])[0]

    def seg_batch(self, images, prompts: Sequence[str], *, max_new_tokens: int | None = None,
                  histories: Sequence | None = None, batch_size: int | None = 8) -> list[SegResult]:
        """Answer several prompts, ``batch_size`` rows per generation batch (left padding).

        ``images``: one image for every prompt, or a sequence as long as ``prompts``; an
        ``int`` entry points at another entry of ``images``; entries that are the same
        object or the same file are read and encoded once."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            return []
        if isinstance(images, (list, tuple)):
            images = list(images)
            if len(images) != len(prompts):
                raise InputError(f"{len(images)} images for {len(prompts)} prompts; give one image per prompt "
                                 "(repeat an image, or use its index) or a single image for all")
        else:
            images = [images] * len(prompts)
        if histories is not None and len(histories) != len(prompts):
            raise InputError(f"{len(histories)} histories for {len(prompts)} prompts")
        # Distinct images, in first-use order.
        slot_of: dict = {}
        sources: list = []
        row_image: list[int] = []
        for k, src in enumerate(images):
            seen: set[int] = set()
            while isinstance(src, (int, np.integer)) and not isinstance(src, bool):
                if not 0 <= src < len(images) or src in seen:
                    raise InputError(f"images[{k}] = {src} is not the index of an image in `images`")
                seen.add(int(src))
                src = images[src]
            key = self._image_key(src)
            if key not in slot_of:
                slot_of[key] = len(sources)
                sources.append(src)
            row_image.append(slot_of[key])
        batched = len(prompts) > 1
        names = [f"prompts[{k}]" if batched else "prompt" for k in range(len(prompts))]
        ids = [self.prompt_ids(p, histories[k] if histories is not None else None, what=names[k])
               for k, p in enumerate(prompts)]
        # A tower whose token count depends on the image is budgeted once the images are read.
        sized = type(self.model.vision_encoder).tokens_for is not VisionEncoder.tokens_for
        budgets = [] if sized else [self._budget(i, names[k]) for k, i in enumerate(ids)]
        want = max_new_tokens if max_new_tokens is not None else self.max_new_tokens
        if isinstance(want, bool) or not isinstance(want, (int, np.integer)) or int(want) < 1:
            raise InputError(f"max_new_tokens must be a whole number of at least 1, got {want!r}")
        arrays = [self._load(s) for s in sources]
        if sized:
            budgets = [self._budget(i, names[k], arrays[row_image[k]].shape[:2]) for k, i in enumerate(ids)]

        # Each row's own cap: a long prompt near the LLM's limit must not shorten the
        # others, so rows that share a cap share generation batches.
        caps = [min(int(want), b) for b in budgets]
        by_cap: dict[int, list[int]] = {}
        for r, cap in enumerate(caps):
            by_cap.setdefault(cap, []).append(r)
        results: list[SegResult | None] = [None] * len(prompts)
        step = max(1, int(batch_size or len(prompts)))
        for cap, group in by_cap.items():
            for start in range(0, len(group), step):
                rows = group[start:start + step]
                used = sorted({row_image[r] for r in rows})
                local = {g: i for i, g in enumerate(used)}
                gens = self._generate([ids[r] for r in rows], [[local[row_image[r]]] for r in rows],
                                      [arrays[g] for g in used], cap)
                for r, g in zip(rows, gens):
                    stop = "end" if g.finished else ("max_new_tokens" if cap == int(want) else "context")
                    results[r] = self._result(g, prompts[r], arrays[row_image[r]].shape[:2], stop)
        return results  # type: ignore[return-value]

    def _preprocess(self, kind: str, image: np.ndarray):
        """``kind``'s own preprocessing of one RGB ``uint8 (H, W, 3)`` image. The intake's
        default limits keep every shipped component's resize at one row or more; limits
        raised past what a component can resize end here as a typed error, not PIL's."""
        from lisa_kit.errors import ImageSizeError

        try:
            return getattr(self.model, kind).preprocess(image)
        except (ValueError, ZeroDivisionError) as e:
            h, w = image.shape[:2]
            raise ImageSizeError(f"the {kind} cannot resize a {h}x{w} image ({e}); lower image_limits.max_aspect "
                                 f"(now {self.image_limits.max_aspect:g}) or crop the image", size=(h, w),
                                 limit=("max_aspect", self.image_limits.max_aspect)) from e

    def _generate(self, prompt_ids, row_images, arrays, max_new_tokens: int):
        from lisa_kit.generation import GenerationConfig, generate

        model = self.model
        with torch.inference_mode():
            enc = model.vision_encoder
            vpx = move_input(enc.collate([self._preprocess("vision_encoder", a) for a in arrays]), self.device,
                             self.dtype)
            mp = [self._preprocess("mask_decoder", a) for a in arrays]
            md_dtype = next(model.mask_decoder.parameters(), torch.empty(0)).dtype
            mpx = torch.stack([m[0] for m in mp]).to(self.device, md_dtype)
            metas = [m[1] for m in mp]
            return generate(model, prompt_ids, row_images, vpx, mpx, metas,
                            GenerationConfig(max_new_tokens=max_new_tokens))

    def _result(self, g, prompt: str, size, stop: str = "end") -> SegResult:
        markers = {self.model.seg_token_id: SEG_TEXT}
        if self.model.reject_token is not None:
            markers[self.model.reject_token_id] = self.model.reject_token
        text, spans = _answer_text(self.tokenizer, g.token_ids, markers, self._drop_ids)
        masks = (g.masks > 0).cpu().numpy().astype(bool)
        scores = [float(s) for s in g.scores.float().cpu()]
        h, w = int(size[0]), int(size[1])
        if masks.shape[0] == 0:
            masks = np.zeros((0, h, w), dtype=bool)
        rejected = [bool(r) for r in getattr(g, "rejected", None) or [False] * masks.shape[0]]
        malformed = list(getattr(g, "malformed", None) or [])
        geometry = getattr(self.model, "text_geometry", None)
        if geometry is not None:  # no [SEG] in a box/point answer: each object's text is its span
            objects = geometry.parse(text, (h, w)).objects
            spans = [o.span for o in objects] if len(objects) == masks.shape[0] else []
        return SegResult(text=text, masks=masks, scores=scores, seg_spans=spans, image_size=(h, w), prompt=prompt,
                         token_ids=list(g.token_ids), finished=bool(g.finished), rejected=rejected, stop=stop,
                         malformed=malformed)


def _check_prompt(prompt, what: str, *, allow_empty: bool = False) -> None:
    """Text a tokenizer can take: a ``str`` of valid Unicode (a lone surrogate — what
    Python makes of invalid UTF-8 in argv or a file read with ``surrogateescape`` — cannot
    be encoded, and tokenizers fail on it), not blank unless ``allow_empty``."""
    if not isinstance(prompt, str):
        raise InputError(f"the {what} must be text, got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"the {what} is not valid text: {prompt[e.start:e.end]!a} at character {e.start} is a "
                         "lone surrogate (undecodable bytes, e.g. input that is not UTF-8)") from None
    if not allow_empty and not prompt.strip():
        raise InputError(f"the {what} is empty")


def _answer_text(tok, token_ids: list[int], seg_id, drop: set[int]) -> tuple[str, list[tuple[int, int]]]:
    """Decode the answer: runs of ordinary tokens by the tokenizer, each ``[SEG]`` as
    ``"[SEG]"`` separated by a space (as LISA's output reads: ``"Sure, [SEG] ."``), every
    other special token dropped. ``seg_id``: the ``[SEG]`` id, or ``{id: text}`` of every
    marker token (``[SEG]`` and ``[REJ]``). Returns the text and the span of each marker."""
    markers = seg_id if isinstance(seg_id, dict) else {seg_id: SEG_TEXT}
    parts: list[tuple[str, bool]] = []  # (text, is a marker)
    run: list[int] = []
    for t in token_ids:
        if t in markers:
            if run:
                parts.append((tok.decode(run), False))
                run = []
            parts.append((markers[t], True))
        elif t not in drop and t >= 0:
            run.append(t)
    if run:
        parts.append((tok.decode(run), False))
    text, spans = "", []
    for piece, marker in parts:
        if not piece:
            continue
        after_seg = bool(spans) and spans[-1][1] == len(text)
        if text and (marker or after_seg) and not text[-1].isspace() and not piece[0].isspace():
            text += " "
        if marker:
            spans.append((len(text), len(text) + len(piece)))
        text += piece
    lead = len(text) - len(text.lstrip())
    text = text.strip()
    return text, [(a - lead, b - lead) for a, b in spans]


def load(recipe=None, overrides: Sequence[str] = (), *, checkpoint=None, **kwargs) -> Segmenter:
    """A :class:`Segmenter` from a recipe (``overrides``: ``key=value``), a checkpoint
    directory, or — neither named — the shipped demo model. ``kwargs`` go to the
    constructor (``device``, ``precision``, ``quantization``, ``vision_tower``…)."""
    if recipe is not None and checkpoint is not None:
        raise InputError("name a recipe or a checkpoint, not both")
    if checkpoint is not None:
        if overrides:
            raise InputError("recipe overrides apply to --recipe, not to --checkpoint")
        return Segmenter.from_checkpoint(checkpoint, **kwargs)
    if recipe is not None:
        kwargs.pop("sam", None)
        return Segmenter.from_recipe(recipe, overrides, **kwargs)
    if overrides:
        raise InputError("overrides given without a recipe")
    return Segmenter.from_default(**kwargs)
