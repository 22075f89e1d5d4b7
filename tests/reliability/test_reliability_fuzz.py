"""An API fuzzer (schemathesis) against the server's own OpenAPI schema: valid and invalid requests for
every operation, generated from the schema the server publishes, in schemathesis' examples, coverage
(boundary values) and fuzzing phases. No answer may be a 5xx, and every answer must match what the
schema documents for it (status code, content type, body, headers); invalid requests must be refused.

Fuzzing generates at most T2_REL_FUZZ_EXAMPLES cases per operation and mode; the run is deterministic,
so CI sees the same cases every time. (schemathesis' engine is driven directly: its pytest plugin does
not run under this pytest.)"""
from __future__ import annotations

import pytest
import schemathesis
from schemathesis.engine import Status, events, from_schema

from tests.support.live import serve
from tests.support.reliability.http import server_5xx
from tests.support.reliability.suite import BUDGET

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "response_headers_conformance", "negative_data_rejection")


@pytest.fixture(scope="module")
def fuzz_server(rel_settings):
    # Short generations and a small queue: generated requests stay cheap, and overload answers 429.
    with serve(rel_settings(max_model_len=64, default_max_tokens=4, max_n=2, max_waiting=8)) as srv:
        with srv.client() as c:
            srv.started_5xx = server_5xx(c)  # /health answered 503 while the model loaded
        yield srv


def fuzz(url: str) -> tuple[int, list[str]]:
    """(cases sent, failures) of one schemathesis run against the server at ``url``."""
    config = schemathesis.Config.from_dict({
        "generation": {"mode": "all", "max-examples": BUDGET.fuzz_examples, "deterministic": True},
        "phases": {"stateful": {"enabled": False}},
        "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
        "request-timeout": 60,
    })
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=config)
    schema.config.update(base_url=url)
    cases, failures = 0, []
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            cases += len(recorder.interactions)
            for case_id, checks in recorder.checks.items():
                for check in checks:
                    if check.status == Status.FAILURE:
                        info = check.failure_info
                        curl = info.code_sample if info is not None else ""
                        failures.append(f"{recorder.label}: {check.name}: {info.failure.title if info else ''}\n"
                                        f"    {curl}")
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            failures.append(f"{type(event).__name__}: {getattr(event, 'value', None) or event.exception!r}")
    return cases, sorted(set(failures))


def test_fuzz_the_api(fuzz_server, report):
    cases, failures = fuzz(fuzz_server.url)
    report.add("fuzz.cases", cases)
    with fuzz_server.client() as c:
        errors = server_5xx(c) - fuzz_server.started_5xx
        report.add("http_5xx", errors)
        assert c.get("/health").status_code == 200
    assert not failures, "\n".join(failures[:40])
    assert errors == 0 and cases >= 100
    fuzz_server.wait_idle(timeout=30)
