"""Prometheus metrics of the server: HTTP requests, tokens, queue depth, time to first token, latency.

Each figure is exported twice: under this server's names (``t2_*``) and under vLLM's (``vllm:*``, labelled
with ``model_name``), so the dashboards made for vLLM show this server too. Requests are also counted by
pass-1 strategy and by expert (``t2_adapted_requests_total``).

Each app owns its registry (not the process-wide default one), so several apps in one process (tests)
never collide. Queue gauges are read from the engine when /metrics is scraped rather than pushed on
every step: the engine thread stays free of metrics work.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds. CPU decoding of a small model answers in tens of ms to first token; long generations take minutes.
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("t2_http_requests", "HTTP requests answered, by route template and status.",
                                ["method", "route", "status"], registry=r)
        self.prompt_tokens = Counter("t2_prompt_tokens", "Prompt tokens of accepted generation requests.",
                                     registry=r)
        self.generation_tokens = Counter("t2_generation_tokens", "Tokens generated.", registry=r)
        self.running = Gauge("t2_requests_running", "Sequences being decoded.", registry=r)
        self.waiting = Gauge("t2_requests_waiting", "Sequences queued for a slot.", registry=r)
        self.kv_tokens = Gauge("t2_kv_cache_tokens_used", "Tokens held in the KV cache.", registry=r)
        self.ready = Gauge("t2_engine_ready", "1 when the model is loaded and the engine runs.", registry=r)
        self.ttft = Histogram("t2_time_to_first_token_seconds",
                              "From request arrival to its first generated token.", buckets=_TTFT_BUCKETS,
                              registry=r)
        self.e2e = Histogram("t2_e2e_request_latency_seconds", "From request arrival to its last token.",
                             buckets=_E2E_BUCKETS, registry=r)
        self.adapted = Counter("t2_adapted_requests", "Prompts served, by pass-1 strategy and expert ('' = base).",
                               ["strategy", "expert"], registry=r)
        # vLLM's names (vllm/v1/metrics/loggers.py), for its dashboards
        m = ["model_name"]
        self.v_running = Gauge("vllm:num_requests_running", "Requests being decoded.", m, registry=r)
        self.v_waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", m, registry=r)
        self.v_prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.", m, registry=r)
        self.v_generation_tokens = Counter("vllm:generation_tokens", "Generation tokens processed.", m, registry=r)
        self.v_ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", m, buckets=_TTFT_BUCKETS,
                                registry=r)
        self.v_e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.", m,
                               buckets=_E2E_BUCKETS, registry=r)
        self.model_name = ""

    def observe_engine(self, stats: dict | None, ready: bool, model_name: str | None = None) -> None:
        stats = stats or {}
        if model_name:
            self.model_name = model_name
        self.running.set(stats.get("running", 0))
        self.waiting.set(stats.get("waiting", 0))
        self.kv_tokens.set(stats.get("kv_tokens_used", 0))
        self.ready.set(1 if ready else 0)
        self.v_running.labels(self.model_name).set(stats.get("running", 0))
        self.v_waiting.labels(self.model_name).set(stats.get("waiting", 0))

    # --- figures of requests (both names at once) -------------------------------------------------------
    def count_prompt_tokens(self, n: int) -> None:
        self.prompt_tokens.inc(n)
        self.v_prompt_tokens.labels(self.model_name).inc(n)

    def count_generation_tokens(self, n: int) -> None:
        self.generation_tokens.inc(n)
        self.v_generation_tokens.labels(self.model_name).inc(n)

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.v_ttft.labels(self.model_name).observe(seconds)

    def observe_e2e(self, seconds: float) -> None:
        self.e2e.observe(seconds)
        self.v_e2e.labels(self.model_name).observe(seconds)

    def count_adaptation(self, strategy: str, expert: str | None) -> None:
        self.adapted.labels(strategy, expert or "").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
