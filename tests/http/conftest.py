"""Fixtures of the HTTP tests: settings for the tiny model and a live server shared by the tests."""
from __future__ import annotations

from typing import Callable, Iterator

import pytest
from _live import MAX_MODEL_LEN, MODEL, LiveServer, serve

from server.config import Settings


@pytest.fixture(scope="session")
def tiny_settings(tiny_llama_dir, tmp_path_factory) -> Callable[..., Settings]:
    """Settings serving the tiny model; keyword arguments override fields (the environment never does)."""
    cache = tmp_path_factory.mktemp("t2-cache")

    def make(**overrides) -> Settings:
        fields = dict(model=str(tiny_llama_dir), served_model_name=MODEL, cache_dir=cache, api_key=None,
                      max_model_len=MAX_MODEL_LEN, max_num_seqs=4, max_waiting=64, threads=None)
        return Settings(**{**fields, **overrides})

    return make


@pytest.fixture(scope="session")
def live_server(tiny_settings) -> Iterator[LiveServer]:
    """One server shared by the tests that need no special settings."""
    with serve(tiny_settings()) as srv:
        yield srv


@pytest.fixture()
def server(live_server) -> Iterator[LiveServer]:
    """The shared server, checked idle before and after each test (no test leaks a busy slot)."""
    live_server.wait_idle()
    yield live_server
    live_server.wait_idle()
