"""Fixtures of the vLLM engine tests that run without vLLM: the tiny Llama in float64 with adaptive
layers on every linear, and the native engine as the reference."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapters import install


@pytest.fixture(scope="module")
def tiny64(tiny_llama_dir):
    """(model, runtime): the tiny Llama in float64, every attention and MLP matrix adapted."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64).eval()
    return model, install(model, "all", None, progress=False)
