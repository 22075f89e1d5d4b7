"""Fixtures of the HTTP tests: a live server on the tiny model, shared by the tests."""
from __future__ import annotations

from typing import Iterator

import pytest

from tests.support.live import LiveServer, serve


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
