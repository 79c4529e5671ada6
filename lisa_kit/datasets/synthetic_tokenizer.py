"""A tokenizer for the synthetic shapes set, trained on the text a model of it reads.

The tiny test tokenizer (:func:`lisa_kit.testing.tiny_tokenizer_dir`) learned its 384
pieces from eight sentences, so it spells most words of the shapes set letter by letter:
"the purple hexagon" is 9 tokens, a listing of four shapes 65. A model then decides a
colour over several tokens ("▁b", "l", "a"/"u" for black/blue) and reads three times
the sequence it needs to. LLaMA's tokenizer was trained on its own corpus; this one is
trained the same way on the synthetic set's: the conversations the training data builds
(:func:`corpus`: LISA's question and answer templates, every phrasing, explanations,
descriptions, rejections), so every colour, kind and common word is one piece and the
same listing is 21 tokens.

The result is a built-in asset like the tiny tokenizer: a recipe names it as
``tokenizer: "@synthetic_tokenizer"`` and it is built once per content into
:func:`lisa_kit.testing.cache_dir` (deterministic: same text, same sentencepiece
version, same pieces). A trained model keeps its own copy (``lisa-kit export`` writes the
tokenizer next to the weights), so later changes to the text do not touch shipped models.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

#: The data settings whose conversations make the corpus: the shapes set as the demo
#: recipes use it (any phrasing, names before ``[SEG]``, descriptions, absent targets),
#: and with LISA's own phrasing and explanations first.
CORPUS_DATA = (
    {"phrasing": "any", "explanatory": -1, "explain_first": "after_name",
     "sources": {"synthetic": {"datasets": ["synthetic"], "split": "train", "rate": 1,
                               "options": {"absent_ratio": 0.15, "pixel_counts": False}},
                 "describe": {"datasets": ["synthetic_describe"], "split": "train", "rate": 0.5}}},
    {"phrasing": "lisa", "explanatory": 0.3, "explain_first": True,
     "sources": {"synthetic": {"datasets": ["synthetic"], "split": "train", "rate": 1}}},
)
#: Samples drawn per setting: enough that every template and word appears many times.
CORPUS_SAMPLES = 2000
DEFAULT_VOCAB_SIZE = 512
REJECT_TOKEN = "[REJ]"  # the demo recipes' reject token; added to the tokenizer by the LLM, not a piece here


def corpus(samples: int = CORPUS_SAMPLES) -> list[str]:
    """The distinct text parts (system prompt, questions, answers) of ``samples``
    training conversations per :data:`CORPUS_DATA` setting, sorted."""
    from lisa_kit.conversation import get_template
    from lisa_kit.datasets.hybrid import hybrid_from_config

    lines: set[str] = set()
    for k, cfg in enumerate(CORPUS_DATA):
        ds = hybrid_from_config({**cfg, "samples_per_epoch": samples}, get_template("llava_v1"), seed=k,
                                reject_token=REJECT_TOKEN)
        for i in range(samples):
            for conv in ds[i].conversations:
                lines.update(p.strip() for p, _ in conv.pieces() if isinstance(p, str) and p.strip())
    return sorted(lines)


@functools.lru_cache(maxsize=None)
def synthetic_tokenizer_dir(vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """A directory with ``tokenizer.model`` (+ config) trained on :func:`corpus`; built once
    per content (the corpus's hash is part of the cache key)."""
    from lisa_kit import testing

    lines = corpus()
    key = {"corpus": hashlib.sha256("\n".join(lines).encode()).hexdigest(), "vocab_size": vocab_size,
           "sentencepiece": testing._version("sentencepiece"), "layout": 1}
    return testing._cached_build("synthetic_tok", key,
                                 functools.partial(testing._train_sentencepiece, vocab_size=vocab_size, lines=lines))
