"""``@synthetic_tokenizer``: a SentencePiece model trained on the synthetic set's own
conversations, so its words are single pieces (the tiny test tokenizer spells them)."""
from __future__ import annotations

import pytest
import torch

from lisa_kit.datasets.synthetic import CORNERS, PALETTE
from lisa_kit.datasets.synthetic_describe import describe
from lisa_kit.datasets.synthetic_tokenizer import corpus, synthetic_tokenizer_dir
from lisa_kit.testing import tiny_tokenizer_dir
from lisa_kit.tokenizer import SentencePieceTokenizer


@pytest.fixture(scope="module")
def tok():
    return SentencePieceTokenizer.from_dir(synthetic_tokenizer_dir())


def test_every_colour_and_kind_is_one_piece(tok):
    tiny = SentencePieceTokenizer.from_dir(tiny_tokenizer_dir())
    words = [*PALETTE, *CORNERS]
    assert all(len(tok.encode_text(" " + w)) == 1 for w in words), \
        {w: tok.convert_ids_to_tokens(tok.encode_text(" " + w)) for w in words}
    # the tiny tokenizer spells some of them: what this asset is for
    assert any(len(tiny.encode_text(" " + w)) > 1 for w in words)


def test_listing_is_much_shorter_than_with_the_tiny_tokenizer(tok):
    tiny = SentencePieceTokenizer.from_dir(tiny_tokenizer_dir())
    shapes = [{"color": c, "kind": k, "center": (i, i), "area": 10 - i}
              for i, (c, k) in enumerate(zip(PALETTE, CORNERS))]
    text = describe(shapes, "left_to_right")
    assert 2 * len(tok.encode_text(text)) <= len(tiny.encode_text(text))


@pytest.mark.parametrize("text", ["Segment the purple hexagon.", "Ünïcode ✓ and digits 12345, tabs\tand  spaces",
                                  "", "[SEG] is not a piece here"])
def test_any_text_round_trips(tok, text):
    assert tok.decode(tok.encode_text(text)) == text


def test_corpus_covers_every_phrasing_and_is_stable():
    lines = corpus(samples=200)
    assert lines == sorted(set(lines)) and lines == corpus(samples=200)
    joined = "\n".join(lines)
    for part in ("Please output segmentation mask.", "From left to right", "There is no", "ASSISTANT:"):
            assert part in joined


def _pieces(path):
    sp = SentencePieceTokenizer.from_dir(path).sp
    return [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]


def test_same_text_same_tokenizer(tmp_path, monkeypatch):
    first = _pieces(synthetic_tokenizer_dir())  # the file itself also records where it was trained
    monkeypatch.setenv("LISA_KIT_CACHE_DIR", str(tmp_path))
    synthetic_tokenizer_dir.cache_clear()
    try:
        rebuilt = synthetic_tokenizer_dir()
        assert rebuilt.parent == tmp_path
        assert _pieces(rebuilt) == first
    finally:
        synthetic_tokenizer_dir.cache_clear()


def test_recipe_asset_builds_a_model_sized_to_it(tok):
    from lisa_kit.builder import load

    torch.manual_seed(0)
    model = load("lisa-demo-v5", overrides=["model.vision_encoder.pretrained=null"])
    assert len(model.tokenizer) == model.llm.vocab_size
    assert model.tokenizer.encode_text(" pentagon") == tok.encode_text(" pentagon")
