"""Fixtures of the expert tests: settings for the tiny random Llama, and its base-model description
(adapted matrices and fingerprint) for tests that use the store without a server."""
from __future__ import annotations

from typing import Callable

import pytest
import torch
from transformers import AutoModelForCausalLM

from experts.base_model import BaseModelInfo
from server.config import Settings


@pytest.fixture(scope="session")
def expert_settings(tiny_llama_dir, tmp_path_factory) -> Callable[..., Settings]:
    """Settings serving the tiny model (one SVD cache for all servers); keywords override fields."""
    cache = tmp_path_factory.mktemp("expert-cache")

    def make(**overrides) -> Settings:
        fields = dict(model=str(tiny_llama_dir), served_model_name="tiny", cache_dir=cache, api_key=None,
                      admin_api_key=None, max_model_len=1024, max_num_seqs=4, threads=None)
        return Settings(**{**fields, **overrides})

    return make


@pytest.fixture(scope="session")
def tiny_model(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def base_mlp(tiny_model) -> BaseModelInfo:
    """What a server with the default targets (MLP) validates against."""
    return BaseModelInfo.from_model(tiny_model, "tiny", target_spec="mlp")


@pytest.fixture(scope="session")
def base_all(tiny_model) -> BaseModelInfo:
    """A server adapting attention and MLP (SAPT's q/v LoRA blocks need attention adapted)."""
    return BaseModelInfo.from_model(tiny_model, "tiny", target_spec="all")
