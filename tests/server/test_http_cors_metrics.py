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


def _series(text: str) -> set[str]:
    """The metric series of a scrape (each sample line without its value)."""
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_invented_methods_and_paths_add_no_metric_series(tiny_settings):
    """Requests are counted before any key check, so their labels come from closed sets: a hundred invented
    methods and paths, with and without a key, leave the set of series as one of each kind left it."""
    with serve(tiny_settings(api_key="k")) as srv, srv.client() as c:
        def invent(i: int) -> None:
            for key in (None, "k"):
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                c.request(f"X{i}Y", "/v1/completions", headers=headers)
                c.request(f"X{i}Y", f"/v1/invented/{i}", headers=headers)
                c.request("POST", f"/v1/invented/{i}", headers=headers)
                c.get(f"/x{i}", headers=headers)

        invent(0)
        c.get("/metrics")  # the scrape counts itself after its answer: its series exists from the second one
        before = _series(c.get("/metrics").text)
        for i in range(1, 50):
            invent(i)
        after = _series(c.get("/metrics").text)
    assert after == before
    assert any('method="other"' in s for s in before) and not any("X1Y" in s or "/x1" in s for s in after)
