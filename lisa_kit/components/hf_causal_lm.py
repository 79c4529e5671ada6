"""Any transformers causal LM (LLaMA/Vicuna, Llama-2/3, Mistral, Qwen2…) as a component.

The model is reached through its decoder and output head separately, so the final
(normalised) hidden states the seg head needs and the logits come from one pass:
``forward(inputs_embeds (B, L, D), attention_mask (B, L_total)) -> LMOutput``.
The KV cache is the transformers ``Cache`` object, passed back in for the next step.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch

import lisa_kit
from lisa_kit.components._util import hf_config_dict, read_json, resolve_dtype
from lisa_kit.interfaces import ComponentSpec, LanguageModel, LMOutput
from lisa_kit.tokenizer import Tokenizer, load_tokenizer


class HFCausalLM(LanguageModel):
    def __init__(self, model, tokenizer: Tokenizer):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.hidden_size = model.config.get_text_config().hidden_size  # a VLM's config nests it
        params = inspect.signature(model.get_decoder().forward).parameters
        # transformers >= 5.24 calls the cache argument `cache`; earlier 5.x `past_key_values`.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    @property
    def _decoder(self):
        # Looked up on each use, not stored: a stored submodule would list the decoder's
        # weights twice in state_dict, and LoRA wrapping replaces what get_decoder() returns.
        return self.model.get_decoder()

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().num_embeddings

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, use_cache: bool = False,
                logits: bool | str = True, output_layers: bool = False, **decoder_kwargs) -> LMOutput:
        """``logits``: ``True`` (every position), ``"last"`` (only the last: ``(B, 1, V)``) or ``False``;
        ``decoder_kwargs`` go to the transformers decoder as they are (subclasses map a
        fusion's ``llm_inputs`` to them)."""
        kwargs = {self._cache_kw: cache} if cache is not None else {}
        kwargs.update(decoder_kwargs)
        out = self._decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=use_cache, output_hidden_states=output_layers, **kwargs)
        hidden = out.last_hidden_state
        # Read `cache` first: touching `past_key_values` on >= 5.24 outputs warns.
        new_cache = None
        if use_cache:
            new_cache = out.get("cache") if "cache" in out else out.get("past_key_values")
        head = self.model.get_output_embeddings()
        out_logits = head(hidden[:, -1:]) if logits == "last" else (head(hidden) if logits else None)
        return LMOutput(hidden=hidden, logits=out_logits,
                        cache=new_cache,
                        layer_hidden=out.hidden_states if output_layers else None)

    def resize_vocab(self, n: int) -> None:
        if n != self.vocab_size:
            self.model.resize_token_embeddings(n, mean_resizing=False)

    def export_config(self) -> dict:
        return {"config": hf_config_dict(self.model.config)}


def build_hf_causal_lm(pretrained: str | None = None, config: dict | None = None, tokenizer: str | None = None,
                       tokenizer_kind: str = "auto", attn_implementation: str = "sdpa",
                       dtype: str = "float32") -> HFCausalLM:
    """``pretrained``: a local transformers model directory; ``config``: a config dict
    with ``model_type`` (random weights, e.g. for tiny tests or before a checkpoint
    import loads them); ``tokenizer``: tokenizer directory (default: ``pretrained``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lisa_kit.checkpoint.safe import hf_load

    torch_dtype = resolve_dtype(dtype)
    if pretrained is not None:
        model = hf_load(AutoModelForCausalLM.from_pretrained, pretrained, component="llm:hf_causal_lm",
                        dtype=torch_dtype, attn_implementation=attn_implementation)
    elif config is not None:
        cfg = dict(config)
        model_type = cfg.pop("model_type", None)
        if model_type is None:
            raise ValueError("hf_causal_lm `config` needs a `model_type` (e.g. llama, qwen2, mistral)")
        hf_cfg = AutoConfig.for_model(model_type, **cfg)
        hf_cfg._attn_implementation = attn_implementation
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch_dtype)
    else:
        raise ValueError("hf_causal_lm needs `pretrained` (a model directory) or `config`")
    tok_dir = tokenizer or pretrained
    if tok_dir is None:
        raise ValueError("hf_causal_lm needs `tokenizer` (a tokenizer directory) when built from `config`")
    tok = load_tokenizer(Path(tok_dir), tokenizer_kind)
    model.config.use_cache = True
    return HFCausalLM(model, tok)


def sizes_hf_causal_lm(pretrained: str | None = None, config: dict | None = None, **_) -> dict:
    """``hidden_size`` from ``config`` or ``pretrained``'s ``config.json``, without
    building; ``{}`` when the directory is not there (the build reports it)."""
    if pretrained is not None:
        file = Path(pretrained) / "config.json"
        if not file.is_file():
            return {}
        cfg = read_json(file)
    elif config is not None:
        cfg = dict(config)
    else:
        return {}
    if "hidden_size" in cfg:
        return {"hidden_size": int(cfg["hidden_size"])}
    # Another field name (GPT-2's n_embd) or the library's default: ask transformers' config.
    from transformers import AutoConfig

    from lisa_kit.checkpoint.safe import hf_load

    if pretrained is not None:
        hf_cfg = hf_load(AutoConfig.from_pretrained, pretrained, component="llm:hf_causal_lm")
    elif "model_type" in cfg:
        hf_cfg = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    else:
        return {}  # the build reports the missing model_type
    size = getattr(hf_cfg, "hidden_size", None)
    return {} if size is None else {"hidden_size": int(size)}


TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
              "vocab_size": 384, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


@lisa_kit.hookimpl
def lisa_kit_components():
    return [ComponentSpec("llm", "hf_causal_lm", build_hf_causal_lm,
                          tiny={"config": TINY_LLAMA, "tokenizer": "@tiny_tokenizer"},
                          description="transformers AutoModelForCausalLM (LLaMA, Vicuna, Llama-2/3, Mistral, Qwen2)",
                          sizes=sizes_hf_causal_lm)]
