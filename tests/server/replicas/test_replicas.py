"""Two server processes sharing one expert folder, over real HTTP: an upload to one is served by the
other within the bound (``store_poll_interval`` plus reading the expert), a replacement likewise, a
deletion on one is refused by the other while its running requests finish with their copy, concurrent
uploads of one name through both end with one complete version, and both serve traffic behind a
round-robin balancer."""
from __future__ import annotations

import json
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load as load_safetensors

from bench.balancer import haproxy, round_robin
from experts.store.lock import StoreLock
from tests.support.experts import as_lists, random_z
from tests.support.live import assert_error_shape, serve, wait_for_health
from tests.support.replicas import replicas

POLL = 1.0  # the default store_poll_interval
BOUND = POLL + 1.0  # what the tests allow: one interval, plus reading the expert on a busy 2-core machine
PROMPT = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
LATENCIES: dict[str, float] = {}  # measured visibility delays, printed at the end (pytest -s)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("replicas")


@pytest.fixture(scope="module")
def pair(expert_settings, folder):
    settings = expert_settings(expert_dir=folder / "store", store_poll_interval=POLL, threads=1, max_model_len=2048)
    with replicas(settings, 2, folder) as (a, b):
        yield a, b
    print("\nvisible on the other replica after:", json.dumps({k: round(v, 3) for k, v in LATENCIES.items()}))


def upload(replica, name: str, seed: int, base_mlp) -> dict:
    with replica.client() as c:
        r = c.post("/v1/experts", json={"name": name, "z": as_lists(random_z(base_mlp, seed))})
    assert r.status_code == 200, r.text
    return r.json()


def complete(replica, model: str) -> httpx.Response:
    with replica.client() as c:
        return c.post("/v1/completions", json={"model": model, **PROMPT})


def text(replica, model: str) -> str:
    r = complete(replica, model)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def within_bound(what: str, predicate) -> float:
    """Seconds until ``predicate()`` holds; fails the test past the bound."""
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < BOUND, f"{what}: not within {BOUND} s"
        time.sleep(0.02)
    LATENCIES[what] = time.monotonic() - t0
    return LATENCIES[what]


def running(replica) -> int:
    """Sequences ``replica``'s engine is decoding now (its ``t2_requests_running`` gauge)."""
    with replica.client() as c:
        metrics = c.get("/metrics").text
    return int(float(re.search(r"^t2_requests_running (\S+)$", metrics, re.M).group(1)))


def card(replica, name: str) -> dict | None:
    with replica.client() as c:
        r = c.get(f"/v1/experts/{name}")
    return r.json() if r.status_code == 200 else None


def test_an_upload_to_one_is_served_by_the_other_within_the_bound(pair, base_mlp):
    a, b = pair
    assert_error_shape(complete(b, "math"), 404)
    uploaded = upload(a, "math", 0, base_mlp)
    within_bound("upload", lambda: complete(b, "math").status_code == 200)
    assert card(b, "math") == uploaded  # same version, sha256, everything
    assert text(b, "math") == text(a, "math") != text(b, "tiny")  # the same expert, really applied

    replaced = upload(a, "math", 1, base_mlp)
    assert replaced["version"] == 2
    within_bound("replacement", lambda: (card(b, "math") or {}).get("version") == 2)
    assert card(b, "math") == replaced and text(b, "math") == text(a, "math")


@pytest.mark.slow  # a 1500-token stream on one replica while the other refuses (~13 s on 2 cores)
def test_a_deletion_on_one_is_refused_by_the_other_and_running_requests_finish(pair, base_mlp):
    a, b = pair
    upload(b, "code", 2, base_mlp)
    within_bound("upload", lambda: card(a, "code") is not None)
    # Long enough that the stream is still being decoded when the deletion reaches ``b`` on a fast machine.
    request = {"model": "code", "prompt": "Hello", "max_tokens": 1500, "temperature": 0}
    with b.client() as c:
        reference = c.post("/v1/completions", json=request).json()["choices"][0]["text"]
        with c.stream("POST", "/v1/completions", json={**request, "stream": True}) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            t_delete = time.monotonic()
            with a.client() as ca:
                assert ca.delete("/v1/experts/code").json()["deleted"] is True
            within_bound("deletion", lambda: complete(b, "code").status_code == 404)
            refused_after = time.monotonic() - t_delete
            running_when_refused = running(b)
            chunks = [first] + [line for line in lines if line.startswith("data: ")]
    assert chunks[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in chunks[:-1]]
    # The running request finished with the expert it started with, after new requests were refused.
    assert "".join(e["choices"][0]["text"] for e in events) == reference
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert running_when_refused == 1, (refused_after, running_when_refused)
    err = assert_error_shape(complete(b, "code"), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    with b.client() as c:
        assert card(b, "code") is None and "code" not in {m["id"] for m in c.get("/v1/models").json()["data"]}


def test_concurrent_uploads_of_one_name_through_both_end_with_one_complete_version(pair, folder, base_mlp):
    a, b = pair
    per_replica = 5
    seeds = {a.url: range(100, 100 + per_replica), b.url: range(200, 200 + per_replica)}
    answers: list[tuple[int, dict]] = []
    start = threading.Barrier(2)

    def writer(replica):
        start.wait()
        for seed in seeds[replica.url]:
            answers.append((seed, upload(replica, "hot", seed, base_mlp)))

    threads = [threading.Thread(target=writer, args=(r,)) for r in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    versions = sorted(ans["version"] for _, ans in answers)
    assert versions == list(range(1, 2 * per_replica + 1))  # every upload got a version of its own
    seed, last = max(answers, key=lambda sa: sa[1]["version"])
    within_bound("concurrent uploads", lambda: card(a, "hot") == last and card(b, "hot") == last)
    assert sorted(p.name for p in (folder / "store" / "hot").iterdir()) == [f"v{last['version']:06d}.json",
                                                                    f"v{last['version']:06d}.safetensors"]
    with b.client() as c:
        stored = load_safetensors(c.get("/v1/experts/hot/content").content)
    want = random_z(base_mlp, seed)
    assert stored.keys() == want.keys() and all(torch.equal(stored[k], want[k]) for k in want)
    assert text(a, "hot") == text(b, "hot")


def served_completions(replica) -> float:
    with replica.client() as c:
        metrics = c.get("/metrics").text
    m = re.search(r't2_http_requests_total\{method="POST",route="/v1/completions",status="200"\} (\S+)', metrics)
    return float(m.group(1)) if m else 0.0


def through(url: str, name: str, base_mlp) -> None:
    """Traffic through a balancer: completions, an upload, then requests naming the new expert, which
    every replica serves once the bound has passed."""
    # One connection per request: balancers pick a replica per connection.
    with httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_keepalive_connections=0)) as c:
        assert all(c.post("/v1/completions", json=PROMPT).status_code == 200 for _ in range(8))
        assert c.post("/v1/experts", json={"name": name, "z": as_lists(random_z(base_mlp, 7))}).status_code == 200
        time.sleep(BOUND)
        answers = [c.post("/v1/completions", json={"model": name, **PROMPT}) for _ in range(4)]
    assert all(r.status_code == 200 for r in answers) and len({r.json()["choices"][0]["text"] for r in answers}) == 1


def test_both_replicas_serve_behind_a_round_robin_balancer(pair, base_mlp):
    a, b = pair
    before = [served_completions(r) for r in pair]
    with round_robin([("127.0.0.1", a.port), ("127.0.0.1", b.port)]) as url:
        through(url, "lb", base_mlp)
    after = [served_completions(r) for r in pair]
    assert [x - y for x, y in zip(after, before)] == [6, 6]  # 12 completions, alternating


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
def test_both_replicas_serve_behind_haproxy_with_the_compose_config(pair, folder, base_mlp):
    """docker/haproxy.cfg as the compose file runs it, with the two loopback replicas in place of the
    servers that Docker's DNS names."""
    a, b = pair
    before = [served_completions(r) for r in pair]
    with haproxy([("127.0.0.1", a.port), ("127.0.0.1", b.port)], folder) as url:
        wait_for_health(url, timeout=30)
        through(url, "haproxy", base_mlp)
    after = [served_completions(r) for r in pair]
    assert all(x - y >= 3 for x, y in zip(after, before))  # least connections: both take a share


def test_a_write_that_waits_too_long_for_another_answers_503(pair, folder, expert_settings, base_mlp):
    """A third replica (in this process) joins the pair's store; while another writer holds the lock
    past its timeout, its uploads and deletions answer 503 store_busy, and succeed once the lock is free."""
    settings = expert_settings(expert_dir=folder / "store", store_lock_timeout=0.2, threads=1)
    with serve(settings) as third, third.client() as c:
        assert c.get("/v1/experts/math").json()["version"] == 2  # written by the others before it started
        with StoreLock(folder / "store").exclusive():
            for r in (c.post("/v1/experts", json={"name": "busy", "z": as_lists(random_z(base_mlp, 9))}),
                      c.delete("/v1/experts/math")):
                err = assert_error_shape(r, 503)
                assert err["code"] == "store_busy" and err["type"] == "server_error"
        assert c.post("/v1/experts", json={"name": "busy", "z": as_lists(random_z(base_mlp, 9))}).status_code == 200
    within_bound("upload", lambda: card(pair[0], "busy") is not None)
