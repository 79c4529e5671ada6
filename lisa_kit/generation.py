"""Answer generation with the LLM's KV cache, and one mask per generated ``[SEG]``.

The original re-runs the whole sequence (CLIP included) for every new token and then
reads the hidden states of the final pass. Here the prompt is run once, each step feeds
one token through the cache, and only the hidden states a ``[SEG]`` needs are kept:

* ``seg_hidden: previous`` (released LISA checkpoints): the last hidden state of the step
  whose logits chose ``[SEG]`` - available the moment ``[SEG]`` is picked;
* ``seg_hidden: token``: the hidden state of ``[SEG]`` itself, i.e. the output of the
  step that feeds it (one extra step when ``[SEG]`` is the very last token).

The states come from the layer(s) ``model.seg_layers`` names (:class:`lisa_kit.model.SegLayers`),
exactly as the teacher-forced forward reads them.

With ``model.prompt_strategy: text_geometry`` the answer's text (boxes and points in a
format of :mod:`lisa_kit.geometry_answers`) is parsed after generation and decoded with
``mask_decoder.decode_geometry``: one mask per object, malformed ones empty and flagged
in ``Generated.malformed``.

A model with a reject token (``[REJ]``) answers it for a target that is not in the image:
each ``[REJ]`` gives an empty mask (logits :data:`REJECTED_LOGIT`, so ``> 0`` is all
False) flagged in ``Generated.rejected``; nothing is decoded for it.

Rows are left-padded so a batch of prompts of different lengths decodes together.
Afterwards the seg head maps every kept state at once and the mask decoder runs once
per image, on the prompts of all rows about that image (several questions on one image
cost one decoder call, not one per row); the masks are split back to rows in order.

Questions about one image share its prefill (:func:`_shared_prefill`): rows whose prompts
are the same token ids up to and including their last image (same image index) form a
group; each group's prefix - system text and the image's features, plus whatever text
all its rows still share - runs through the LLM once, its KV cache is copied to the
group's rows, and only each row's remaining tokens (the question and the open assistant
turn) run on top. 8 questions on one image then read the image's tokens once, not 8 times.
The result equals the full prefill up to float rounding (``GenerationConfig.share_prefix=False``
keeps that path); one row, or a row without an image, always takes it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lisa_kit.interfaces import ImageMeta

#: Mask logit of every pixel of a rejected target: the lowest float32, so thresholding
#: (``> 0``), ``sigmoid`` (0) and comparisons behave, where ``-inf`` would give NaNs in sums.
REJECTED_LOGIT = torch.finfo(torch.float32).min


@dataclass
class GenerationConfig:
    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    keep_step_logits: bool = False
    #: Run a prompt prefix shared by several rows (same text and image up to the image's
    #: last feature) once; ``False`` prefills every row in full (the reference path).
    share_prefix: bool = True


@dataclass
class Generated:
    """One row's result. ``token_ids``: the new tokens (eos included when produced);
    ``seg_indices``: where each ``[SEG]`` (and ``[REJ]``, for a model with a reject token)
    sits in ``token_ids``; ``masks (M,H,W)`` mask logits at the original size and
    ``scores (M,)``, one per such token in order (``M = 0`` when the answer has none);
    ``rejected[m]``: mask ``m`` answers a ``[REJ]`` (all :data:`REJECTED_LOGIT`, score 0);
    ``seg_embeddings (K,P)`` / ``low_res_masks (K,1,h,w)``: the ``K`` decoded ``[SEG]``
    only; ``step_logits (steps, V)`` when asked for."""

    token_ids: list[int]
    text: str
    seg_indices: list[int]
    masks: torch.Tensor
    scores: torch.Tensor
    seg_embeddings: torch.Tensor
    low_res_masks: torch.Tensor
    step_logits: torch.Tensor | None = None
    finished: bool = True
    extra: dict = field(default_factory=dict)
    rejected: list[bool] = field(default_factory=list)
    #: ``prompt_strategy: text_geometry`` only: per mask, why it is empty (the answer or that
    #: object is malformed, :mod:`lisa_kit.geometry_answers`), ``None`` for a decoded mask.
    malformed: list[str | None] = field(default_factory=list)


def _pick(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    if not cfg.do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / max(cfg.temperature, 1e-5), -1)
    if cfg.top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp > cfg.top_p
        sp = sp.masked_fill(drop, 0)
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model, prompt_ids: list[list[int]], row_images: list[list[int]], vision_pixels: torch.Tensor,
             mask_pixels: torch.Tensor, metas: list[ImageMeta], config: GenerationConfig | None = None,
             generator: torch.Generator | None = None) -> list[Generated]:
    """``prompt_ids[b]``: token ids of row ``b`` (image slots included), ending with the
    open assistant turn; ``row_images[b]``: image index of each slot; pixels/metas per image
    (``vision_pixels``: the vision encoder's collated input, ``(I,3,h,w)`` for fixed-size towers).

    Positions of generated tokens come from the fusion (``decode_positions``), so a
    multi-axis scheme (M-RoPE) continues as the fusion defines it."""
    cfg = config or GenerationConfig()
    llm, tok = model.llm, model.tokenizer
    device = mask_pixels.device
    B = len(prompt_ids)
    T = max(len(p) for p in prompt_ids)
    ids = torch.full((B, T), tok.pad_id, dtype=torch.long, device=device)
    am = torch.zeros(B, T, dtype=torch.bool, device=device)
    for b, p in enumerate(prompt_ids):  # left padding: every row ends at the same column
        ids[b, T - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        am[b, T - len(p):] = True

    feats = model.encode_vision(vision_pixels)
    fused = model.fusion.fuse(ids, am, None, feats, row_images, llm.embed, padding_side="left")
    extra = model.llm_kwargs()  # per-layer states when seg_layers asks for them
    plan = _prefix_plan(prompt_ids, row_images, model.fusion.IMAGE_SLOT) if cfg.share_prefix else None
    shared = None if plan is None else _shared_prefill(llm, fused, *plan, T=T, lengths=[len(p) for p in prompt_ids],
                                                       extra=extra)
    if shared is None:  # every row's prompt in full (one row, nothing shared, or a cache that cannot be copied)
        out = llm(fused.inputs_embeds, attention_mask=fused.attention_mask.long(), position_ids=fused.position_ids,
                  use_cache=True, logits="last", **fused.llm_inputs, **extra)
        attn = fused.attention_mask.long()
    else:
        out, attn = shared
    cache = out.cache  # (the suffix run keeps the rows' own positions: the fusion's decode positions hold)
    last_hidden, logits = model.seg_layers.last(out), out.logits[:, -1]

    seg_id, eos_id, rej_id = model.seg_token_id, tok.eos_id, model.reject_token_id
    new_tokens: list[list[int]] = [[] for _ in range(B)]
    seg_hidden: list[list[torch.Tensor]] = [[] for _ in range(B)]
    steps: list[torch.Tensor] = []
    finished = torch.zeros(B, dtype=torch.bool, device=device)

    for step in range(cfg.max_new_tokens):
        nxt = _pick(logits, cfg, generator)
        if cfg.keep_step_logits:
            steps.append(logits.float().cpu())
        for b in range(B):
            if finished[b]:
                continue
            t = int(nxt[b])
            new_tokens[b].append(t)
            if t == seg_id and model.seg_hidden == "previous":
                seg_hidden[b].append(last_hidden[b])
        is_seg = (nxt == seg_id) & ~finished
        finished = finished | (nxt == eos_id)
        need_token_hidden = model.seg_hidden == "token" and bool(is_seg.any())
        if (bool(finished.all()) or step == cfg.max_new_tokens - 1) and not need_token_hidden:
            break
        nxt = nxt.masked_fill(finished & ~is_seg, tok.pad_id)
        attn = torch.cat([attn, torch.ones(B, 1, dtype=attn.dtype, device=device)], 1)
        pos = model.fusion.decode_positions(fused, step)  # (B, 1) or (A, B, 1)
        out = llm(llm.embed(nxt[:, None]), attention_mask=attn, position_ids=pos, cache=cache,
                  use_cache=True, logits="last", **extra)
        cache, last_hidden, logits = out.cache, model.seg_layers.last(out), out.logits[:, -1]
        if model.seg_hidden == "token":
            for b in is_seg.nonzero(as_tuple=True)[0].tolist():
                seg_hidden[b].append(last_hidden[b])
        if bool(finished.all()):
            break

    mask_features = model.encode_masks(mask_pixels)
    if getattr(model, "text_geometry", None) is not None:  # the answers' text gives box/point prompts
        from lisa_kit.geometry_answers import generated_from_answers

        return generated_from_answers(model, new_tokens, row_images, mask_features, metas, steps)
    decoded = _decode_by_image(model, seg_hidden, row_images, mask_features, metas)
    results = []
    for b in range(B):
        toks = new_tokens[b]
        seg_idx = [i for i, t in enumerate(toks) if t == seg_id or (rej_id is not None and t == rej_id)]
        rejected = [toks[i] != seg_id for i in seg_idx]
        img = row_images[b][-1] if row_images[b] else None
        if b in decoded:
            prompts, low, masks, scores = decoded[b]
        else:
            h, w = metas[img].original_size if img is not None else (0, 0)
            prompts = torch.zeros(0, model.mask_decoder.prompt_dim, device=device)
            low = torch.zeros(0, 1, 1, 1, device=device)
            masks = torch.zeros(0, h, w, device=device)
            scores = torch.zeros(0, device=device)
        if any(rejected):
            masks, scores = _with_rejections(masks, scores, rejected, metas[img].original_size if img is not None
                                             else (0, 0))
        answer = [t for t in toks if t != eos_id]
        results.append(Generated(
            token_ids=toks, text=tok.decode(answer), seg_indices=seg_idx, masks=masks, scores=scores,
            seg_embeddings=prompts, low_res_masks=low,
            step_logits=torch.stack([s[b] for s in steps]) if steps else None,
            finished=bool(toks and toks[-1] == eos_id), rejected=rejected))
    return results


def _prefix_plan(prompt_ids: list[list[int]], row_images: list[list[int]],
                 image_slot: int) -> tuple[list[int], list[int]] | None:
    """Which rows share a prefill prefix, or ``None`` when nothing would be shared.

    Rows are grouped by their token ids up to and including their last image slot and by
    the images in those slots; within a group the prefix extends over the text all its
    rows still have in common, up to one token before the shortest row's end (every row
    keeps at least its last token for its own run: the logits that pick the first answer
    token and the ``previous`` [SEG] state come from there). Returns ``(group of each
    row (B,), shared token count of each row (B,))`` with groups numbered in order of
    first appearance. ``None`` (full prefill for every row) for a single row, a row
    without an image, a row ending in its image, or when every group has one row."""
    B = len(prompt_ids)
    if B < 2:
        return None
    keys: dict[tuple, int] = {}
    group, members = [], []
    for b, p in enumerate(prompt_ids):
        slots = [t for t, i in enumerate(p) if i == image_slot]
        if not slots or not row_images[b] or slots[-1] == len(p) - 1:
            return None
        key = (tuple(p[:slots[-1] + 1]), tuple(row_images[b]))
        if key not in keys:
            keys[key] = len(keys)
            members.append([])
        group.append(keys[key])
        members[keys[key]].append(b)
    if len(keys) == B:
        return None
    shared = [0] * B
    for rows in members:
        first = prompt_ids[rows[0]]
        n = min(len(prompt_ids[b]) for b in rows) - 1  # each row keeps >= 1 token of its own
        for b in rows[1:]:
            other = prompt_ids[b]
            n = next((t for t in range(n) if other[t] != first[t]), n)
        for b in rows:
            shared[b] = n
    return group, shared


def _shared_prefill(llm, fused, group: list[int], shared: list[int], *, T: int, lengths: list[int],
                    extra: dict):
    """Prefill in two runs: each group's shared prefix once, then every row's own tokens
    on top of its group's KV cache. Returns ``(LMOutput of the second run, attention mask
    (B, Lp + S))`` - the same last-position logits/states as one full run, and a cache and
    mask the decode steps continue from.

    ``fused``: the rows fused left-padded to ``L`` columns (every row ends at column
    ``L``); ``shared[b]``: how many of row ``b``'s ``lengths[b]`` tokens (of ``T`` padded
    columns) its group shares. The cut is found with the fusion's own bookkeeping: the
    fused column of row ``b``'s first own token is ``token_positions[b, T - len_b +
    shared_b]``, wherever the image features put it.

    Prefix run: group ``g``'s prefix ``(P_g,)`` right-aligned in ``(G, Lp)`` with left pads
    (as the full path pads). Suffix run: the last ``S`` fused columns of every row, ``S``
    the longest suffix; a shorter suffix's columns before its cut are masked out, which
    leaves pads *between* the prefix and the suffix. Position ids (``(B, L)`` or
    ``(A, B, L)``) and the fusion's ``llm_inputs`` (``(B, L, ...)``) are the rows' own
    fused ones, cut at the same columns, so they continue from the prefix as in a full run.

    ``None`` when the LLM's cache has no ``reorder_cache(index)`` (transformers ``Cache``
    has it; the :class:`~lisa_kit.interfaces.LanguageModel` contract leaves the cache
    opaque), so it cannot be copied to the rows."""
    B, L = fused.attention_mask.shape
    device = fused.inputs_embeds.device
    cut = torch.stack([fused.token_positions[b, T - lengths[b] + shared[b]] for b in range(B)])  # (B,)
    start = L - fused.attention_mask.sum(1)  # (B,) first real column (left padding)
    reps = {g: b for b, g in reversed(list(enumerate(group)))}  # first row of each group
    G = len(reps)
    plen = {g: int(cut[b] - start[b]) for g, b in reps.items()}
    Lp = max(plen.values())
    D = fused.inputs_embeds.shape[-1]
    p_emb = fused.inputs_embeds.new_zeros(G, Lp, D)
    p_mask = torch.zeros(G, Lp, dtype=torch.long, device=device)
    pos = fused.position_ids
    p_pos = pos.new_zeros(*pos.shape[:-2], G, Lp)
    p_extra = {k: v.new_zeros(G, Lp, *v.shape[2:]) for k, v in fused.llm_inputs.items()}
    for g, b in reps.items():
        s, c = int(start[b]), int(cut[b])
        p_emb[g, Lp - plen[g]:] = fused.inputs_embeds[b, s:c]
        p_mask[g, Lp - plen[g]:] = 1
        p_pos[..., g, Lp - plen[g]:] = pos[..., b, s:c]
        for k, v in fused.llm_inputs.items():
            p_extra[k][g, Lp - plen[g]:] = v[b, s:c]
    # Only the cache is needed from the prefix: no logits, no per-layer states.
    prefix = llm(p_emb, attention_mask=p_mask, position_ids=p_pos, use_cache=True, logits=False, **p_extra)
    cache = prefix.cache
    if not callable(getattr(cache, "reorder_cache", None)):
        return None
    cache.reorder_cache(torch.tensor(group, device=device))  # (G, ...) -> (B, ...): each row its group's copy

    S = int((L - cut).max())
    cols = torch.arange(L - S, L, device=device)
    s_mask = (cols[None, :] >= cut[:, None]).long()  # (B, S): 0 on columns before the row's own tokens
    attn = torch.cat([p_mask[group], s_mask], 1)
    out = llm(fused.inputs_embeds[:, L - S:], attention_mask=attn, position_ids=pos[..., L - S:],
              cache=cache, use_cache=True, logits="last", **{k: v[:, L - S:] for k, v in fused.llm_inputs.items()},
              **extra)
    return out, attn


def _decode_by_image(model, seg_hidden: list[list[torch.Tensor]], row_images: list[list[int]],
                     mask_features: dict[str, torch.Tensor], metas: list[ImageMeta]) -> dict[int, tuple]:
    """One ``mask_decoder.decode`` call per image for all its rows' kept ``[SEG]`` states.

    ``seg_hidden[b]``: the ``K_b`` states ``(D,)`` of row ``b``, in answer order; a row's
    masks refer to its last image slot. The seg head maps every state of the batch at
    once ``(K, D) -> (K, P)``; image ``i``'s ``M_i`` prompts (its rows in order, each
    row's in answer order) are decoded together and post-processed together, then split
    back. Returns ``{row: (prompts (K_b, P), low_res (K_b, 1, h', w'), masks (K_b, H, W),
    scores (K_b,))}`` for the rows with at least one state and an image (the tensors
    are views of the image's batch). Equal to decoding row by row because the decoder
    treats the prompts of one call independently (the ``MaskDecoder`` contract)."""
    rows_of_image: dict[int, list[int]] = {}
    for b, states in enumerate(seg_hidden):
        if states and row_images[b]:
            rows_of_image.setdefault(row_images[b][-1], []).append(b)
    if not rows_of_image:
        return {}
    order = [b for rows in rows_of_image.values() for b in rows]
    prompts = model.seg_head(torch.stack([s for b in order for s in seg_hidden[b]]))  # (K, P)
    out, start = {}, 0
    for img, rows in rows_of_image.items():
        counts = [len(seg_hidden[b]) for b in rows]
        p_img = prompts[start:start + sum(counts)]  # (M_i, P)
        start += sum(counts)
        feats = {k: v[img:img + 1] for k, v in mask_features.items()}
        low, scores = model.mask_decoder.decode(feats, p_img)
        masks = model.mask_decoder.postprocess(low, metas[img])
        for b, p, lo, m, sc in zip(rows, p_img.split(counts), low.split(counts), masks.split(counts),
                                   scores[:, 0].split(counts)):
            out[b] = (p, lo, m, sc)
    return out


def _with_rejections(masks: torch.Tensor, scores: torch.Tensor, rejected: list[bool],
                     size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleave the decoded ``[SEG]`` masks ``(K,H,W)`` / scores ``(K,)`` with an empty
    mask (every logit :data:`REJECTED_LOGIT`, score 0) for each ``[REJ]``, in answer order:
    ``(len(rejected), H, W)``."""
    h, w = masks.shape[1:] if masks.shape[0] else size
    low = REJECTED_LOGIT if masks.dtype == torch.float32 else torch.finfo(masks.dtype).min  # finite in any dtype
    full = torch.full((len(rejected), h, w), low, dtype=masks.dtype, device=masks.device)
    full_scores = torch.zeros(len(rejected), dtype=scores.dtype, device=scores.device)
    keep = [k for k, r in enumerate(rejected) if not r]
    if keep:
        full[keep] = masks
        full_scores[keep] = scores
    return full, full_scores
