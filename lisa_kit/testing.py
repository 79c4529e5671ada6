"""Tiny, offline building blocks for tests and plugin authors.

``tiny_tokenizer_dir()`` trains a LLaMA-style SentencePiece model on a few sentences
(no download); ``tiny_hf_tokenizer_dir()`` a byte-level BPE one. Both are built once per
content into :func:`cache_dir` (see there) and reused by every later process, so building
tiny recipes leaves no temporary directories behind; ``tiny_recipe()`` is a complete recipe of tiny
built-in components; ``resolve_tiny()`` fills the ``@tiny_tokenizer`` placeholder used in
``ComponentSpec.tiny``.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

_SENTENCES = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "USER: Can you segment the red circle in this image? ASSISTANT: Sure, it is the mask.",
    "Please segment the blue square in this image. What is the green triangle in this image?",
    "Please output segmentation mask. Please respond with segmentation mask.",
    "It is here. Sure, the segmentation result is shown. What can make the woman stand higher?",
    "the largest shape, the smallest shape, left of, right of, above, below, with the most corners",
    "0 1 2 3 4 5 6 7 8 9 yellow purple black white orange rectangle ellipse star",
]


CACHE_DIR_ENV = "LISA_KIT_CACHE_DIR"
_COMPLETE = ".complete"  # written last: a directory without it is not a finished asset
_SHARED_DIR_MODE = 0o755


def cache_dir() -> Path:
    """Where built assets live: ``$LISA_KIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/lisa_kit``
    (default ``~/.cache/lisa_kit``); a per-user directory under the system temp directory
    when that cannot be created (read-only home)."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    root = Path(xdg) / "lisa_kit"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"lisa_kit-cache-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def _cached_build(kind: str, key: dict, build: Callable[[Path], None]) -> Path:
    """``<cache>/<kind>-<sha of key>``, built by ``build(tmp_dir)`` the first time.

    The build happens in a private directory next to the target, which is then renamed
    into place in one step: concurrent processes either see a complete asset or none,
    and the loser of a race removes its copy and uses the winner's. ``key`` must name
    everything the output depends on (inputs and library versions)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = cache_dir()
    final = root / f"{kind}-{digest}"
    if (final / _COMPLETE).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-{digest}.tmp-", dir=root))
    try:
        os.chmod(tmp, _SHARED_DIR_MODE)  # mkdtemp makes it private; a cache is readable like ~/.cache
        build(tmp)
        (tmp / _COMPLETE).write_text(json.dumps(key, sort_keys=True))
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first (or left an unfinished one behind)
            if not (final / _COMPLETE).is_file():
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "?"


@functools.lru_cache(maxsize=None)
def tiny_tokenizer_dir(vocab_size: int = 384) -> Path:
    """A directory with ``tokenizer.model`` (+ config files) of a tiny LLaMA-style BPE
    tokenizer (byte fallback, unk/bos/eos = 0/1/2); built once into :func:`cache_dir`."""
    key = {"sentences": _SENTENCES, "vocab_size": vocab_size, "sentencepiece": _version("sentencepiece"),
           "layout": 1}
    return _cached_build("tiny_tok", key, functools.partial(_train_sentencepiece, vocab_size=vocab_size))


def _train_sentencepiece(out: Path, vocab_size: int, lines: list[str] | None = None) -> None:
    """A LLaMA-style BPE model of ``vocab_size`` pieces on ``lines`` (default the tiny
    sentences) into ``out``."""
    import sentencepiece as spm

    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(lines if lines is not None else _SENTENCES * 4))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        hard_vocab_limit=False, minloglevel=2, num_threads=1)
    corpus.unlink()
    (out / "tokenizer.vocab").unlink(missing_ok=True)
    (out / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "LlamaTokenizer", "legacy": true, "add_bos_token": true, "model_max_length": 512}')


def resolve_tiny(node: dict) -> dict:
    """Replace ``@tiny_tokenizer`` placeholders in a component's tiny kwargs."""
    return {k: (str(tiny_tokenizer_dir()) if v == "@tiny_tokenizer" else v) for k, v in node.items()}


def tiny_recipe(**model_overrides) -> dict:
    """A recipe dict of the tiny built-in components (CPU, random weights, ~1 s to build)."""
    from lisa_kit.registry import get_registry

    reg = get_registry()
    model = {}
    for kind, name in (("vision_encoder", "hf_clip"), ("projector", "linear"), ("llm", "hf_causal_lm"),
                       ("mask_decoder", "sam"), ("fusion", "llava_splice"), ("seg_head", "mlp2")):
        spec = reg.get(kind, name)
        node = {"name": name, **resolve_tiny(spec.tiny)}
        for d in spec.derived:
            node.pop(d, None)
        model[kind] = node
    model.update({"seg_token": "[SEG]", "seg_hidden": "previous"})
    model.update(model_overrides)
    return {"name": "tiny", "model": model}


def synthetic_image(h: int = 48, w: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image with one filled rectangle and its 0/1 mask."""
    rng = np.random.default_rng(seed)
    img = (rng.random((h, w, 3)) * 60).astype(np.uint8)
    y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    mask = np.zeros((h, w), np.uint8)
    mask[y0:y0 + h // 3, x0:x0 + w // 3] = 1
    img[mask.astype(bool)] = (220, 40, 40)
    return img, mask


def fixture_dir() -> Path | None:
    """The LISA reference fixture (``$LISA_KIT_REFERENCE_FIXTURE``, default ``seed0`` under
    ``../shared/fixtures/lisa_reference`` next to the repository), or ``None`` if absent."""
    env = os.environ.get("LISA_KIT_REFERENCE_FIXTURE")
    root = Path(__file__).resolve().parent.parent
    p = Path(env) if env else root.parent / "shared" / "fixtures" / "lisa_reference" / "seed0"
    return p if (p / "manifest.json").exists() else None


def eval_fixture_dir() -> Path | None:
    """The evaluation/reader fixture (``eval_seed0`` next to the reference fixture, or
    ``$LISA_KIT_EVAL_FIXTURE``), or ``None`` if absent."""
    env = os.environ.get("LISA_KIT_EVAL_FIXTURE")
    root = Path(__file__).resolve().parent.parent
    p = Path(env) if env else root.parent / "shared" / "fixtures" / "lisa_reference" / "eval_seed0"
    return p if (p / "eval_reference.json").exists() else None


# Chat templates of the tiny tokenizers. Written by us for lisa_kit's tests, after each
# family's published turn layout and special tokens; they are not the families' own files.
CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
MISTRAL_TEMPLATE = ("{{ bos_token }}{% set ns = namespace(system='') %}{% for m in messages %}"
                    "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\n\n' %}"
                    "{% elif m['role'] == 'user' %}[INST] {{ ns.system }}{{ m['content'] }}[/INST]"
                    "{% set ns.system = '' %}"
                    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
PHI3_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

# family -> special tokens (in id order, first ids of the vocabulary), the roles of some of
# them and the chat template. `None` = the family has no such token.
CHAT_FAMILIES: dict[str, dict] = {
    "chatml": {"specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "bos": None, "eos": "<|im_end|>",
               "pad": "<|endoftext|>", "unk": None, "template": CHATML_TEMPLATE},  # Qwen2
    "llama3": {"specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|eot_id|>"],
               "bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": None, "unk": None, "template": LLAMA3_TEMPLATE},
    "mistral": {"specials": ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "bos": "<s>", "eos": "</s>", "pad": None,
                "unk": "<unk>", "template": MISTRAL_TEMPLATE},  # v0.3: [INST], [/INST] are specials
    "phi3": {"specials": ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>",
                          "<|end|>"],
             "bos": "<s>", "eos": "<|end|>", "pad": "<|endoftext|>", "unk": "<unk>", "template": PHI3_TEMPLATE},
}


@functools.lru_cache(maxsize=None)
def tiny_hf_tokenizer_dir(vocab_size: int = 400, family: str = "chatml") -> Path:
    """A directory with a tiny byte-level BPE ``tokenizer.json`` (trained offline with
    ``tokenizers``, saved with ``save_pretrained``) carrying one family's special tokens
    and a chat template in its style (see :data:`CHAT_FAMILIES`): ``chatml`` (Qwen2,
    the default; ``@tiny_hf_tokenizer`` in recipes), ``llama3`` (header ids, ``<|eot_id|>``),
    ``mistral`` (``[INST] … [/INST]``, ``</s>``) or ``phi3`` (``<|user|>``, ``<|end|>``)
    — ``@tiny_hf_tokenizer:<family>``. Only the specials and the template differ: every
    family gets the same byte-level BPE (the real Mistral/Phi-3 ones are SentencePiece),
    and a BOS appears only where the template writes it (Llama-3, Mistral). Built once
    into :func:`cache_dir`."""
    if family not in CHAT_FAMILIES:
        raise ValueError(f"unknown tiny tokenizer family {family!r}; available: {', '.join(CHAT_FAMILIES)}")
    key = {"sentences": _SENTENCES, "vocab_size": vocab_size, "family": CHAT_FAMILIES[family],
           "tokenizers": _version("tokenizers"), "transformers": _version("transformers"), "layout": 1}
    return _cached_build(f"tiny_hf_tok_{family}", key,
                         functools.partial(_train_byte_bpe, vocab_size=vocab_size, family=family))


def _train_byte_bpe(out: Path, vocab_size: int, family: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    fam = CHAT_FAMILIES[family]
    roles = {"bos_token": fam["bos"], "eos_token": fam["eos"], "pad_token": fam["pad"], "unk_token": fam["unk"]}
    named = {v for v in roles.values() if v}
    tok = Tokenizer(models.BPE(unk_token=fam["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=fam["specials"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_SENTENCES * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **{k: v for k, v in roles.items() if v},
                                   additional_special_tokens=[t for t in fam["specials"] if t not in named],
                                   chat_template=fam["template"], model_max_length=1024)
    fast.save_pretrained(str(out))


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a 0/1 ``(H, W)`` mask, computed without pycocotools
    (run lengths of the column-major pixels, starting with a run of 0s), for tests that
    write annotation files."""
    flat = np.asarray(mask).flatten(order="F")
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(np.asarray(mask).shape), "counts": [int(c) for c in counts]}


def force_generation(monkeypatch, plan) -> None:
    """Make :func:`lisa_kit.generation.generate` pick token ``plan[step]`` at the given
    steps (every row; steps count from 0 in each call) and the argmax elsewhere, so a
    random tiny model answers with ``[SEG]`` when a test needs it. ``plan``: a dict, or a
    function of the model returning one (token ids come from the model's tokenizer)."""
    import torch

    import lisa_kit.generation as g

    state = {"step": 0, "plan": {}}
    real_generate = g.generate

    def pick(logits, cfg, gen):
        k = state["step"]
        state["step"] += 1
        out = logits.argmax(-1)
        return torch.full_like(out, state["plan"][k]) if k in state["plan"] else out

    def generate(model, *a, **kw):
        state["step"] = 0
        state["plan"] = plan(model) if callable(plan) else plan
        return real_generate(model, *a, **kw)

    monkeypatch.setattr(g, "_pick", pick)
    monkeypatch.setattr(g, "generate", generate)


def generation_inputs(model, questions_per_image: list[int], questions=("Segment the red square",),
                      text_row: bool = False):
    """Inputs of :func:`lisa_kit.generation.generate` for several questions per image, as
    ``(prompt_ids, row_images, vision_pixels, mask_pixels (I,3,S,S), metas)`` (``vision_pixels``:
    the tower's collated input, ``(I,3,h,w)`` for fixed-size towers).

    Image ``i`` (a synthetic scene of its own odd size) gets ``questions_per_image[i]``
    rows; row ``q`` asks ``questions[q % len(questions)]`` with ``q`` times " please"
    added, so rows differ in length. The conversation template is the model's recipe's
    (default ``llava_v1``). ``text_row``: one more row without an image."""
    import torch

    from lisa_kit.conversation import IMAGE, Conversation, encode, get_template

    tok = model.tokenizer
    tpl = get_template(((model.recipe or {}).get("conversation") or {}).get("template") or "llava_v1", tok)
    slot_ids = model.fusion.wrap_image(tok)
    prompts, rows, vis, sam, metas = [], [], [], [], []
    for i, n in enumerate(questions_per_image):
        img, _ = synthetic_image(40 + 7 * i, 56 - 5 * i, i)
        vis.append(model.vision_encoder.preprocess(img))
        px, meta = model.mask_decoder.preprocess(img)
        sam.append(px)
        metas.append(meta)
        for q in range(n):
            text = "\n" + questions[q % len(questions)] + " please" * q + "."
            prompts.append(encode(Conversation(tpl).add([IMAGE, text], None), tok, slot_ids)[0])
            rows.append([i])
    if text_row:
        prompts.append(encode(Conversation(tpl).add(["What is a square?"], None), tok, slot_ids)[0])
        rows.append([])
    return prompts, rows, model.vision_encoder.collate(vis), torch.stack(sam), metas


# Tiny VLM directories: family -> the special tokens its processor and config name (their
# ids are the tokenizer's, filled in when the directory is built), its config and its image
# processor (the components' own tiny ones: lisa_kit.components.hf_vlm).
def _tiny_vlms() -> dict[str, dict]:
    from lisa_kit.components import hf_vlm

    return {
        "qwen2_5_vl": {
            "tokens": {"vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
                       "image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>"},
            "config": hf_vlm.TINY_QWEN2_5_VL, "image_processor": hf_vlm.TINY_QWEN2_5_VL_PROCESSOR},
        "qwen3_vl": {
            "tokens": {"vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
                       "image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>"},
            "config": hf_vlm.TINY_QWEN3_VL, "image_processor": hf_vlm.TINY_QWEN3_VL_PROCESSOR},
        # InternVL's processor reads these tokens from tokenizer attributes (extra_special_tokens).
        "internvl": {
            "tokens": {"image_token_id": "<IMG_CONTEXT>"},
            "named": {"start_image_token": "<img>", "end_image_token": "</img>",
                      "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
            "config": hf_vlm.TINY_INTERNVL, "image_processor": hf_vlm.TINY_INTERNVL_PROCESSOR},
        "llava_onevision": {
            "tokens": {"image_token_index": "<image>", "video_token_index": "<video>"},
            "config": hf_vlm.TINY_LLAVA_ONEVISION, "image_processor": hf_vlm.TINY_LLAVA_ONEVISION_PROCESSOR},
    }


TINY_VLMS = ("qwen2_5_vl", "qwen3_vl", "internvl", "llava_onevision")


@functools.lru_cache(maxsize=None)
def tiny_vlm_dir(family: str = "qwen2_5_vl") -> Path:
    """A local transformers VLM directory of ``family`` (:data:`TINY_VLMS`) with random
    weights (seed 0), the chatml tiny tokenizer plus the family's image tokens, and its
    processor (``@tiny_vlm:<family>`` in recipes). Built once into :func:`cache_dir`."""
    if family not in TINY_VLMS:
        raise ValueError(f"unknown tiny VLM family {family!r}; available: {', '.join(TINY_VLMS)}")
    key = {"family": _tiny_vlms()[family], "tokenizer": str(tiny_hf_tokenizer_dir().name),
           "torch": _version("torch"), "transformers": _version("transformers"), "layout": 1}
    return _cached_build(f"tiny_vlm_{family}", key, functools.partial(_build_tiny_vlm, family=family))


def _build_tiny_vlm(out: Path, family: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

    spec = _tiny_vlms()[family]
    named = spec.get("named", {})
    tok = AutoTokenizer.from_pretrained(str(tiny_hf_tokenizer_dir()), local_files_only=True)
    tok.add_tokens(list(dict.fromkeys([*spec["tokens"].values(), *named.values()])), special_tokens=True)
    if named:  # re-read so the named tokens become attributes (tok.start_image_token ...)
        tok.save_pretrained(str(out / "tokenizer.tmp"))
        tok = AutoTokenizer.from_pretrained(str(out / "tokenizer.tmp"), local_files_only=True,
                                            extra_special_tokens=named)
        shutil.rmtree(out / "tokenizer.tmp")
    tok.padding_side = "left"
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in spec["tokens"].items()}
    roles = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    cfg = {k: v for k, v in spec["config"].items() if k != "model_type"}
    cfg["text_config"] = {**cfg["text_config"], "vocab_size": len(tok), **roles}
    config = AutoConfig.for_model(family, **cfg, **ids, **roles)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(config)
    model.save_pretrained(str(out))
    ip = dict(spec["image_processor"])
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        ip.pop("image_processor_type")
        # The processor refuses video_processor=None: the default one is built (no video is used).
        processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**ip), tokenizer=tok,
                                        video_processor=Qwen2VLVideoProcessor(), chat_template=tok.chat_template)
    elif family == "internvl":
        from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

        ip.pop("image_processor_type")
        processor = InternVLProcessor(image_processor=GotOcr2ImageProcessor(**ip), tokenizer=tok,
                                      video_processor=InternVLVideoProcessor(),
                                      image_seq_length=spec["config"]["image_seq_length"],
                                      chat_template=tok.chat_template)
    elif family == "llava_onevision":
        from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

        ip.pop("image_processor_type")
        vc = spec["config"]["vision_config"]
        processor = LlavaOnevisionProcessor(
            image_processor=LlavaOnevisionImageProcessor(**ip), tokenizer=tok,
            video_processor=LlavaOnevisionVideoProcessor(),
            num_image_tokens=(vc["image_size"] // vc["patch_size"]) ** 2,
            vision_feature_select_strategy=spec["config"]["vision_feature_select_strategy"],
            vision_aspect_ratio=spec["config"]["vision_aspect_ratio"], chat_template=tok.chat_template)
    elif family == "qwen3_vl":
        from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

        ip.pop("image_processor_type")
        processor = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**ip), tokenizer=tok,
                                     video_processor=Qwen3VLVideoProcessor(), chat_template=tok.chat_template)
    processor.save_pretrained(str(out))
