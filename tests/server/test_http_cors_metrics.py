"""CORS (off unless configured; preflight answered before the key check) and vLLM's metric names."""
from __future__ import annotations

from tests.support.live import MODEL, serve


def test_cors_is_off_by_default_and_answers_preflight_when_configured(tiny_settings, server):
    with server.client() as c:
        r = c.get("/v1/models", headers={"Origin": "https://app.example.com"})
        assert "access-control-allow-origin" not in r.headers
    settings = tiny_settings(cors_origins="https://app.example.com", api_key="k")
    with serve(settings) as srv, srv.client() as c:
        pre = c.options("/v1/chat/completions", headers={"Origin": "https://app.example.com",
                                                         "Access-Control-Request-Method": "POST",
                                                         "Access-Control-Request-Headers": "authorization"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.example.com"
        r = c.get("/v1/models", headers={"Origin": "https://app.example.com", "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example.com"
        other = c.get("/v1/models", headers={"Origin": "https://evil.example", "Authorization": "Bearer k"})
        assert "access-control-allow-origin" not in other.headers


def test_metrics_also_carry_vllms_names_and_count_strategies(server):
    with server.client() as c:
        c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "temperature": 0})
        text = c.get("/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_count"):
        assert any(line.startswith(name + "{") and f'model_name="{MODEL}"' in line for line in text.splitlines()), name
    assert 't2_adapted_requests_total{expert="",strategy="none"}' in text
