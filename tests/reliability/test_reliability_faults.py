"""Faults: the server SIGKILLed while it writes the SVD cache, while it converts a GGUF model into its
model cache, and again and again while clients upload, replace and delete experts and generate. Each
restart recovers: every write that completed (was acknowledged) is intact, no partial file is ever
used, and what the killed process left behind is removed.

Kill points are armed inside a real ``t2serve serve`` process (forked by the Zygote, see _procs.py).
After each kill the start-up step the next server runs is checked in this process (``load_or_compute``
/ ``gguf_to_hf_folder``, what the restarted server calls), and one restart per cache is a real server."""
from __future__ import annotations

import os
import random
import threading
import time

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from adapters.svd_cache import cache_key, load_or_compute, thin_svd, weights_fingerprint
from adapters.targets import find_targets, weight_matrix
from engine.loader import _COMPLETE_MARK, _file_key, gguf_to_hf_folder
from experts.store.base_model import BaseModelInfo
from tests.support.experts import as_lists, random_z
from tests.support.reliability.procs import KILL_POINTS, Zygote, gguf_is_tiny

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

SVD_POINTS = [p for p in KILL_POINTS if p.startswith("svd")]
CONVERSION_POINTS = [p for p in KILL_POINTS if p.startswith("conversion")]


@pytest.fixture(scope="module")
def zygote(tiny_llama_dir, tmp_path_factory):
    z = Zygote(tiny_llama_dir, tmp_path_factory.mktemp("servers") / "log")
    yield z
    z.close()


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def assert_serves(url: str) -> None:
    with httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/health").status_code == 200
        r = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text


@pytest.mark.parametrize("point", SVD_POINTS)
def test_sigkill_during_svd_cache_write(point, tmp_path, zygote, tiny_llama_dir, tiny_model, monkeypatch, report):
    cache, svd = tmp_path / "cache", tmp_path / "cache" / "svd"
    zygote.killed_at(point, tiny_llama_dir, cache, tmp_path / "experts")
    report.add("faults.injected")
    targets = find_targets(tiny_model, "mlp")
    weights = [weight_matrix(tiny_model.get_submodule(t.name).weight, t.kind) for t in targets]
    final = svd / f"{cache_key(weights_fingerprint(weights), targets)}.safetensors"
    assert final.exists() == (point == "svd: renamed, folder not synced")  # a partial file is never in place
    calls = []
    import adapters.svd_cache as svd_cache

    monkeypatch.setattr(svd_cache, "thin_svd", lambda w: calls.append(1) or thin_svd(w))  # whatever the driver

    factors = load_or_compute(tiny_model, targets, svd, progress=False)  # what the restarted server runs
    # A file renamed into place was complete: reused. Anything else was recomputed, never read.
    assert len(calls) == (0 if point == "svd: renamed, folder not synced" else len(targets))
    for t, w in zip(targets, weights):
        ref = thin_svd(w)
        got = factors[t.name]
        assert torch.allclose(got.U * got.S @ got.Vh, ref.U * ref.S @ ref.Vh, atol=1e-5)
    assert sorted(p.name for p in svd.iterdir() if not p.name.endswith(".lock")) == [final.name]  # no temp left
    calls.clear()
    load_or_compute(tiny_model, targets, svd, progress=False)
    assert calls == []  # the recovered cache is trusted from now on
    if point == SVD_POINTS[0]:  # and a real server starts from it
        srv = zygote.spawn(tiny_llama_dir, cache, tmp_path / "experts").wait_ready()
        assert_serves(srv.url)
        srv.kill()
    report.add("faults.survived")


@pytest.mark.parametrize("point", CONVERSION_POINTS)
def test_sigkill_during_model_cache_conversion(point, tmp_path, zygote, tiny_llama_dir, tiny_model, monkeypatch,
                                               report):
    gguf = tmp_path / "weights.gguf"
    gguf.write_bytes(os.urandom(4096))
    cache = tmp_path / "cache"
    zygote.killed_at(point, gguf, cache, tmp_path / "experts")
    report.add("faults.injected")
    models = cache / "models"
    target = models / f"{gguf.stem}-{_file_key(gguf)}"
    assert not target.exists()  # the half-done conversion is only ever in a temporary folder
    assert [p for p in models.iterdir() if p.is_dir() and p.name.startswith(f".{target.name}.")]

    gguf_is_tiny(tiny_llama_dir, monkeypatch.setattr)
    assert gguf_to_hf_folder(gguf, cache) == target  # what the restarted server runs
    assert (target / _COMPLETE_MARK).exists()
    assert sorted(p.name for p in models.iterdir() if p.is_dir()) == [target.name]  # leftovers removed
    reloaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    for (name, got), want in zip(reloaded.state_dict().items(), tiny_model.state_dict().values()):
        assert torch.equal(got, want), name
    if point == CONVERSION_POINTS[0]:  # and a real server starts from it, converting nothing again
        mtime = (target / _COMPLETE_MARK).stat().st_mtime_ns
        srv = zygote.spawn(gguf, cache, tmp_path / "experts").wait_ready()
        assert_serves(srv.url)
        srv.kill()
        assert (target / _COMPLETE_MARK).stat().st_mtime_ns == mtime
    report.add("faults.survived")


class Ledger:
    """What the clients were told: acknowledged versions and deletions, and the operation per name that
    got no answer (the kill came first: either outcome is right for that name)."""

    def __init__(self) -> None:
        self.acked: dict[str, int] = {}
        self.deleted: set[str] = set()
        self.unsure: dict[str, str] = {}  # name -> "put" | "delete"
        self.errors: list[str] = []  # answers other than 200 (there should be none)
        self.answered = 0  # acknowledged operations, all cycles together
        self.lock = threading.Lock()

    def lost_writes(self, client: httpx.Client) -> list[str]:
        """Acknowledged writes the restarted server does not have; then the unanswered operations are
        settled by what it has (so the clients carry on from the state they can see)."""
        cards = {e["id"]: e for e in client.get("/v1/experts").json()["data"]}
        lost = self._compare(cards)
        for name in self.unsure:
            if name in cards:
                self.acked[name] = cards[name]["version"]
                self.deleted.discard(name)
            elif self.acked.pop(name, None) is not None:
                self.deleted.add(name)
        self.unsure.clear()
        return lost

    def _compare(self, cards: dict) -> list[str]:
        lost = []
        for name, version in self.acked.items():
            card, pending = cards.get(name), self.unsure.get(name)
            if card is None:
                ok = pending == "delete"
            else:
                ok = card["status"] == "ready" and (
                    card["version"] == version or (pending == "put" and card["version"] > version))
            if not ok:
                lost.append(f"{name}: acknowledged v{version}, found {card and card['version']} ({pending})")
        lost += [f"{name}: deletion acknowledged, still there" for name in self.deleted
                 if name in cards and self.unsure.get(name) != "put"]
        return lost


def write_until_killed(url: str, base: BaseModelInfo, ledger: Ledger, cycle: int, stop: threading.Event) -> None:
    rng = random.Random(cycle)
    with httpx.Client(base_url=url, timeout=30) as c:
        i = 0
        while not stop.is_set():
            i += 1
            with ledger.lock:
                names = sorted(ledger.acked)
            roll = rng.random()
            if roll < 0.25 and names:
                name, op = rng.choice(names), "delete"
            else:
                name, op = ("hot" if roll < 0.6 else f"e{cycle}-{i}"), "put"
            with ledger.lock:
                ledger.unsure[name] = op
            try:
                if op == "put":
                    r = c.post("/v1/experts", json={"name": name, "z": as_lists(random_z(base, rng.randrange(99)))})
                else:
                    r = c.delete(f"/v1/experts/{name}")
            except httpx.HTTPError:
                return  # killed: this last operation stays unsure
            if r.status_code != 200:
                ledger.errors.append(f"{op} {name}: {r.status_code} {r.text[:200]}")
                return
            with ledger.lock:
                ledger.answered += 1
                ledger.unsure.pop(name, None)
                if op == "put":
                    ledger.acked[name] = r.json()["version"]
                    ledger.deleted.discard(name)
                else:
                    del ledger.acked[name]
                    ledger.deleted.add(name)


def generate_until_killed(url: str, stop: threading.Event) -> None:
    with httpx.Client(base_url=url, timeout=30) as c:
        while not stop.is_set():
            try:
                c.post("/v1/completions", json={"model": "hot", "prompt": "Hi", "max_tokens": 4, "stream": True})
            except httpx.HTTPError:
                return


def test_server_killed_again_and_again_under_writes(tmp_path, zygote, tiny_llama_dir, tiny_model, budget, report):
    base = BaseModelInfo.from_model(tiny_model, "tiny", target_spec="mlp")
    cache, experts, ledger = tmp_path / "cache", tmp_path / "experts", Ledger()
    for cycle in range(budget.kill_cycles + 1):
        srv = zygote.spawn(tiny_llama_dir, cache, experts).wait_ready()
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            lost = ledger.lost_writes(c)
        report.add("lost_writes", len(lost))
        assert not lost, lost
        if cycle:
            report.add("faults.survived")
        if cycle == budget.kill_cycles:
            srv.kill()
            break
        stop = threading.Event()
        workers = [threading.Thread(target=write_until_killed, args=(srv.url, base, ledger, cycle, stop)),
                   threading.Thread(target=generate_until_killed, args=(srv.url, stop))]
        for w in workers:
            w.start()
        time.sleep(random.Random(cycle).uniform(1.0, 2.5))
        srv.kill()  # in the middle of uploads, deletions and generation
        report.add("faults.injected")
        stop.set()
        for w in workers:
            w.join(30)
        assert not ledger.errors, ledger.errors
    report.add("faults.acknowledged_writes", ledger.answered)
    # Only complete versions are left: one record and its tensors per expert, nothing half-written.
    left = sorted(str(p.relative_to(experts)) for p in experts.rglob("*") if p.is_file()
                  and not p.name.startswith("."))
    want = sorted(f"{n}/v{v:06d}.{ext}" for n, v in ledger.acked.items() for ext in ("json", "safetensors"))
    assert left == want
    staged = experts / ".incoming"
    assert not [p for p in experts.iterdir() if p.name.startswith(".trash")]
    assert not (staged.exists() and any(staged.iterdir()))
