"""Client behaviour under load: one request of a random shape (completions or chat, streamed or not, n,
length, adaptation), sent by a client that may give up part-way (closes a stream after a few events,
times out a whole-body request, or drops the socket), and the checks of what came back.

Every request ends in exactly one outcome: ``completed`` (checked well-formed and finished),
``rejected`` (429, busy), ``disconnected`` (the client left on purpose) or ``failed`` (anything else,
with the reason: a test asserts there are none)."""
from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx

PROMPTS = ["Once upon a time", "def add(a, b):", "What is 12 + 30?", "The weather today is", "Name three colours"]


@dataclass
class Outcomes:
    counts: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    rejected_latency: float = 0.0  # the slowest 429
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: str, detail: str = "", latency: float = 0.0) -> None:
        with self.lock:
            self.counts[outcome] += 1
            if outcome == "failed":
                self.failures.append(detail)
            if outcome == "rejected":
                self.rejected_latency = max(self.rejected_latency, latency)


def random_body(rng: random.Random, adaptations: list[dict]) -> tuple[str, dict]:
    """(route, body) of one random generation request; ``adaptations``: request fields to pick from."""
    chat = rng.random() < 0.5
    body = {"max_tokens": rng.randint(1, 24), "n": rng.choice([1, 1, 2]), "stream": rng.random() < 0.5,
            "temperature": rng.choice([0, 0.7, 1.0]), "seed": rng.randint(0, 1000), **rng.choice(adaptations)}
    prompt = rng.choice(PROMPTS)
    if chat:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", {**body, "prompt": prompt}


def _check_choices(choices: list[dict], n: int, chat: bool) -> str | None:
    if sorted(c["index"] for c in choices) != list(range(n)):
        return f"choice indices {[c['index'] for c in choices]} for n={n}"
    if any(c["finish_reason"] not in ("stop", "length") for c in choices):
        return f"finish reasons {[c['finish_reason'] for c in choices]}"
    if chat and any(c["message"]["role"] != "assistant" for c in choices):
        return "chat choice without the assistant role"
    return None


def _whole(client: httpx.Client, route: str, body: dict, give_up: float | None) -> tuple[str, str]:
    timeout = httpx.Timeout(60, read=give_up) if give_up else httpx.Timeout(60)
    try:
        r = client.post(route, json=body, timeout=timeout)
    except httpx.ReadTimeout:
        return "disconnected", ""
    if r.status_code == 429:
        return "rejected", ""
    if r.status_code != 200:
        return "failed", f"{r.status_code} {r.text[:300]}"
    data = r.json()
    problem = _check_choices(data["choices"], body["n"], "messages" in body)
    usage = data["usage"]
    if problem is None and usage["completion_tokens"] > body["n"] * body["max_tokens"]:
        problem = f"usage {usage} beyond n * max_tokens"
    return ("failed", problem) if problem else ("completed", "")


def _streamed(client: httpx.Client, route: str, body: dict, leave_after: int | None) -> tuple[str, str]:
    finished: dict[int, str] = {}
    with client.stream("POST", route, json=body, timeout=60) as r:
        if r.status_code == 429:
            return "rejected", ""
        if r.status_code != 200:
            return "failed", f"{r.status_code} {r.read()[:300]!r}"
        events = 0
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            events += 1
            if leave_after is not None and events >= leave_after:
                return "disconnected", ""  # leaving the block closes the connection mid-stream
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return "failed", f"error event {chunk['error']}"
            for c in chunk["choices"]:
                if c["finish_reason"] is not None:
                    finished[c["index"]] = c["finish_reason"]
        else:
            return "failed", "stream ended without [DONE]"
    if sorted(finished) != list(range(body["n"])) or set(finished.values()) - {"stop", "length"}:
        return "failed", f"stream finished choices {finished} for n={body['n']}"
    return "completed", ""


def _dropped(url: str, route: str, body: dict) -> tuple[str, str]:
    """Send the request over a raw socket and close it at once, reading nothing."""
    u = urlparse(url)
    data = json.dumps(body).encode()
    head = (f"POST {route} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()
    with socket.create_connection((u.hostname, u.port)) as s:
        s.sendall(head + data)
        time.sleep(0.01)
    return "disconnected", ""


def one_request(client: httpx.Client, url: str, rng: random.Random, adaptations: list[dict],
                disconnect_rate: float, outcomes: Outcomes) -> None:
    route, body = random_body(rng, adaptations)
    leave = rng.random() < disconnect_rate
    t0 = time.monotonic()
    try:
        if leave and rng.random() < 0.2:
            outcome, detail = _dropped(url, route, body)
        elif body["stream"]:
            outcome, detail = _streamed(client, route, body, rng.randint(1, 4) if leave else None)
        else:
            outcome, detail = _whole(client, route, body, rng.uniform(0.02, 0.3) if leave else None)
    except (httpx.HTTPError, OSError, ValueError, KeyError) as e:
        outcome, detail = "failed", f"{type(e).__name__}: {e}"
    outcomes.add(outcome, f"{route} {body}: {detail}", time.monotonic() - t0)


def run_clients(url: str, clients: int, seconds: float, adaptations: list[dict], disconnect_rate: float,
                seed: int = 0) -> Outcomes:
    """``clients`` threads sending random requests back to back for ``seconds``."""
    outcomes = Outcomes()
    deadline = time.monotonic() + seconds

    def client_loop(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        with httpx.Client(base_url=url) as client:
            while time.monotonic() < deadline:
                one_request(client, url, rng, adaptations, disconnect_rate, outcomes)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes
