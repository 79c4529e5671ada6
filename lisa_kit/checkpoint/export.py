"""Export a model as a released-LISA Hugging Face directory (and lisa_kit's own format).

:func:`export_lisa_hf` is the inverse of :mod:`lisa_kit.checkpoint.lisa_hf`: it writes
what ``merge_lora_weights_and_save_hf_model.py`` of the original code writes, so LISA's
``LISAForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained(use_fast=False)``
(transformers 4.31) and lisa_kit's :func:`~lisa_kit.checkpoint.lisa_hf.import_lisa_hf`
both read it. The model must be built of the reference components: ``hf_clip``,
``linear`` or ``mlp2x_gelu``, ``hf_causal_lm`` (LLaMA), ``sam``, ``llava_splice``, ``mlp2``.

Directory written::

    config.json               model_type "llava", architectures ["LISAForCausalLM"], the LLaMA
                              fields, LISA's (train_mask_decoder, out_dim, vision_tower, mm_*)
    model.safetensors         (or pytorch_model.bin; sharded with an index above max_shard_size)
                              model.embed_tokens / model.layers.* / model.norm / lm_head   <- llm
                              model.layers.*.self_attn.rotary_emb.inv_freq  (4.31's persistent
                                                                             buffer, recomputed)
                              model.mm_projector.*                                         <- projector
                              model.visual_model.{image_encoder,prompt_encoder,mask_decoder}.* <- SAM
                              model.text_hidden_fcs.0.{0,2}.*                              <- seg head
    generation_config.json    _from_model_config, use_cache false (LISA's evaluate needs it)
    tokenizer.model, tokenizer_config.json, special_tokens_map.json, added_tokens.json
                              slow-LLaMA layout: [SEG], <im_start>, <im_end> with their ids
    sam_config.json           the SAM sizes (``import_lisa_hf(dir, sam=dir/"sam_config.json")``;
                              LISA's code itself always builds ViT-H)
    clip_vision_tower/        only when no tower path is known: CLIPVisionModel (transformers-4
                              key layout) + preprocessor_config.json; config.json names it
                              relatively (LLaVA's builder wants "clip" in the name)

The CLIP tower is not inside the weights (as in the released checkpoints). ``vision_tower``
is written as given, else the recipe's ``hf_clip`` ``pretrained`` (made absolute when it is a
local directory), else the tower is written to ``clip_vision_tower/``.

Weights are written the way ``save_pretrained`` writes them, in the precision of the model
(``dtype`` casts floating tensors; ``lisa-kit export`` defaults to the precision the loaded
checkpoint stores, so a bf16 release exports as bf16): ``model.safetensors`` or
``pytorch_model.bin``, and above ``max_shard_size`` (10GB, transformers 4.31's default)
``model-0000i-of-0000N.safetensors`` / ``pytorch_model-0000i-of-0000N.bin`` with the
``*.index.json`` that ``from_pretrained`` reads. Memory: the tensors are planned (key, shape,
dtype) first, then one shard at a time is built (cast, LoRA folded in), written and dropped,
so an export needs at most one shard beyond the model; no second state dict exists.

A peft-wrapped LLM (``model.llm.model = peft.get_peft_model(...)``) is merged:
``merge_lora="copy"`` (default) leaves the model as it was; plain LoRA on linear layers is
merged one layer at a time as its shard is written (``W + ΔW`` with peft's own arithmetic,
bit-identical to ``merge_and_unload``), any other adapter (DoRA, ``modules_to_save``, ...)
through a merged deep copy of the LLM. ``"inplace"`` replaces ``model.llm.model`` by the
merged model (the adapters are gone afterwards; what the CLI does).

Writing is atomic: everything goes to a temporary sibling ``<out>.tmp-XXXX`` that is
renamed to ``<out>`` at the end; a failure leaves nothing at ``<out>`` (and a previous
export there intact). An existing non-empty ``<out>`` is refused unless ``overwrite=True``.
Files and directories get ordinary modes (0644 / 0755 under umask 022), not the 0600 / 0700
of ``tempfile`` and safetensors.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lisa_kit.errors import CheckpointError

TOWER_DIR = "clip_vision_tower"
SAM_CONFIG = "sam_config.json"
DEFAULT_MAX_SHARD = 10 * 10**9  # transformers 4.31's save_pretrained default ("10GB", decimal)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# transformers 4.31 computed this buffer itself and saved it (persistent); released LISA
# checkpoints therefore carry one per layer.
INV_FREQ = "model.layers.{}.self_attn.rotary_emb.inv_freq"


class ExportWarning(UserWarning):
    """The exported directory loads in lisa_kit, but LISA's original code would not run
    this model as it is (the message says why)."""


# -- atomic directories ------------------------------------------------------------
def check_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an existing file, or an existing non-empty directory unless ``overwrite``
    (call it before loading a big model, to fail fast)."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise CheckpointError(f"output path exists and is not a directory: {out}")
        if any(out.iterdir()) and not overwrite:
            raise CheckpointError(f"output directory exists and is not empty: {out}; "
                                  "pass overwrite=True (--overwrite) to replace it")
        if out.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
            raise CheckpointError(f"refusing to replace {out}: it is the working directory or one of its parents")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``out``; on success it replaces ``out``,
    on any exception it is removed and ``out`` is untouched."""
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        ordinary_modes(tmp)  # mkdtemp's 0700 and safetensors' 0600 are no modes for a result
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:  # put the previous directory back
                os.replace(old / out.name, out)
                shutil.rmtree(old, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- LoRA ----------------------------------------------------------------------------
def has_lora(model) -> bool:
    return hasattr(model.llm.model, "merge_and_unload")


@contextlib.contextmanager
def lora_merged(model, mode: str = "copy") -> Iterator[object]:
    """Within the block ``model.llm.model`` is a plain transformers model with any peft
    LoRA adapters folded into its weights. ``mode``: ``copy`` (a merged deep copy is
    swapped in for the block; the model is restored afterwards) or ``inplace`` (merged for
    good). Yields the LLM's transformers model."""
    if mode not in ("copy", "inplace"):
        raise CheckpointError(f"merge_lora must be 'copy' or 'inplace', got {mode!r}")
    llm = model.llm
    if not has_lora(model):
        yield llm.model
        return
    if mode == "inplace":
        llm.model = llm.model.merge_and_unload()
        yield llm.model
        return
    original = llm.model
    merged = copy.deepcopy(original).merge_and_unload()
    llm.model = merged
    try:
        yield merged
    finally:
        llm.model = original


# -- checks ----------------------------------------------------------------------------
def _check_reference(model) -> None:
    from lisa_kit.components.hf_causal_lm import HFCausalLM
    from lisa_kit.components.hf_clip import HFClipVisionEncoder
    from lisa_kit.components.llava_splice import LlavaSplice
    from lisa_kit.components.projectors import LinearProjector, MLPProjector
    from lisa_kit.components.sam import SamMaskDecoder
    from lisa_kit.components.seg_head import MLP2SegHead

    need = {"vision_encoder": (HFClipVisionEncoder, "hf_clip"), "projector": ((LinearProjector, MLPProjector),
            "linear or mlp2x_gelu"), "llm": (HFCausalLM, "hf_causal_lm"), "mask_decoder": (SamMaskDecoder, "sam"),
            "fusion": (LlavaSplice, "llava_splice"), "seg_head": (MLP2SegHead, "mlp2")}
    for kind, (cls, name) in need.items():
        comp = getattr(model, kind)
        if not isinstance(comp, cls):
            raise CheckpointError(f"the LISA format holds the reference components only; this {kind} is a "
                                  f"{type(comp).__name__}, expected {name} (save it with --format lisa_kit)",
                                  component=kind)
    if isinstance(model.projector, MLPProjector) and model.projector.depth != 2:
        raise CheckpointError(f"projector depth {model.projector.depth}: the LISA/LLaVA format knows linear and "
                              "mlp2x_gelu only", component="projector")
    model_type = getattr(_base_config(model), "model_type", None)
    if model_type != "llama":
        raise CheckpointError(f"LISA's format is a LLaMA model (model_type llava); this LLM is {model_type!r} "
                              "(save it with --format lisa_kit)", component="llm")
    if model.seg_token != "[SEG]":
        raise CheckpointError(f"LISA's code and importer look for the token [SEG]; this model's seg token is "
                              f"{model.seg_token!r}", component="seg_head")
    layers = getattr(getattr(model, "seg_layers", None), "spec", "last")
    if layers != "last":
        raise CheckpointError(f"model.seg_layers is {layers!r}: LISA's format feeds the seg head the final hidden "
                              "states and has no place for another layer choice or a learned layer mix (save it "
                              "with --format lisa_kit)", component="seg_layers")
    if getattr(model, "reject_token", None):
        raise CheckpointError(f"model.reject_token is {model.reject_token!r}: LISA's format and code know [SEG] "
                              "only (save it with --format lisa_kit)", component="llm")


def _base_config(model):
    m = model.llm.model
    return m.get_base_model().config if hasattr(m, "get_base_model") else m.config


def compatibility_notes(model) -> list[str]:
    """What LISA's original code (github dvlab-research/LISA @ 3cb2d43) would not do the way
    this model does; lisa_kit's importer reads the export either way."""
    from lisa_kit.components.projectors import MLPProjector
    from lisa_kit.components.sam import DEFAULTS, VARIANTS
    from lisa_kit.tokenizer import SentencePieceTokenizer

    notes = []
    ve = model.vision_encoder
    if ve.num_tokens != 256:
        notes.append(f"the vision tower gives {ve.num_tokens} image tokens; LISA's code hard-codes 256 (CLIP 224/14: "
                     "the 255 shift of its [SEG] mask), so [SEG] positions would be wrong there")
    if ve.select_feature != "patch":
        notes.append(f"mm_vision_select_feature {ve.select_feature!r}: LISA's LisaModel forces 'patch'")
    if isinstance(model.projector, MLPProjector):
        notes.append("mlp2x_gelu projector: LISA's llava_arch.py builds nn.Linear only (LLaVA-1.5's code reads "
                     "mm_projector_type)")
    vit_h = {**DEFAULTS, **VARIANTS["vit_h"]}
    cfg = model.mask_decoder.cfg
    if any(cfg.get(k) != v for k, v in vit_h.items() if k not in ("pixel_mean", "pixel_std")):
        notes.append(f"SAM is not ViT-H; LISA's code always builds ViT-H: import with sam={SAM_CONFIG}")
    if model.seg_hidden != "previous":
        notes.append(f"seg_hidden {model.seg_hidden!r}: LISA's code feeds the state before [SEG]; import with "
                     f"seg_hidden={model.seg_hidden!r}")
    if not isinstance(model.tokenizer, SentencePieceTokenizer):
        notes.append("the tokenizer is not a LLaMA SentencePiece one; LISA loads tokenizers with use_fast=False")
    return notes


# -- state dict and config ----------------------------------------------------------------
def _inv_freq(cfg) -> torch.Tensor:
    """transformers 4.31's ``LlamaRotaryEmbedding.inv_freq`` (rope scaling does not change it)."""
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rp = getattr(cfg, "rope_parameters", None) or {}
    base = rp.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    return 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))


def _lora_layers(peft_model) -> dict[str, object] | None:
    """``{module name inside the base model: peft LoRA Linear}`` when every adapter of
    ``peft_model`` is plain LoRA on a linear layer (no DoRA or other variant, no LoRA bias,
    no ``modules_to_save`` copies), so that merged weights can be formed one layer at a
    time; ``None`` otherwise."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = {}
    for name, m in peft_model.get_base_model().named_modules():
        if "modules_to_save" in name or "original_module" in name:
            return None
        if isinstance(m, BaseTunerLayer):
            if type(m) is not LoraLinear or any(a in m.lora_variant or m.lora_bias.get(a) for a in m.active_adapters):
                return None
            layers[name] = m
    return layers


def _merged_weight(layer) -> torch.Tensor:
    """``W + ΔW`` of one LoRA linear layer, computed as peft's ``merge`` does it (the same
    operations in the same order, so the result is bit-identical to ``merge_and_unload``),
    into a new tensor: the model keeps its adapters."""
    with torch.no_grad():
        w = layer.get_base_layer().weight.detach().clone()
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A and adapter not in layer.merged_adapters:
                w += layer.get_delta_weight(adapter)
    return w


def _llm_tensors(hf_llm, dtype: torch.dtype | None) -> list[PlannedTensor]:
    """The LLM's tensors in LlamaForCausalLM's key layout. A peft model (streamable LoRA,
    see :func:`_lora_layers`) is merged layer by layer as its tensors are written."""
    layers = _lora_layers(hf_llm) if hasattr(hf_llm, "merge_and_unload") else None
    source = hf_llm.get_base_model() if layers is not None else hf_llm
    out = []
    for k, v in source.state_dict().items():
        if layers is not None and ".lora_" in k:
            continue  # folded into its base weight below
        if layers is not None and ".base_layer." in k:
            module, param = k.split(".base_layer.", 1)
            k = f"{module}.{param}"
            if param == "weight":
                layer = layers[module]
                out_dtype = dtype if dtype is not None else v.dtype
                out.append(PlannedTensor(k, tuple(v.shape), out_dtype,
                                         lambda layer=layer, d=out_dtype: _cast(_merged_weight(layer), d)))
                continue
        if not k.startswith(("model.", "lm_head.")) or "lora_" in k or ".base_layer." in k:
            raise CheckpointError("unexpected LLM key for LISA's layout (an unmerged adapter?)",
                                  component="llm", key=k)
        out.append(plan(k, v, dtype))
    return out


def lisa_tensors(model, hf_llm=None, dtype: torch.dtype | None = None,
                 rotary_inv_freq: bool = True) -> list[PlannedTensor]:
    """The model's weights in the released-LISA key layout (the inverse of
    :func:`~lisa_kit.checkpoint.lisa_hf.split_lisa_state`), without the CLIP tower, as
    planned tensors: nothing is copied until a shard is written. ``hf_llm``: the transformers
    LLM to read (default ``model.llm.model``; plain LoRA adapters are merged on the fly);
    ``dtype``: cast floating tensors (rotary ``inv_freq`` stays float32, as released)."""
    hf_llm = hf_llm if hf_llm is not None else model.llm.model
    out = _llm_tensors(hf_llm, dtype)
    if rotary_inv_freq:
        cfg = _base_config(model) if hf_llm is model.llm.model else hf_llm.config
        inv = _inv_freq(cfg)
        out += [plan(INV_FREQ.format(i), inv) for i in range(cfg.num_hidden_layers)]
    for prefix, strip, module in (("model.mm_projector.", "proj.", model.projector),
                                  ("model.visual_model.", "", model.mask_decoder),
                                  ("model.text_hidden_fcs.0.", "layers.", model.seg_head)):
        out += [plan(prefix + k.removeprefix(strip), v, dtype) for k, v in module.state_dict().items()]
    return out


def _llama_fields(model, cfg) -> dict:
    tok = model.tokenizer
    d = {k: getattr(cfg, k, None) for k in (
        "hidden_act", "hidden_size", "initializer_range", "intermediate_size", "max_position_embeddings",
        "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "pretraining_tp", "rms_norm_eps",
        "tie_word_embeddings")}
    d["vocab_size"] = model.llm.vocab_size
    d["bos_token_id"] = cfg.bos_token_id if cfg.bos_token_id is not None else tok.bos_id
    d["eos_token_id"] = cfg.eos_token_id if cfg.eos_token_id is not None else tok.eos_id
    d["pad_token_id"] = cfg.pad_token_id  # the LLM's own (its embedding's padding_idx), as released
    if d["num_key_value_heads"] is None:
        d["num_key_value_heads"] = d["num_attention_heads"]
    if d["pretraining_tp"] is None:
        d["pretraining_tp"] = 1
    rp = dict(getattr(cfg, "rope_parameters", None) or {})
    d["rope_theta"] = rp.pop("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    rope_type = rp.pop("rope_type", None) or rp.pop("type", None) or "default"
    legacy = getattr(cfg, "rope_scaling", None) if not rp else None
    d["rope_scaling"] = None if rope_type == "default" else (legacy or {"type": rope_type, **rp})
    if getattr(cfg, "attention_bias", False):
        d["attention_bias"] = True
    if getattr(cfg, "mlp_bias", False):
        d["mlp_bias"] = True
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim and head_dim != cfg.hidden_size // cfg.num_attention_heads:
        d["head_dim"] = head_dim
    return d


def lisa_config(model, vision_tower: str, torch_dtype: str, hf_llm=None) -> dict:
    """``config.json`` of a released LISA checkpoint for this model."""
    import transformers

    from lisa_kit.components.projectors import MLPProjector

    hf_llm = hf_llm if hf_llm is not None else model.llm.model
    ve = model.vision_encoder
    cfg = {
        "architectures": ["LISAForCausalLM"],
        "model_type": "llava",
        **_llama_fields(model, hf_llm.config),
        # LISA's own (LISA.py: LISAForCausalLM reads train_mask_decoder/out_dim/vision_tower;
        # LisaModel.__init__ sets the others and save_pretrained writes them back).
        "train_mask_decoder": True,
        "out_dim": model.seg_head.out_dim,
        "vision_tower": vision_tower,
        "mm_vision_tower": vision_tower,
        "mm_hidden_size": ve.feature_dim,
        "mm_vision_select_layer": ve.select_layer,
        "mm_vision_select_feature": ve.select_feature,
        "mm_use_im_start_end": bool(model.fusion.use_im_start_end),
        "mm_use_im_patch_token": False,
        "use_mm_proj": True,
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": True,
        "pretrain_mm_mlp_adapter": None,
        "image_aspect_ratio": "square",
        "image_grid_pinpoints": None,
        "use_cache": False,
        "torch_dtype": torch_dtype,
        "transformers_version": transformers.__version__,
    }
    if isinstance(model.projector, MLPProjector):
        cfg["mm_projector_type"] = "mlp2x_gelu"
    return cfg


# -- writing --------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def ordinary_modes(root: str | os.PathLike) -> None:
    """Give ``root`` and everything under it the modes ``open()`` / ``mkdir`` would (0666 /
    0777 less the umask). safetensors' ``save_file`` and ``tempfile`` create files as
    0600 / 0700: an export shared with others must not depend on which writer made a file."""
    umask = _umask()
    root = Path(root)
    if root.is_file():
        os.chmod(root, 0o666 & ~umask)
        return
    os.chmod(root, 0o777 & ~umask)
    for parent, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(parent, d), 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(parent, f), 0o666 & ~umask)


@dataclass
class PlannedTensor:
    """One tensor of an export, known by its size before it exists: ``make()`` builds it
    (reads the model, folds LoRA in, casts) only when its shard is written, so shards can
    be planned and named ``-of-N`` up front and only one shard is ever materialised."""
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _cast(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """CPU, contiguous, ``dtype``; no copy when ``v`` already is all three."""
    return v.detach().to(device="cpu", dtype=dtype).contiguous()


def plan(key: str, v: torch.Tensor, dtype: torch.dtype | None = None) -> PlannedTensor:
    """A model tensor as written: floating tensors cast to ``dtype`` (``None``: as they are)."""
    out = dtype if dtype is not None and v.is_floating_point() else v.dtype
    return PlannedTensor(key, tuple(v.shape), out, lambda: _cast(v, out))


def plan_shards(tensors: list[PlannedTensor], max_shard_size: int) -> list[list[PlannedTensor]]:
    """transformers' rule: in order, a new shard when the next tensor would push the current
    one past ``max_shard_size`` bytes (a larger tensor gets a shard of its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _materialise(shard: list[PlannedTensor]) -> dict[str, torch.Tensor]:
    """The shard's tensors. A tensor sharing memory with another one of the shard (tied
    embeddings), or a view of a larger buffer (``torch.save`` would write the whole
    buffer), is copied: each tensor is stored once, by itself."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for t in shard:
        v = t.make()
        if tuple(v.shape) != t.shape or v.dtype != t.dtype:  # the plan named the file sizes
            raise CheckpointError(f"tensor changed while exporting: planned {t.shape} {t.dtype}, "
                                  f"got {tuple(v.shape)} {v.dtype}", key=t.key)
        storage = v.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != v.numel() * v.element_size():
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        out[t.key] = v
    return out


def write_shards(tensors: list[PlannedTensor], path: str | os.PathLike, safetensors: bool = True,
                 max_shard_size: int = DEFAULT_MAX_SHARD, prefix: str | None = None) -> list[str]:
    """Write ``tensors`` into directory ``path`` as transformers' ``save_pretrained`` lays
    them out: ``model.safetensors`` (metadata ``format: pt``, which transformers requires)
    or ``pytorch_model.bin``; above ``max_shard_size`` bytes ``*-0000i-of-0000N.*`` shards
    and the ``*.index.json`` that ``from_pretrained`` reads. One shard at a time is built,
    written (to a temporary name, then renamed) and dropped, so the memory needed beyond the
    model is at most one shard. Files get ordinary modes. Returns the file names."""
    from safetensors.torch import save_file

    if max_shard_size <= 0:
        raise CheckpointError(f"max_shard_size must be positive, got {max_shard_size}")
    path = Path(path)
    stem = prefix or ("model" if safetensors else "pytorch_model")
    ext = ".safetensors" if safetensors else ".bin"
    shards = plan_shards(tensors, max_shard_size)
    names = ([stem + ext] if len(shards) == 1 else
             [f"{stem}-{i + 1:05d}-of-{len(shards):05d}{ext}" for i in range(len(shards))])
    for name, planned in zip(names, shards):
        shard = _materialise(planned)
        tmp = path / (name + ".tmp")
        if safetensors:
            save_file(shard, str(tmp), metadata={"format": "pt"})
        else:
            torch.save(shard, str(tmp))
        del shard
        ordinary_modes(tmp)
        os.replace(tmp, path / name)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
                 "weight_map": {t.key: name for name, planned in zip(names, shards) for t in planned}}
        _json(path / f"{stem}{ext}.index.json", index)
        names.append(f"{stem}{ext}.index.json")
    return names


def with_fill(tensors: list[PlannedTensor], fill: Callable[[PlannedTensor], torch.Tensor] | None
              ) -> list[PlannedTensor]:
    """``tensors`` made by ``fill(planned)`` instead of from the model (``None``: unchanged).
    For generators: a model built on the meta device has every key, shape and config but no
    values. Rotary ``inv_freq`` buffers are computed from the config, never filled."""
    if fill is None:
        return tensors
    return [t if t.key.endswith("inv_freq") else replace(t, make=functools.partial(fill, t)) for t in tensors]


def stored_dtype(path: str | os.PathLike) -> torch.dtype | None:
    """The one floating dtype every weight file directly in ``path`` (a checkpoint
    directory, or one file) stores, read as the loader reads them
    (:func:`~lisa_kit.checkpoint.io.header_entries`: headers and memory-mapped pickles, no
    tensor data); ``None`` when they mix dtypes, hold none or cannot be read (the loader
    reports why). Rotary ``inv_freq`` buffers (fp32 in every release) do not count."""
    from lisa_kit.checkpoint.io import header_entries

    path = Path(path)
    files = [path] if path.is_file() else sorted(
        f for f in path.iterdir() if f.is_file() and f.suffix in (".safetensors", ".bin", ".pth", ".pt"))
    found: set[torch.dtype] = set()
    try:
        for f in files:
            found |= {dt for k, _, dt in header_entries(f) if dt.is_floating_point and not k.endswith("inv_freq")}
    except CheckpointError:
        return None
    return found.pop() if len(found) == 1 else None


def _json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_vision_tower(encoder, path: str | os.PathLike, safetensors: bool = True, dtype: torch.dtype | None = None,
                       fill: Callable[[PlannedTensor], torch.Tensor] | None = None) -> Path:
    """A ``CLIPVisionModel`` directory for an ``hf_clip`` encoder: ``config.json``, weights
    in transformers 4's key layout (``vision_model.*``, which 4.x and 5.x both load) and a
    ``CLIPImageProcessor`` ``preprocessor_config.json`` matching :meth:`preprocess`."""
    import transformers

    from lisa_kit.components._util import hf_config_dict

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {(k if k.startswith("vision_model.") else "vision_model." + k): v
             for k, v in encoder.model.state_dict().items()}
    cfg = hf_config_dict(encoder.model.config)
    first = next(iter(state.values()))
    cfg.update({"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model",
                "torch_dtype": _dtype_name(dtype if dtype is not None else first.dtype),
                "transformers_version": transformers.__version__})
    _json(path / "config.json", cfg)
    write_shards(with_fill([plan(k, v, dtype) for k, v in state.items()], fill), path, safetensors)
    _json(path / "preprocessor_config.json", {
        "crop_size": {"height": encoder.crop_size, "width": encoder.crop_size},
        "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
        "do_resize": True, "image_mean": [float(x) for x in encoder.mean], "image_std": [float(x) for x in encoder.std],
        "image_processor_type": "CLIPImageProcessor", "resample": int(encoder.resample),
        "rescale_factor": float(encoder.rescale_factor), "size": {"shortest_edge": encoder.image_size}})
    return path


def _write_tokenizer(tokenizer, path: Path) -> None:
    from lisa_kit.tokenizer import SentencePieceTokenizer

    tokenizer.save(path)
    if not isinstance(tokenizer, SentencePieceTokenizer):
        return
    # As transformers 4.31's LlamaTokenizer.save_pretrained writes them (the released
    # checkpoints): bos/eos/unk are AddedTokens that keep the spaces around them. Written
    # as plain strings, 4.31's slow tokenizer would strip the spaces next to "</s>" in text
    # (its default for string special tokens) and tokenise differently from LISA's.
    def added(content: str, typed: bool) -> dict:
        d = {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
        return {"__type": "AddedToken", **d} if typed else d

    f = path / "tokenizer_config.json"
    cfg = json.loads(f.read_text())
    smap = json.loads((path / "special_tokens_map.json").read_text())
    for name in ("bos_token", "eos_token", "unk_token"):
        content = cfg.get(name) if isinstance(cfg.get(name), str) else None
        if content:
            cfg[name] = added(content, True)
            smap[name] = added(content, False)
    cfg.setdefault("clean_up_tokenization_spaces", False)
    cfg.setdefault("sp_model_kwargs", {})
    _json(f, cfg)
    _json(path / "special_tokens_map.json", smap)


def _tower_reference(model, vision_tower: str | os.PathLike | None, out: Path | None) -> str | None:
    """The ``vision_tower`` string to write, or ``None`` when the tower must be written."""
    if vision_tower is not None:
        return str(vision_tower)
    node = ((model.recipe or {}).get("model") or {}).get("vision_encoder") or {}
    pre = node.get("pretrained") if node.get("name", "hf_clip") == "hf_clip" else None
    if not pre:
        return None
    p = Path(pre)
    if p.is_dir():
        p = p.resolve()
        if out is not None and p.is_relative_to(out.resolve()):
            return None  # inside the directory being replaced: write a copy instead
        return str(p)
    return str(pre)  # a hub name such as openai/clip-vit-large-patch14


def write_lisa_hf(model, path: str | os.PathLike, *, vision_tower: str | os.PathLike | None = None,
                  safetensors: bool = True, dtype: str | torch.dtype | None = None, merge_lora: str = "copy",
                  max_shard_size: int = DEFAULT_MAX_SHARD, rotary_inv_freq: bool = True,
                  final_path: str | os.PathLike | None = None,
                  fill: Callable[[PlannedTensor], torch.Tensor] | None = None) -> list[str]:
    """Write the LISA directory into ``path`` (created; not atomic, see :func:`export_lisa_hf`).
    ``final_path``: where the directory will end up (to keep a tower reference out of a
    directory being replaced); ``fill``: see :func:`with_fill` (``benchmarks/scale.py``
    generates real-size checkpoints from a meta-device model with it). Returns the
    compatibility notes (also warned as :class:`ExportWarning`)."""
    _check_reference(model)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise CheckpointError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    notes = compatibility_notes(model)
    tower = _tower_reference(model, vision_tower, Path(final_path) if final_path else None)
    if merge_lora not in ("copy", "inplace"):  # checked before anything is written
        raise CheckpointError(f"merge_lora must be 'copy' or 'inplace', got {merge_lora!r}")
    if tower is None:
        write_vision_tower(model.vision_encoder, path / TOWER_DIR, safetensors, dtype=dtype, fill=fill)
        tower = TOWER_DIR
        notes.append(f"the CLIP tower was written to {TOWER_DIR}/ and config.json names it relatively: LISA's "
                     f"code resolves it from the working directory, so pass vision_tower=<this dir>/{TOWER_DIR}")
    # copy mode with plain LoRA needs no merged copy of the LLM: layers merge as they are written
    streaming = merge_lora == "copy" and has_lora(model) and _lora_layers(model.llm.model) is not None
    with contextlib.nullcontext(model.llm.model) if streaming else lora_merged(model, merge_lora) as hf_llm:
        tensors = with_fill(lisa_tensors(model, hf_llm, dtype, rotary_inv_freq), fill)
        weights_dtype = next(t.dtype for t in tensors if t.key == "model.embed_tokens.weight")
        base = hf_llm.get_base_model() if streaming else hf_llm
        cfg = lisa_config(model, tower, _dtype_name(weights_dtype), base)
        write_shards(tensors, path, safetensors, max_shard_size)
        del tensors
    _write_tokenizer(model.tokenizer, path)
    _json(path / SAM_CONFIG, dict(model.mask_decoder.cfg))
    gen = {"_from_model_config": True, "bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
           "pad_token_id": cfg["pad_token_id"], "transformers_version": cfg["transformers_version"], "use_cache": False}
    _json(path / "generation_config.json", {k: v for k, v in gen.items() if v is not None})
    _json(path / "config.json", cfg)
    for note in notes:
        warnings.warn(note, ExportWarning, stacklevel=3)
    return notes


def export_lisa_hf(model, out_dir: str | os.PathLike, *, vision_tower: str | os.PathLike | None = None,
                   safetensors: bool = True, overwrite: bool = False, dtype: str | torch.dtype | None = None,
                   merge_lora: str = "copy", max_shard_size: int = DEFAULT_MAX_SHARD,
                   rotary_inv_freq: bool = True) -> Path:
    """Write ``model`` to ``out_dir`` as a released-LISA HF directory, atomically.

    ``vision_tower``: the path or hub name to write in ``config.json`` (default: the recipe's
    ``hf_clip`` ``pretrained``, else the tower is written to ``out_dir/clip_vision_tower``);
    ``safetensors``: ``model.safetensors`` (default) or ``pytorch_model.bin``; ``dtype``:
    cast the weights (``bfloat16``/``float16``/``float32``; default: as they are);
    ``merge_lora``: ``copy`` or ``inplace`` (see the module docstring); ``rotary_inv_freq``:
    also write transformers 4.31's per-layer ``rotary_emb.inv_freq`` buffers, as the released
    checkpoints have them. Load it back with
    ``import_lisa_hf(out_dir, sam=out_dir / "sam_config.json")``."""
    out = Path(out_dir)
    with atomic_dir(out, overwrite) as tmp:
        write_lisa_hf(model, tmp, vision_tower=vision_tower, safetensors=safetensors, dtype=dtype,
                      merge_lora=merge_lora, max_shard_size=max_shard_size, rotary_inv_freq=rotary_inv_freq,
                      final_path=out)
    return out


def write_lisa_kit(model, path: str | os.PathLike, merge_lora: str = "copy") -> Path:
    """lisa_kit's own format (:func:`~lisa_kit.checkpoint.native.save_model`), LoRA merged."""
    from lisa_kit.checkpoint.native import save_model

    with lora_merged(model, merge_lora):
        return save_model(model, path)


def export_lisa_kit(model, out_dir: str | os.PathLike, *, overwrite: bool = False, merge_lora: str = "copy") -> Path:
    """:func:`write_lisa_kit`, atomically (same rules as :func:`export_lisa_hf`)."""
    out = Path(out_dir)
    with atomic_dir(out, overwrite) as tmp:
        write_lisa_kit(model, tmp, merge_lora)
    return out
