"""Operations routes: /health while loading, ready and failed; /metrics; /v1/models; the OpenAPI docs."""
from __future__ import annotations

import threading
import time

from engine.native.async_engine import AsyncEngine
from tests.support.live import MODEL, assert_error_shape, serve, wait_for_health


def test_health_is_503_while_loading_then_200(tiny_settings, monkeypatch):
    gate = threading.Event()
    load = AsyncEngine.from_spec

    def slow_load(cls, settings):
        gate.wait(30)
        return load(settings)

    monkeypatch.setattr(AsyncEngine, "from_spec", classmethod(slow_load))
    with serve(tiny_settings(), wait_ready=False) as srv, srv.client() as c:
        err = assert_error_shape(c.get("/health"), 503)
        assert err["code"] == "model_loading"
        assert assert_error_shape(c.post("/v1/completions", json={"prompt": "x"}), 503)["code"] == "model_loading"
        assert_error_shape(c.get("/v1/models"), 503)
        assert "t2_engine_ready 0.0" in c.get("/metrics").text
        gate.set()
        wait_for_health(srv.url)
        health = c.get("/health").json()
        assert (health["status"], health["model"]) == ("ok", MODEL) and health["adaptation"]["phase"] in ("svd", "ready")
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_health_reports_a_failed_load(tiny_settings, tmp_path):
    with serve(tiny_settings(model=str(tmp_path / "no-such-model")), wait_ready=False) as srv, srv.client() as c:
        deadline = time.monotonic() + 10
        while srv.state.load_error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        err = assert_error_shape(c.get("/health"), 503)
        assert err["code"] == "model_load_failed" and "no-such-model" in err["message"]


def test_app_serves_an_engine_handed_in_and_stops_it(tiny_settings):
    settings = tiny_settings(served_model_name="handed-in")
    engine = AsyncEngine.from_spec(settings.engine_spec())
    assert not engine.ready  # the app starts it on its own event loop
    with serve(settings, engine=engine) as srv, srv.client() as c:
        assert srv.engine is engine and engine.ready
        assert c.get("/health").json()["model"] == "handed-in"
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    assert not engine.ready  # shut down with the app


def test_metrics(server):
    with server.client() as c:
        c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 5, "temperature": 0})
        c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": -5})
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ("t2_http_requests_total", "t2_prompt_tokens_total", "t2_generation_tokens_total",
                 "t2_requests_running", "t2_requests_waiting", "t2_kv_cache_tokens_used",
                 "t2_time_to_first_token_seconds_bucket", "t2_e2e_request_latency_seconds_count"):
        assert name in text, name
    assert 'route="/v1/completions",status="200"' in text
    assert 'route="/v1/completions",status="400"' in text
    assert "t2_engine_ready 1.0" in text
    generated = float(next(line.split()[1] for line in text.splitlines()
                           if line.startswith("t2_generation_tokens_total ")))
    assert generated >= 5


def test_models(server):
    with server.client() as c:
        listed = c.get("/v1/models").json()
        assert listed["object"] == "list"
        (card,) = listed["data"]
        assert card["id"] == MODEL and card["object"] == "model" and card["max_model_len"] == 4096
        assert c.get(f"/v1/models/{MODEL}").json()["id"] == MODEL


def test_openapi_docs(server):
    with server.client() as c:
        assert c.get("/docs").status_code == 200
        spec = c.get("/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    assert "adaptation" in schemas["CompletionRequest"]["properties"]
    assert "ErrorResponse" in schemas
