"""Prometheus metrics of the server: HTTP requests, tokens, queue depth, time to first token, latency.

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

    def observe_engine(self, stats: dict | None, ready: bool) -> None:
        stats = stats or {}
        self.running.set(stats.get("running", 0))
        self.waiting.set(stats.get("waiting", 0))
        self.kv_tokens.set(stats.get("kv_tokens_used", 0))
        self.ready.set(1 if ready else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
