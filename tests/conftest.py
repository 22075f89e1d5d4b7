"""Shared fixtures and the test run's rules.

- Every cache and store of a test run lives under one temporary folder (``T2_TEST_CACHE_DIR``, default
  ``<tmp>/t2serve-tests-<uid>``), reused by later runs on this machine: the embedded SmolLM2 converted
  once, SVD factors computed once. The session's ``HOME`` and ``T2_CACHE_DIR`` point there too, so neither a
  test nor a server it starts writes into the user's home.
- Markers: ``integration`` (the embedded SmolLM2) runs by default; ``slow``, ``reliability`` and ``gpu``
  are opt-in (``make test-opt-in``; ``pytest -m ""`` runs everything). Tests under ``tests/gpu`` and
  ``tests/reliability`` get their marker from their folder.
- The tiny random Llama (SmolLM2's tokenizer and chat template) serves the fast engine and HTTP tests.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import pytest
import torch
from transformers import AutoModelForCausalLM

from experts.store.base_model import BaseModelInfo
from server.config import Settings
from tests.support.live import MAX_MODEL_LEN, MODEL
from tests.support.models import make_tiny_llama

TEST_CACHE = Path(os.environ.get("T2_TEST_CACHE_DIR") or Path(tempfile.gettempdir()) / f"t2serve-tests-{os.getuid()}")
_FOLDER_MARKERS = {"gpu": "gpu", "reliability": "reliability"}


def pytest_configure(config: pytest.Config) -> None:
    TEST_CACHE.mkdir(parents=True, exist_ok=True)
    home = TEST_CACHE / "home"
    home.mkdir(exist_ok=True)
    os.environ["T2_CACHE_DIR"] = str(TEST_CACHE)  # servers and CLIs started by tests, and every default
    os.environ["HOME"] = str(home)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tests_root = Path(__file__).parent
    for item in items:
        parts = Path(item.fspath).relative_to(tests_root).parts
        if parts and parts[0] in _FOLDER_MARKERS:
            item.add_marker(_FOLDER_MARKERS[parts[0]])


@pytest.fixture()
def isolation() -> None:
    """For tests that run generated code: skipped where the sandbox's OS isolation cannot be set up here
    (it then refuses to run code, which its own tests check), failed instead when ``T2_REQUIRE_SANDBOX``
    is set (CI installs bubblewrap)."""
    from experts.tasks.sandbox import isolation_problem

    problem = isolation_problem()
    if problem is not None:
        if os.environ.get("T2_REQUIRE_SANDBOX"):
            pytest.fail(f"the code sandbox cannot run here: {problem}")
        pytest.skip(f"the code sandbox cannot run here: {problem}")


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The test run's cache folder (converted models, SVD factors), shared by all tests and later runs."""
    return TEST_CACHE


@pytest.fixture(scope="session")
def smollm2_dir(cache_dir) -> Path:
    """Hugging Face folder of the embedded SmolLM2-135M-Instruct (converted from GGUF on first use)."""
    from engine.loader import embedded_gguf_path, gguf_to_hf_folder

    return gguf_to_hf_folder(embedded_gguf_path(), cache_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A 2-layer random Llama (hidden 64) with SmolLM2's tokenizer and chat template."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_dir)


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


def _settings_factory(cache: Path, **fixed) -> Callable[..., Settings]:
    def make(**overrides) -> Settings:
        return Settings(**{**fixed, "cache_dir": cache, **overrides})

    return make


@pytest.fixture(scope="session")
def tiny_settings(tiny_llama_dir, tmp_path_factory) -> Callable[..., Settings]:
    """Settings serving the tiny model (one SVD cache for all servers); keywords override fields (the
    environment never does)."""
    return _settings_factory(tmp_path_factory.mktemp("t2-cache"), model=str(tiny_llama_dir), served_model_name=MODEL,
                             api_key=None, max_model_len=MAX_MODEL_LEN, max_num_seqs=4, max_waiting=64, threads=None)


@pytest.fixture(scope="session")
def expert_settings(tiny_llama_dir, tmp_path_factory) -> Callable[..., Settings]:
    """Settings serving the tiny model as "tiny" for the expert tests; keywords override fields."""
    return _settings_factory(tmp_path_factory.mktemp("expert-cache"), model=str(tiny_llama_dir),
                             served_model_name="tiny", api_key=None, admin_api_key=None, max_model_len=1024,
                             max_num_seqs=4, threads=None)
