"""The LISA model: a composition of the five components and the seg head.

Path of a batch (shapes as in :mod:`lisa_kit.interfaces`)::

    vision_pixels (I,3,h,w) -> vision_encoder -> (I,N,Dv) -> projector -> (I,N,D)
        (or the tower's own collated input -> VisionFeatures: I entries (N_i,Dv) -> (N_i,D))
    input_ids (B,T) + image features -> fusion -> inputs_embeds (B,L,D), token_positions (B,T)
    -> llm -> hidden (B,L,D), logits (B,L,V)
    [SEG] tokens --token_positions--> hidden rows (K,D) -> seg_head -> prompts (K,P)
        (rows of the final states, of one chosen layer or a learned mix of layers: SegLayers)
    mask_pixels (I,3,S,S) -> mask_decoder.encode_image -> per image features
    prompts of image i (M_i,P) -> mask_decoder.decode -> low-res (M_i,1,h',w') -> postprocess -> (M_i,H_i,W_i)

Loss lives in :mod:`lisa_kit.loss`, generation in :mod:`lisa_kit.generation`, batching
in :mod:`lisa_kit.data`.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from lisa_kit.errors import RecipeError
from lisa_kit.interfaces import SEG_HIDDEN_CHOICES, FusedBatch, ImageMeta, LMOutput, VisionFeatures, move_input

#: ``model.seg_layers`` values that are not an index or a list of indices.
SEG_LAYERS_LAST, SEG_LAYERS_MIX = "last", "mix"


@dataclass
class Batch:
    """A training/teacher-forced batch.

    ``input_ids``/``attention_mask``/``labels``: ``(B, T)``; ``row_images[b]``: image index of
    each image slot of row ``b`` (LISA's ``offset`` expanded); ``vision_pixels``: the vision
    encoder's collated input (``(I,3,h,w)`` for fixed-size towers, see
    :class:`~lisa_kit.interfaces.VisionEncoder`);
    ``mask_pixels`` ``(I,3,S,S)``; ``metas[i]``: sizes of image ``i``; ``gt_masks[i]``:
    ``(M_i, H_i, W_i)`` float targets, one per ``[SEG]`` of image ``i`` (training only).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    row_images: list[list[int]]
    vision_pixels: torch.Tensor
    mask_pixels: torch.Tensor
    metas: list[ImageMeta]
    labels: torch.Tensor | None = None
    gt_masks: list[torch.Tensor] | None = None
    padding_side: str = "right"

    def to(self, device) -> "Batch":
        mv = lambda t: move_input(t, device)  # noqa: E731 (tensors; a tower's dict of them; None)
        return Batch(mv(self.input_ids), mv(self.attention_mask), self.row_images, mv(self.vision_pixels),
                     mv(self.mask_pixels), self.metas, mv(self.labels),
                     [mv(g) for g in self.gt_masks] if self.gt_masks is not None else None, self.padding_side)


@dataclass
class ModelOutput:
    """``logits (B,L,V)``, ``hidden (B,L,D)``, ``fused``; ``seg_index (K,3)`` rows of
    (row, text position, fused position used); ``seg_embeddings (K,P)``; per image ``i``:
    ``low_res_masks[i] (M_i,1,h',w')``, ``scores[i] (M_i,1)``, ``pred_masks[i] (M_i,H_i,W_i)``
    (logits at the original size), and ``seg_of_image[i]``: which of the K seg rows they are."""

    logits: torch.Tensor
    hidden: torch.Tensor
    fused: FusedBatch
    seg_index: torch.Tensor
    seg_embeddings: torch.Tensor
    low_res_masks: list[torch.Tensor] = field(default_factory=list)
    scores: list[torch.Tensor] = field(default_factory=list)
    pred_masks: list[torch.Tensor] = field(default_factory=list)
    seg_of_image: list[list[int]] = field(default_factory=list)


def llm_num_layers(llm) -> int | None:
    """Decoder layers of an LLM component: its ``num_layers`` when it says, else the
    transformers config's ``num_hidden_layers`` (``None`` when neither is known)."""
    n = getattr(llm, "num_layers", None)
    if n is None:
        cfg = getattr(getattr(llm, "model", None), "config", None)
        cfg = getattr(cfg, "text_config", None) or cfg
        n = getattr(cfg, "num_hidden_layers", None)
    return int(n) if n is not None else None


class SegLayers(nn.Module):
    """Which LLM hidden states feed the seg head (recipe ``model.seg_layers``).

    Indices follow transformers' ``output_hidden_states`` (:attr:`LMOutput.layer_hidden`,
    ``n + 1`` entries for ``n`` decoder layers): ``0`` the input embeddings, ``i`` the
    output of decoder layer ``i``, ``-1`` (= ``n``) the final, normalised states.

    * ``"last"`` (default, LISA): :attr:`LMOutput.hidden`; no extra states are kept.
    * an ``int``: that entry (``-1`` gives the same values as ``"last"``).
    * ``"mix"`` (every decoder layer's output, ``1..n``) or a list of indices:
      ``sum_j softmax(logits)_j * layer_hidden[index_j]``, with ``logits`` ``(n_mix,)`` a
      trained parameter (zeros at start: an even mix). Intermediate states are used as the
      decoder leaves them (not normalised); the seg head learns their scale.

    Only ``"mix"``/list own a parameter; the other choices add no state.
    """

    def __init__(self, spec=SEG_LAYERS_LAST, num_layers: int | None = None):
        super().__init__()
        self.spec = spec
        self.indices: list[int] | None = None  # entries of layer_hidden; None = LMOutput.hidden
        self.mix = False
        key = "model.seg_layers"
        if spec is None or spec == SEG_LAYERS_LAST:
            self.spec = SEG_LAYERS_LAST
            return
        if num_layers is None:
            raise RecipeError("the LLM does not say how many layers it has (num_layers or config."
                              "num_hidden_layers); only seg_layers: last works with it", key=key)
        if spec == SEG_LAYERS_MIX:
            wanted: list = list(range(1, num_layers + 1))
        elif isinstance(spec, int) and not isinstance(spec, bool):
            wanted = [spec]
        elif isinstance(spec, (list, tuple)) and spec and all(isinstance(i, int) and not isinstance(i, bool)
                                                               for i in spec):
            wanted = list(spec)
        else:
            raise RecipeError(f"must be {SEG_LAYERS_LAST!r}, {SEG_LAYERS_MIX!r}, a layer index or a non-empty list "
                              f"of layer indices, got {spec!r}", key=key)
        bad = [i for i in wanted if not -(num_layers + 1) <= i <= num_layers]
        if bad:
            raise RecipeError(f"layer index {bad[0]} out of range: the LLM has {num_layers} layers, so indices go "
                              f"from {-(num_layers + 1)} to {num_layers} (0 = embeddings, -1 = final states)", key=key)
        self.indices = [i % (num_layers + 1) for i in wanted]
        if len(set(self.indices)) != len(self.indices):
            raise RecipeError(f"layer indices repeat: {spec!r}", key=key)
        if not isinstance(spec, int):
            self.mix = True
            self.logits = nn.Parameter(torch.zeros(len(self.indices)))

    @property
    def needs_layers(self) -> bool:
        """Whether the LLM must return every layer's states (``output_layers=True``)."""
        return self.indices is not None

    def weights(self) -> torch.Tensor | None:
        """The mix weights ``(n_mix,)`` (softmax of ``logits``), ``None`` without a mix."""
        return self.logits.softmax(0) if self.mix else None

    def gather(self, out: LMOutput, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``(K, D)``: the states at fused positions ``(rows[k], cols[k])``."""
        if self.indices is None:
            return out.hidden[rows, cols]
        if out.layer_hidden is None:
            raise RuntimeError("seg_layers needs the LLM's per-layer states; call it with output_layers=True")
        picked = torch.stack([out.layer_hidden[i][rows, cols] for i in self.indices])  # (n_mix, K, D)
        if not self.mix:
            return picked[0]
        return torch.einsum("n,nkd->kd", self.weights().to(picked.dtype), picked)

    def last(self, out: LMOutput) -> torch.Tensor:
        """``(B, D)``: the states at the last position of every row (generation steps)."""
        b = out.hidden.shape[0]
        rows = torch.arange(b, device=out.hidden.device)
        return self.gather(out, rows, torch.full_like(rows, out.hidden.shape[1] - 1))

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, indices={self.indices}"


class LisaModel(nn.Module):
    """The components wired together. ``seg_token``/``seg_hidden``: which token's state
    prompts a mask (see :meth:`seg_rows`); ``seg_layers``: from which LLM layer(s)
    (:class:`SegLayers`); ``reject_token`` (GSVA's ``[REJ]``, ``None`` = off): a token
    the model answers for a target that is not in the image; it is supervised by the
    token loss only and yields an empty mask at inference."""

    def __init__(self, vision_encoder, projector, llm, mask_decoder, fusion, seg_head, seg_token: str = "[SEG]",
                 seg_hidden: str = "previous", train_image_encoder: bool = False, recipe=None,
                 seg_layers=SEG_LAYERS_LAST, reject_token: str | None = None, text_geometry=None):
        super().__init__()
        if seg_hidden not in SEG_HIDDEN_CHOICES:
            raise ValueError(f"seg_hidden must be one of {SEG_HIDDEN_CHOICES}, got {seg_hidden!r}")
        if reject_token is not None and (not isinstance(reject_token, str) or not reject_token
                                         or reject_token == seg_token):
            raise RecipeError(f"must be a non-empty token other than the seg token {seg_token!r}, got "
                              f"{reject_token!r}", key="model.reject_token")
        self.vision_encoder = vision_encoder
        self.projector = projector
        self.llm = llm
        self.mask_decoder = mask_decoder
        self.fusion = fusion
        self.seg_head = seg_head
        self.seg_token = seg_token
        self.seg_hidden = seg_hidden
        self.train_image_encoder = train_image_encoder
        self.recipe = recipe  # the resolved recipe this model was built from (plain dict)
        # Its nodes whose values come from the environment (recipes.env_origins): set by the loaders.
        self.recipe_env: dict = {}
        self.seg_layers = SegLayers(seg_layers, llm_num_layers(llm))
        self.reject_token = reject_token
        # prompt_strategy: text_geometry (lisa_kit.geometry_answers.TextGeometry; None = [SEG] embeddings):
        # the answer's text gives box/point prompts, so no seg head or mask decoding in forward.
        self.text_geometry = text_geometry

    # -- ids ----------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.llm.tokenizer

    @property
    def seg_token_id(self) -> int:
        return self.tokenizer.token_id(self.seg_token)

    @property
    def reject_token_id(self) -> int | None:
        """The id of ``[REJ]``, ``None`` when the model has no reject token."""
        return self.tokenizer.token_id(self.reject_token) if self.reject_token is not None else None

    def llm_kwargs(self) -> dict:
        """Extra LLM arguments the seg-layer choice needs (none for the default)."""
        return {"output_layers": True} if self.seg_layers.needs_layers else {}

    # -- stages -------------------------------------------------------------------
    def encode_vision(self, pixels) -> torch.Tensor | VisionFeatures:
        """``(I,3,h,w) -> (I,N,D)``, or a tower's own collated input -> :class:`VisionFeatures`
        with every image's ``(N_i, D)`` (the projector maps each image as ``(1, N_i, Dv)``;
        ``extra`` passes through). The tower is frozen in LISA: no graph is kept for it."""
        frozen = not any(p.requires_grad for p in self.vision_encoder.parameters())
        with torch.no_grad() if frozen else nullcontext():
            feats = self.vision_encoder(pixels)
        if isinstance(feats, VisionFeatures):
            return VisionFeatures([self.projector(t[None])[0] for t in feats.tokens], dict(feats.extra))
        return self.projector(feats)

    def encode_masks(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        with nullcontext() if self.train_image_encoder else torch.no_grad():
            return self.mask_decoder.encode_image(pixels)

    def fuse(self, batch: Batch, image_features: torch.Tensor | VisionFeatures) -> FusedBatch:
        return self.fusion.fuse(batch.input_ids, batch.attention_mask, batch.labels, image_features,
                                batch.row_images, self.llm.embed, padding_side=batch.padding_side)

    def seg_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 token_positions: torch.Tensor) -> torch.Tensor:
        """``(K, 3)``: (row, text index of ``[SEG]``, fused index whose hidden state is used).

        ``previous`` (the original's choice, needed for its checkpoints): the position
        right before ``[SEG]``, whose output predicts it; ``token``: ``[SEG]`` itself.
        """
        is_seg = (input_ids == self.seg_token_id) & attention_mask.bool()
        rows, cols = is_seg.nonzero(as_tuple=True)
        fused = token_positions[rows, cols]
        if self.seg_hidden == "previous":
            fused = fused - 1
        return torch.stack([rows, cols, fused], 1)

    def image_of_seg(self, batch_row_images: list[list[int]], input_ids: torch.Tensor, seg_index: torch.Tensor) -> list[int]:
        """The image a ``[SEG]`` refers to: the last image slot before it in its row (the
        row's first image when it comes before every slot)."""
        slot = self.fusion.IMAGE_SLOT
        out = []
        for r, c, _ in seg_index.tolist():
            slots_before = int((input_ids[r, :c] == slot).sum())
            imgs = batch_row_images[r]
            if not imgs:
                raise ValueError(f"row {r} has a {self.seg_token} but no image")
            out.append(imgs[max(slots_before - 1, 0)])
        return out

    def decode_masks(self, mask_features: dict[str, torch.Tensor], prompts: torch.Tensor, seg_images: list[int],
                     metas: list[ImageMeta]):
        """Decode each image's prompts on its own features. Returns per image lists
        (low_res, scores, pred_masks, seg indices)."""
        low, scores, preds, which = [], [], [], []
        for i, meta in enumerate(metas):
            idx = [k for k, im in enumerate(seg_images) if im == i]
            which.append(idx)
            if not idx:
                h, w = meta.original_size
                low.append(prompts.new_zeros(0, 1, 1, 1))
                scores.append(prompts.new_zeros(0, 1))
                preds.append(prompts.new_zeros(0, h, w, dtype=torch.float32))
                continue
            feats = {k: v[i:i + 1] for k, v in mask_features.items()}
            lr, sc = self.mask_decoder.decode(feats, prompts[idx])
            low.append(lr)
            scores.append(sc)
            preds.append(self.mask_decoder.postprocess(lr, meta))
        return low, scores, preds, which

    # -- teacher-forced forward ----------------------------------------------------
    def forward(self, batch: Batch) -> ModelOutput:
        image_features = self.encode_vision(batch.vision_pixels)
        fused = self.fuse(batch, image_features)
        out = self.llm(fused.inputs_embeds, attention_mask=fused.attention_mask.long(),
                       position_ids=fused.position_ids, **fused.llm_inputs, **self.llm_kwargs())
        if self.text_geometry is not None:
            return self._text_only(out, fused, batch.metas)
        seg_index = self.seg_rows(batch.input_ids, batch.attention_mask, fused.token_positions)
        prompts = self.seg_head(self.seg_layers.gather(out, seg_index[:, 0], seg_index[:, 2]))
        seg_images = self.image_of_seg(batch.row_images, batch.input_ids, seg_index)
        mask_features = self.encode_masks(batch.mask_pixels)
        low, scores, preds, which = self.decode_masks(mask_features, prompts, seg_images, batch.metas)
        return ModelOutput(logits=out.logits, hidden=out.hidden, fused=fused, seg_index=seg_index,
                           seg_embeddings=prompts, low_res_masks=low, scores=scores, pred_masks=preds,
                           seg_of_image=which)

    def _text_only(self, out: LMOutput, fused: FusedBatch, metas: list[ImageMeta]) -> ModelOutput:
        """``prompt_strategy: text_geometry``: the answers are the output (token loss only,
        as the mask decoder is frozen in that design); no mask per image (``(0, H, W)``).
        Masks from an answer's text: :func:`lisa_kit.geometry_answers.decode_answers`."""
        h = out.hidden
        none = lambda *s: h.new_zeros(*s, dtype=torch.float32)  # noqa: E731
        return ModelOutput(logits=out.logits, hidden=h, fused=fused,
                           seg_index=torch.zeros(0, 3, dtype=torch.long, device=h.device),
                           seg_embeddings=none(0, self.mask_decoder.prompt_dim),
                           low_res_masks=[none(0, 1, 1, 1) for _ in metas], scores=[none(0, 1) for _ in metas],
                           pred_masks=[none(0, *m.original_size) for m in metas], seg_of_image=[[] for _ in metas])
