"""Shared fixtures: the embedded SmolLM2 folder (converted once into the user cache) and a tiny
random Llama that uses SmolLM2's tokenizer and chat template, for fast engine and HTTP tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

CACHE_DIR = Path(os.environ.get("T2_CACHE_DIR", Path.home() / ".cache" / "t2serve"))


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return CACHE_DIR


@pytest.fixture(scope="session")
def smollm2_dir(cache_dir) -> Path:
    """Hugging Face folder of the embedded SmolLM2-135M-Instruct (converted from GGUF on first use)."""
    from server.model_loader import embedded_gguf_path, gguf_to_hf_folder

    return gguf_to_hf_folder(embedded_gguf_path(), cache_dir)


def make_tiny_llama(path: Path, tokenizer_src: Path, seed: int = 0, **overrides) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_src)
    cfg = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True, initializer_range=0.2,  # wide init: varied, non-repeating tokens
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A 2-layer random Llama (hidden 64) with SmolLM2's tokenizer and chat template."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_dir)
