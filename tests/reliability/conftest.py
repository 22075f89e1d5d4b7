"""Fixtures of the reliability suite: settings for the tiny model, the budget and the report; and the
hooks that write the report (JSON) and print its figures at the end of the session."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import pytest

from server.config import Settings
from tests.support.reliability.suite import BUDGET, REPORT, Budget, Report


@pytest.fixture(scope="session")
def report() -> Report:
    return REPORT


@pytest.fixture(scope="session")
def budget() -> Budget:
    return BUDGET


@pytest.fixture(scope="session")
def rel_settings(tiny_llama_dir, tmp_path_factory) -> Callable[..., Settings]:
    """Settings serving the tiny model with a fresh expert folder per call (one SVD cache for all);
    keywords override fields. Small lengths keep generated requests short."""
    cache = tmp_path_factory.mktemp("rel-cache")

    def make(**overrides) -> Settings:
        base = dict(model=str(tiny_llama_dir), served_model_name="tiny", cache_dir=cache,
                    expert_dir=tmp_path_factory.mktemp("rel-experts"), api_key=None, admin_api_key=None,
                    max_model_len=256, default_max_tokens=8, max_num_seqs=4, max_waiting=32, threads=None)
        base.update(overrides)
        return Settings(**base)

    return make


def _report_path(config: pytest.Config) -> Path:
    if os.environ.get("T2_REL_REPORT"):
        return Path(os.environ["T2_REL_REPORT"])
    cache = getattr(config, "cache", None)
    folder = cache.mkdir("reliability") if cache is not None else Path(tempfile.gettempdir())
    return Path(folder) / "report.json"


def pytest_sessionfinish(session: pytest.Session) -> None:
    if REPORT.used:
        REPORT.write(_report_path(session.config), BUDGET)


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    if not REPORT.used:
        return
    terminalreporter.section("reliability report")
    for line in REPORT.summary_lines():
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"(JSON: {_report_path(config)})")
