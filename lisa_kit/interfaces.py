"""The five component kinds (plus the seg head) and the plain tensors they exchange.

Shapes use these letters:

* ``B``  conversations (text rows) in a batch, ``I`` images in a batch
* ``T``  text tokens of a row, ``L`` fused length (text + spliced image features)
* ``N``  visual tokens per image (``N_i`` when they differ by image), ``Dv`` vision
  feature size, ``D`` LLM hidden size
* ``A``  position axes of a multi-axis position scheme (Qwen's M-RoPE: 3)
* ``V``  vocabulary size, ``P`` mask-prompt size, ``M`` masks to decode for one image

Every component is an ``nn.Module`` that owns its constants (image size, mean/std,
select layer, padding rules). Components never see each other: the model
(:mod:`lisa_kit.model`) wires them with the tensors documented here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

KINDS = ("vision_encoder", "projector", "llm", "mask_decoder", "fusion", "seg_head")
# Which hidden state feeds the seg head: the one before [SEG] (released LISA) or [SEG] itself.
SEG_HIDDEN_CHOICES = ("previous", "token")


@dataclass
class ImageMeta:
    """Where one image went in the mask decoder's preprocessing.

    ``original_size`` (H, W) of the image as given; ``input_size`` (h, w) of the
    resized image inside the padded square the decoder's encoder sees.
    """

    original_size: tuple[int, int]
    input_size: tuple[int, int]

    def to_input(self, xy: torch.Tensor) -> torch.Tensor:
        """``(..., 2)`` x, y in original-image pixels -> the same points in the decoder's
        input frame (pixels of the resized image inside the padded square), scaled per
        axis by ``input_size / original_size``. Padding is bottom/right, so no shift."""
        sy = self.input_size[0] / self.original_size[0]
        sx = self.input_size[1] / self.original_size[1]
        return xy * xy.new_tensor([sx, sy])


@dataclass
class VisionFeatures:
    """Visual tokens of ``I`` images whose token counts may differ (a tower with dynamic
    resolution or tiling), what :meth:`VisionEncoder.forward` returns for such towers.

    ``tokens[i]``: ``(N_i, Dv)`` from the tower, ``(N_i, D)`` after the projector.
    ``extra``: named per-batch values the fusion or the LLM needs besides the tokens, kept
    unchanged by the projector (Qwen: ``image_grid_thw (I, 3)``; Qwen3-VL: ``deepstack``,
    a list over injected LM layers of per-image ``(N_i, D)`` lists).

    Indexing gives image ``i``'s ``(N_i, ·)`` tokens, as indexing a ``(I, N, ·)`` tensor
    does, so code that walks images accepts either form (:func:`per_image`).
    """

    tokens: list[torch.Tensor]
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tokens[i]

    @property
    def num_tokens(self) -> list[int]:
        """``N_i`` of every image."""
        return [int(t.shape[0]) for t in self.tokens]


def per_image(features: torch.Tensor | VisionFeatures) -> list[torch.Tensor]:
    """Image features as a list of ``(N_i, ·)``: the rows of a ``(I, N, ·)`` tensor, or
    :attr:`VisionFeatures.tokens`."""
    return list(features.tokens) if isinstance(features, VisionFeatures) else list(features.unbind(0))


def move_input(x: Any, device=None, dtype: torch.dtype | None = None) -> Any:
    """A collated vision input on ``device``: a tensor, or a dict/list/tuple of them;
    floating tensors also take ``dtype`` (integers, e.g. grid sizes, keep theirs)."""
    if isinstance(x, torch.Tensor):
        return x.to(device, dtype) if dtype is not None and x.is_floating_point() else x.to(device)
    if isinstance(x, dict):
        return {k: move_input(v, device, dtype) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(move_input(v, device, dtype) for v in x)
    return x


class VisionEncoder(nn.Module):
    """Image -> visual tokens for the LLM.

    Fixed-size towers (CLIP, timm, open_clip): ``preprocess(image)`` takes an RGB
    ``uint8`` array ``(H, W, 3)`` and returns ``(3, h, w)`` float pixels; ``collate``
    stacks them to ``(I, 3, h, w)``; ``forward(pixels (I, 3, h, w)) -> (I, N, Dv)``;
    ``num_tokens`` is ``N``.

    Towers whose input or token count depends on the image (Qwen-VL's dynamic resolution,
    InternVL's tiles): ``preprocess`` returns the tower's own per-image input (any value,
    e.g. a dict of tensors), ``collate(items)`` batches ``I`` of them into what
    ``forward`` takes (a tensor or a dict of tensors; :func:`move_input` moves it to a
    device), and ``forward`` returns :class:`VisionFeatures` (``I`` entries of
    ``(N_i, Dv)``). ``tokens_for((H, W))`` says ``N_i`` for an image of that size without
    running the tower (``None``: the count does not depend on the image, ``num_tokens``).
    """

    kind: ClassVar[str] = "vision_encoder"
    feature_dim: int

    def preprocess(self, image: np.ndarray) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def collate(self, items: list) -> Any:
        """``I`` preprocessed images -> the batched input of ``forward`` (default: stack
        the ``(3, h, w)`` tensors to ``(I, 3, h, w)``)."""
        return torch.stack(items)

    def tokens_for(self, size: tuple[int, int]) -> int | None:
        """Visual tokens of an image of ``size`` (H, W); ``None`` for a fixed count."""
        return None


class Projector(nn.Module):
    """Visual tokens to LLM embedding space: ``(I, N, Dv) -> (I, N, D)``."""

    kind: ClassVar[str] = "projector"
    in_dim: int
    out_dim: int


@dataclass
class LMOutput:
    """``hidden``: final (normalised) hidden states ``(B, L, D)``; ``logits`` ``(B, L, V)``
    (``None`` when not asked for); ``cache``: the KV cache to continue from, if requested;
    ``layer_hidden``: every layer's hidden states when asked for (tuple of ``(B, L, D)``)."""

    hidden: torch.Tensor
    logits: torch.Tensor | None
    cache: Any = None
    layer_hidden: tuple[torch.Tensor, ...] | None = None


class LanguageModel(nn.Module):
    """A causal LM reached through embeddings.

    ``embed(ids (B, T)) -> (B, T, D)``;
    ``forward(inputs_embeds (B, L, D), attention_mask (B, L_total), position_ids
    ((B, L) or (A, B, L), as the fusion made them), cache=None, use_cache=False,
    logits=True, **llm_inputs) -> LMOutput``; ``llm_inputs`` are the fusion's
    :attr:`FusedBatch.llm_inputs` (an LLM takes those of the fusions it pairs with; none
    for LLaVA-style fusions). ``tokenizer`` is the text side of the same checkpoint
    (:class:`lisa_kit.tokenizer.Tokenizer`).
    """

    kind: ClassVar[str] = "llm"
    hidden_size: int
    tokenizer: Any

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def resize_vocab(self, n: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class MaskDecoder(nn.Module):
    """Promptable mask decoder (SAM-like).

    * ``preprocess(image uint8 (H, W, 3)) -> (pixels (3, S, S), ImageMeta)``
    * ``encode_image(pixels (I, 3, S, S)) -> dict[str, Tensor]``: every value has
      batch dimension ``I`` (SAM: ``{"image_embeddings": (I, C, h, w)}``; SAM2 adds its
      high-resolution maps). The model slices one image with ``v[i:i+1]``.
    * ``decode(features (batch 1), prompts (M, P)) -> (low_res_logits (M, 1, h', w'), scores (M, 1))``:
      the ``M`` prompts are independent (mask ``m`` depends on prompt ``m`` only, as if
      decoded alone, up to float rounding), because the model and generation decode all
      of an image's prompts, from every row that asks about it, in one call
      (the conformance check compares each prompt decoded alone with the batch).
    * ``postprocess(low_res (M, 1, h', w'), meta) -> logits (M, H, W)`` at the original size.

    Geometric prompts (optional; the ``text_geometry`` prompt strategy needs them): a
    decoder that sets ``accepts_geometry = True`` implements
    ``decode_geometry(features (batch 1), boxes (M, 4) | None, points (M, K, 2) | None,
    point_labels (M, K) | None) -> (low_res_logits (M, 1, h', w'), scores (M, 1))``:
    ``boxes`` float ``x0, y0, x1, y1`` and ``points`` float ``x, y``, both in the decoder's
    *input* frame (pixels of the resized image inside the padded square, i.e. after
    ``preprocess``; :meth:`ImageMeta.to_input` maps original pixels there);
    ``point_labels`` long (1 foreground, 0 background, -1 padding). At least one of
    ``boxes``/``points`` is given; the ``M`` prompts are independent as in ``decode``
    (conformance checks both), and ``postprocess`` applies to the result.
    """

    kind: ClassVar[str] = "mask_decoder"
    prompt_dim: int
    #: Whether :meth:`decode_geometry` (box/point prompts) is implemented.
    accepts_geometry: ClassVar[bool] = False
    # With accepts_geometry: whether points are taken too (SAM 3's geometry encoder takes
    # boxes only). Callers send points only to a decoder that says so; the conformance
    # check tests the kinds declared.
    accepts_points: ClassVar[bool] = True

    def decode_geometry(self, features: dict[str, torch.Tensor], boxes: torch.Tensor | None,
                        points: torch.Tensor | None, point_labels: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError(f"{type(self).__name__} takes no box/point prompts (accepts_geometry is False)")
    # State-dict keys starting with one of these keep the precision the decoder was built in
    # (fp32) when the model is asked for bf16/fp16; all other floating tensors take it. The
    # default "" keeps the whole decoder fp32 (safe for code that builds fp32 tensors at run
    # time, e.g. segment-anything's prompt encoder); a decoder narrows it to the parts that
    # need it, so its large image encoder is stored and run in the requested precision.
    # Applied by :func:`lisa_kit.checkpoint.io.param_dtype` (loading, casting, estimates).
    fp32_prefixes: ClassVar[tuple[str, ...]] = ("",)


@dataclass
class FusedBatch:
    """What the fusion strategy hands to the LLM.

    ``inputs_embeds (B, L, D)``, ``attention_mask (B, L)`` (bool), ``labels (B, L)``
    (``-100`` = not supervised) or ``None``, ``position_ids`` ``(B, L)`` or, for a
    multi-axis scheme, ``(A, B, L)`` (Qwen's M-RoPE: ``(3, B, L)``; code that slices
    positions indexes them as ``[..., b, columns]``), and ``token_positions (B, T)``: the
    fused index every text token landed on (``-1`` for padding and for image slots). This
    is how the model finds ``[SEG]`` for any tower, any number of images and either
    padding side.

    ``llm_inputs``: extra keyword arguments of the LLM's ``forward`` for these fused
    positions (Qwen3-VL's deepstack: ``visual_pos_masks (B, L)``,
    ``deepstack_embeds (B, L, K, D)``). Every value is a tensor whose first two axes are
    ``(B, L)``, aligned with ``inputs_embeds``, so generation can take rows and columns
    of them as it does of the embeddings; generated tokens carry none.
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    position_ids: torch.Tensor
    token_positions: torch.Tensor
    llm_inputs: dict[str, torch.Tensor] = field(default_factory=dict)


class FusionStrategy(nn.Module):
    """How images enter the token stream.

    ``image_tokens() -> list[str]``: special tokens the strategy needs in the vocabulary.
    ``wrap_image(tokenizer) -> list[int]``: the token ids that stand for one image in a
    prompt (may contain ``IMAGE_SLOT``, a negative id that is never a vocabulary id).
    ``fuse(input_ids (B, T), attention_mask (B, T), labels (B, T) | None,
    image_features, row_images, embed, padding_side) -> FusedBatch``; ``image_features``:
    the projected features of every image of the batch, a ``(I, N, D)`` tensor or
    :class:`VisionFeatures` (``N_i`` per image); ``row_images[b]``: the image of each slot.

    ``decode_positions(fused, step) -> (B, 1)`` or ``(A, B, 1)``: the position ids of
    the ``step``-th generated token (0 = the first) after the left-padded prompt
    ``fused``; the fusion owns its position scheme, so generation asks it.
    """

    kind: ClassVar[str] = "fusion"
    IMAGE_SLOT: ClassVar[int] = -200

    def example_features(self, n_images: int, n_tokens: int, dim: int) -> torch.Tensor | VisionFeatures:
        """Random features of ``n_images`` images, ``n_tokens`` each, in the form this
        fusion takes (default ``(I, N, D)`` from the global RNG), for tests: the
        conformance contract fuses them. A fusion that needs :attr:`VisionFeatures.extra`
        (grids) returns features carrying it."""
        return torch.randn(n_images, n_tokens, dim)

    def decode_positions(self, fused: FusedBatch, step: int) -> torch.Tensor:
        """Default: one past the prompt's last position (every row ends at the last
        column when left-padded), on every axis."""
        return fused.position_ids[..., -1:] + 1 + step


class SegHead(nn.Module):
    """LLM hidden state at ``[SEG]`` -> mask prompt: ``(K, D) -> (K, P)``."""

    kind: ClassVar[str] = "seg_head"
    in_dim: int
    out_dim: int


BASES: dict[str, type[nn.Module]] = {
    "vision_encoder": VisionEncoder,
    "projector": Projector,
    "llm": LanguageModel,
    "mask_decoder": MaskDecoder,
    "fusion": FusionStrategy,
    "seg_head": SegHead,
}

# The sizes each kind exposes as attributes of the built module; a spec's ``sizes``
# function returns (some of) these keys.
SIZE_NAMES: dict[str, tuple[str, ...]] = {
    "vision_encoder": ("feature_dim",),
    "projector": ("in_dim", "out_dim"),
    "llm": ("hidden_size",),
    "mask_decoder": ("prompt_dim",),
    "fusion": (),
    "seg_head": ("in_dim", "out_dim"),
}
# (kind, build argument, kind, size): the builder passes the second component's size as
# the first one's argument, so a recipe need not write it (and, if it does, it must agree).
SIZE_LINKS: tuple[tuple[str, str, str, str], ...] = (
    ("projector", "in_dim", "vision_encoder", "feature_dim"),
    ("projector", "out_dim", "llm", "hidden_size"),
    ("seg_head", "in_dim", "llm", "hidden_size"),
    ("seg_head", "out_dim", "mask_decoder", "prompt_dim"),
)


@dataclass
class ComponentSpec:
    """One registered component.

    ``build(**kwargs)`` makes it; recipe keys are checked against ``build``'s signature
    before any weight is read. ``tiny`` is a kwargs dict that builds a small random
    instance on CPU (the conformance tests use it); ``derived`` names the kwargs the
    model fills in from other components (e.g. a projector's ``in_dim``).

    ``component_class`` (optional) is the class ``build`` returns: loaders read its declared
    constants (``fp32_prefixes``) to size a load before anything is built; without it they
    assume the kind's interface defaults (for a mask decoder: all fp32, an over-estimate).

    ``sizes`` (optional) is a cheap ``sizes(**kwargs) -> dict`` giving the sizes a
    component built with those recipe kwargs would have (keys from :data:`SIZE_NAMES`,
    e.g. ``{"feature_dim": 1024}``) by reading configs, never weights; leave a key out
    when it cannot be known. ``lisa-kit validate`` uses it to reject incompatible parts
    before anything is built; without it that check is skipped for the component.
    """

    kind: str
    name: str
    build: Any
    tiny: dict = field(default_factory=dict)
    derived: tuple[str, ...] = ()
    description: str = ""
    sizes: Any = None
    component_class: Any = None
