"""Native VLMs (Qwen2.5-VL, Qwen3-VL, InternVL, LLaVA-OneVision) as lisa_kit components (``hf_vlm_*``)
against transformers' own models.

On the tiny random directories (``@tiny_vlm:<family>``) the split model - vision model +
merger/projector, the fusion's splice and positions (Qwen's M-RoPE; Qwen3-VL's deepstack
features, which reach the first LM layers through ``FusedBatch.llm_inputs``; InternVL's
tiles; LLaVA-OneVision's anyres crops packed with newline tokens; 1-D positions for both),
the language model - gives the hidden states and logits of the ``...ForConditionalGeneration``
model on the same images and text (a padded batch of two rows with images of different
token counts), and greedy generation (KV-cached, with and without a shared prefix) writes
transformers' ``generate`` tokens.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lisa_kit.testing import tiny_vlm_dir

TOL = {"atol": 1e-5, "rtol": 1e-5}
PROMPT = "<|im_start|>user\n{image}{text}<|im_end|>\n<|im_start|>assistant\n"
# family -> (what the processor expands into an image, position axes (None: 1-D), per-image input key)
FAMILIES = {
    "qwen2_5_vl": ("<|vision_start|><|image_pad|><|vision_end|>", 3, "image_grid_thw"),
    "qwen3_vl": ("<|vision_start|><|image_pad|><|vision_end|>", 3, "image_grid_thw"),
    "internvl": ("<IMG_CONTEXT>", None, "num_patches"),
    "llava_onevision": ("<image>", None, "image_sizes"),
}


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40, 70, 3), dtype=np.uint8), rng.integers(0, 256, (100, 90, 3), dtype=np.uint8)]


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request):
    """(lisa_kit model, transformers model with the same [SEG]-extended vocabulary, processor)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from lisa_kit.builder import load

    family = request.param
    torch.manual_seed(0)
    asset = f"@tiny_vlm:{family}"
    model = load("lisa-tiny-qwen2.5vl",
                 [f"model.{k}.pretrained='{asset}'" for k in ("vision_encoder", "llm", "fusion")])
    model.eval()
    assert model.llm.model.config.model_type == family
    d = tiny_vlm_dir(family)
    hf = AutoModelForImageTextToText.from_pretrained(str(d), local_files_only=True).eval()
    # lisa_kit added [SEG] (a new embedding and lm_head row): give transformers the same rows.
    n = len(model.tokenizer)
    assert n == hf.get_input_embeddings().num_embeddings + 1
    hf.resize_token_embeddings(n, mean_resizing=False)
    with torch.no_grad():
        hf.get_input_embeddings().weight.copy_(model.llm.model.get_input_embeddings().weight)
        hf.get_output_embeddings().weight.copy_(model.llm.model.get_output_embeddings().weight)
    processor = AutoProcessor.from_pretrained(str(d), local_files_only=True)
    model.family = family  # for the tests below
    return model, hf, processor


def _prompts(model, texts):
    return [PROMPT.format(image=FAMILIES[model.family][0], text=t) for t in texts]


def _reset(hf):
    if hasattr(hf.model, "rope_deltas"):  # Qwen caches its position offsets between calls
        hf.model.rope_deltas = None


def _lisa_ids(hf_ids: torch.Tensor, mask: torch.Tensor, image_token_id: int, slot: int) -> list[list[int]]:
    """transformers' expanded ids -> lisa_kit's (each run of image tokens one image slot)."""
    rows = []
    for ids, m in zip(hf_ids.tolist(), mask.tolist()):
        out = []
        for t, keep in zip(ids, m):
            if not keep:
                continue
            if t == image_token_id:
                if out and out[-1] == slot:
                    continue
                t = slot
            out.append(t)
        rows.append(out)
    return rows


def _inputs(model, processor, images, questions):
    enc = processor(images=images, text=_prompts(model, questions), return_tensors="pt", padding=True,
                    padding_side="left")
    ids = _lisa_ids(enc["input_ids"], enc["attention_mask"], model.fusion.config.image_token_id,
                    model.fusion.IMAGE_SLOT)
    return enc, ids


def test_preprocessing_and_token_counts_are_the_processors(pair):
    model, _, processor = pair
    enc = processor(images=_images(), text=_prompts(model, ["a", "b"]), return_tensors="pt", padding=True,
                    padding_side="left")
    enc_ = model.vision_encoder
    batch = enc_.collate([enc_.preprocess(im) for im in _images()])
    torch.testing.assert_close(batch["pixel_values"], enc["pixel_values"], atol=0, rtol=0)
    key = FAMILIES[model.family][2]
    if key in enc:  # (InternVL's processor consumes its tile counts)
        assert torch.equal(batch[key], enc[key])
    feats = model.encode_vision(batch)
    per_row = (enc["input_ids"] == model.fusion.config.image_token_id).sum(1).tolist()
    assert feats.num_tokens == per_row == [enc_.tokens_for(im.shape[:2]) for im in _images()]
    assert len(set(per_row)) == 2  # the two images really give different counts


@pytest.mark.parametrize("side", ["left", "right"])
def test_hidden_states_and_logits_equal_transformers(pair, side):
    model, hf, processor = pair
    images = _images()
    enc, ids = _inputs(model, processor, images, ["Segment the red square please.", "What is it?"])
    T = max(map(len, ids))
    pad = model.tokenizer.pad_id
    x = torch.full((2, T), pad)
    am = torch.zeros(2, T, dtype=torch.bool)
    for b, r in enumerate(ids):
        sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        x[b, sl], am[b, sl] = torch.tensor(r), True
    enc_ = model.vision_encoder
    with torch.no_grad():
        feats = model.encode_vision(enc_.collate([enc_.preprocess(im) for im in images]))
        fused = model.fusion.fuse(x, am, None, feats, [[0], [1]], model.llm.embed, padding_side=side)
        axes = FAMILIES[model.family][1]
        assert fused.position_ids.shape == ((axes,) if axes else ()) + tuple(fused.attention_mask.shape)
        out = model.llm(fused.inputs_embeds, attention_mask=fused.attention_mask.long(),
                        position_ids=fused.position_ids, **fused.llm_inputs)
        _reset(hf)
        hf_in = dict(enc)
        if side == "right":  # the processor padded left: move every row's tokens to the left
            for k in [k for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in enc]:
                hf_in[k] = torch.stack([torch.cat([r[m.bool()], r[~m.bool()]])
                                        for r, m in zip(enc[k], enc["attention_mask"])])
        ref = hf(**hf_in, output_hidden_states=True)
    # The fused rows keep the text's padding columns, so rows are compared on their real positions.
    real, hf_real = fused.attention_mask, hf_in["attention_mask"].bool()
    assert real.sum(1).tolist() == hf_real.sum(1).tolist()
    for b in range(2):
        torch.testing.assert_close(out.hidden[b][real[b]], ref.hidden_states[-1][b][hf_real[b]], **TOL)
        torch.testing.assert_close(out.logits[b][real[b]], ref.logits[b][hf_real[b]], **TOL)


@pytest.mark.parametrize("same_image", [False, True])
def test_greedy_generation_equals_transformers_generate(pair, same_image):
    from lisa_kit.generation import GenerationConfig, generate

    model, hf, processor = pair
    images = _images()[:1] * 2 if same_image else _images()
    questions = ["Segment the red square please.", "Segment the red square."]
    enc, ids = _inputs(model, processor, images, questions)
    enc_ = model.vision_encoder
    used = images[:1] if same_image else images
    vision = enc_.collate([enc_.preprocess(im) for im in used])
    mask_in = [model.mask_decoder.preprocess(im) for im in used]
    n_new = 6
    with torch.no_grad():
        _reset(hf)
        ref = hf.generate(**enc, max_new_tokens=n_new, do_sample=False)[:, enc["input_ids"].shape[1]:]
        for share in (True, False):
            gen = generate(model, ids, [[0], [0]] if same_image else [[0], [1]], vision,
                           torch.stack([m[0] for m in mask_in]), [m[1] for m in mask_in],
                           GenerationConfig(max_new_tokens=n_new, share_prefix=share))
            for b, g in enumerate(gen):
                assert g.token_ids == ref[b, :len(g.token_ids)].tolist(), (share, b)
                assert len(g.token_ids) == n_new or g.finished


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_part_reads_only_its_tensors_and_equals_from_pretrained(family, monkeypatch):
    """The vision and LM components stream their own tensors (the other part's are never
    read; no whole model is loaded) and hold exactly transformers' loaded weights."""
    import transformers
    from transformers import AutoModelForImageTextToText

    from lisa_kit.checkpoint import io
    from lisa_kit.components import hf_vlm

    d = str(tiny_vlm_dir(family))
    read: list[str] = []
    real = io._read_safetensors

    def spy(path, want=None):
        for k, v in real(path, want):
            read.append(k)
            yield k, v

    def whole_model(*a, **k):
        raise AssertionError("the whole model was loaded")

    monkeypatch.setattr(io, "_read_safetensors", spy)
    monkeypatch.setattr(getattr(transformers, hf_vlm.FAMILIES[family].model_class), "from_pretrained", whole_model)
    vision = hf_vlm.build_hf_vlm_vision(pretrained=d)
    by_vision, read[:] = list(read), []
    lm = hf_vlm.build_hf_vlm_lm(pretrained=d)
    assert by_vision and read and not set(by_vision) & set(read)
    assert sorted(by_vision + read) == sorted(io.checkpoint_keys(d))
    monkeypatch.undo()

    ref = AutoModelForImageTextToText.from_pretrained(d, local_files_only=True).state_dict()
    for k, v in vision.vlm.state_dict().items():
        assert torch.equal(v, ref["model." + k]), k
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_layouts_that_need_transformers_loader_fall_back_to_it(monkeypatch):
    from transformers import AutoModelForImageTextToText

    from lisa_kit.components import hf_vlm

    def cannot(*a, **k):
        raise hf_vlm._NoStreaming("tensor-merging conversions")

    monkeypatch.setattr(hf_vlm, "_stream", cannot)
    d = str(tiny_vlm_dir("llava_onevision"))
    vision, lm = hf_vlm.build_hf_vlm_vision(pretrained=d), hf_vlm.build_hf_vlm_lm(pretrained=d)
    ref = AutoModelForImageTextToText.from_pretrained(d, local_files_only=True).state_dict()
    assert set(vision.vlm.state_dict()).isdisjoint(lm.model.state_dict())
    assert {"model." + k for k in vision.vlm.state_dict()} | set(lm.model.state_dict()) == set(ref)
