"""Load: concurrent streaming and whole-body clients on loopback with mixed strategies and experts, some
leaving mid-request, for a bounded time (T2_REL_LOAD_SECONDS, twice: warm-up, then measured). Afterwards
every sequence the engine accepted either finished or was aborted, no slot, stream or KV entry is left
(engine counters back to idle), process memory is flat across the measured phase, and /health is ok.
Overload: a burst far beyond the queue is answered 429 at once, never with a timeout or a 5xx."""
from __future__ import annotations

import gc
import threading
import time

import httpx
import psutil
import pytest

from engine.native.llm_engine import TTFT_SAMPLES
from tests.support.experts import as_lists, random_z
from tests.support.live import serve
from tests.support.reliability.http import server_5xx
from tests.support.reliability.traffic import run_clients

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

RSS_GROWTH_LIMIT_MB = 64  # over the measured phase, after an equally long warm-up

ADAPTATIONS = [{}, {"adaptation": {"strategy": "none"}}, {"model": "math"}, {"model": "code"}, {"model": "mix"},
               {"adaptation": {"experts": {"math": 0.3, "code": 0.7}}},
               {"adaptation": {"experts": ["math", "code"], "weights": [1.0, -0.5]}},
               {"adaptation": {"strategy": "prompt"}}, {"adaptation": {"strategy": "cls_expert"}},
               {"adaptation": {"task": "mix"}}]


def upload_experts(srv) -> None:
    base = srv.state.store.base
    with srv.client() as c:
        for seed, (name, category) in enumerate([("math", "math"), ("code", "code"), ("clf", "classifier")]):
            r = c.post("/v1/experts", json={"name": name, "category": category, "z": as_lists(random_z(base, seed))})
            assert r.status_code == 200, r.text
        r = c.post("/v1/experts", json={"name": "mix", "kind": "mixture", "experts": {"math": 0.5, "code": 0.5}})
        assert r.status_code == 200, r.text


class SequenceCount:
    """Counts the sequences the engine accepts (wraps its add_request, which only the engine thread calls)."""

    def __init__(self, llm):
        self.added, real = 0, llm.add_request

        def add_request(req):
            real(req)
            self.added += 1

        llm.add_request = add_request


def settled(srv) -> dict:
    """Engine state once idle: nothing running, waiting, pending, streaming or holding KV."""
    engine = srv.engine
    stats = srv.wait_idle(timeout=30)
    deadline = time.monotonic() + 10
    while (engine.front.pending or engine.front.streams or engine.llm._by_id) and time.monotonic() < deadline:
        time.sleep(0.02)
    return {"stats": stats, "pending": engine.front.pending, "streams": engine.front.streams,
            "sequences": len(engine.llm._by_id), "kv_tokens_used": stats["kv_tokens_used"]}


def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


@pytest.fixture(scope="module")
def load_server(rel_settings):
    with serve(rel_settings(max_num_seqs=4, max_waiting=48, max_model_len=256)) as srv:
        upload_experts(srv)
        with srv.client() as c:
            srv.started_5xx = server_5xx(c)
        yield srv


def test_load_with_disconnects_leaves_nothing_behind(load_server, budget, report):
    srv = load_server
    llm = srv.engine.llm
    counted = SequenceCount(llm)
    before = (llm.counters.finished, llm.counters.aborted)
    warm = run_clients(srv.url, budget.clients, budget.load_seconds, ADAPTATIONS, disconnect_rate=0.2, seed=1)
    settled(srv)
    rss_warm = rss_mb()
    measured = run_clients(srv.url, budget.clients, budget.load_seconds, ADAPTATIONS, disconnect_rate=0.2, seed=2)
    after = settled(srv)
    rss_end = rss_mb()

    total = warm.counts + measured.counts
    report.add("load.requests_served", total["completed"])
    report.add("load.disconnects", total["disconnected"])
    report.add("load.rejected_429", total["rejected"])
    report.add("load.sequences", counted.added)
    report.set("load.clients", budget.clients)
    report.set("load.rss_growth_mb", round(rss_end - rss_warm, 1))
    report.set("load.ttft_samples_kept", len(llm.counters.ttft_seconds))
    assert not warm.failures + measured.failures, (warm.failures + measured.failures)[:10]
    assert total["completed"] > 0 and total["disconnected"] > 0
    finished, aborted = llm.counters.finished - before[0], llm.counters.aborted - before[1]
    report.add("load.aborted_by_server", aborted)
    assert finished + aborted == counted.added  # every accepted sequence completed or was cancelled
    assert after["pending"] == after["streams"] == after["sequences"] == after["kv_tokens_used"] == 0, after
    # Per-request samples kept by the engine are bounded (a list grew by one per request, forever).
    assert llm.counters.ttft_seconds.maxlen == TTFT_SAMPLES >= len(llm.counters.ttft_seconds)
    assert rss_end - rss_warm < RSS_GROWTH_LIMIT_MB, (rss_warm, rss_end)
    with srv.client() as c:
        assert c.get("/health").status_code == 200
        errors = server_5xx(c) - srv.started_5xx
    report.add("http_5xx", errors)
    assert errors == 0


def test_overload_is_answered_429_at_once(rel_settings, report):
    """A burst of 60 concurrent requests against 2 slots and 4 queue places (some with pass 1)."""
    with serve(rel_settings(max_num_seqs=2, max_waiting=4)) as srv:
        upload_experts(srv)
        with srv.client() as c:
            started_5xx = server_5xx(c)
        statuses, latencies, lock = [], [], threading.Lock()
        gate = threading.Barrier(60)

        def fire(i: int) -> None:
            body = {"prompt": "Once upon a time", "max_tokens": 48, "temperature": 0, "stream": i % 3 == 0,
                    "adaptation": {"strategy": "prompt"} if i % 4 == 0 else {"experts": {"math": 1.0}}}
            with httpx.Client(base_url=srv.url, timeout=120) as client:
                gate.wait()
                t0 = time.monotonic()
                try:
                    r = client.post("/v1/completions", json=body)
                    status = r.status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                with lock:
                    statuses.append(status)
                    latencies.append((status, time.monotonic() - t0))

        threads = [threading.Thread(target=fire, args=(i,)) for i in range(60)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rejected = [lat for s, lat in latencies if s == 429]
        report.add("overload.requests", len(statuses))
        report.add("overload.rejected_429", len(rejected))
        report.set("overload.slowest_429_s", round(max(rejected, default=0.0), 3))
        assert set(statuses) <= {200, 429}, statuses
        assert len(rejected) >= 30 and statuses.count(200) >= 2
        assert max(rejected) < 5.0  # refused at submission, not after waiting for a slot
        srv.wait_idle(timeout=30)
        with srv.client() as c:
            assert c.get("/health").status_code == 200
            assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
            errors = server_5xx(c) - started_5xx
        report.add("http_5xx", errors)
        assert errors == 0
