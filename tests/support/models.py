"""Tiny random models for fast tests: a Llama with SmolLM2's tokenizer and chat template."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM


def make_tiny_llama(path: Path, tokenizer_src: Path, seed: int = 0, **overrides) -> Path:
    """A 2-layer Llama (hidden 64, wide init: varied, non-repeating tokens) saved with its tokenizer."""
    tok = AutoTokenizer.from_pretrained(tokenizer_src)
    cfg = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True, initializer_range=0.2,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
