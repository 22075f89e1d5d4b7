"""SIGKILL in the middle of writing an expert (real processes) leaves a store that loads cleanly: every
acknowledged write intact, nothing half-written served, leftovers removed at the next start."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from experts.store.expert_store import ExpertStore
from experts.store.lock import CONTROL_FILES
from experts.store.validation import ExpertDraft
from tests.support import REPO_ROOT
from tests.support.experts import as_lists, random_z
from tests.support.live import wait_for_health

ROOT = REPO_ROOT

# A child that stores (or deletes) expert "x" and SIGKILLs itself at one point of the write.
CHILD = textwrap.dedent("""
    import os, shutil, signal, sys, torch
    sys.path.insert(0, {root!r})
    import adapters.atomic as atomic, experts.store.expert_store as st
    from experts.store.validation import ExpertDraft

    root, point, name = sys.argv[1:4]
    store = st.ExpertStore(root)
    store.load()  # before the kill points are armed
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    real_publish, real_replace = atomic.publish, os.replace
    if point == "staged":            # tensors fsync'ed in .incoming, not yet renamed into place
        os.replace = lambda src, dst: die() if ".incoming" in str(src) else real_replace(src, dst)
    elif point == "tensors":         # tensors in place, record not yet written
        st.atomic_write = die
    elif point == "record-temp":     # record written to its temporary file, not yet renamed
        atomic.publish = lambda tmp, path: die() if str(path).endswith(".json") else real_publish(tmp, path)
    elif point == "committed":       # record renamed (committed), older version not yet removed
        st.ExpertStore._remove_versions = die
    elif point == "deleting":        # folder renamed to trash, not yet removed
        st.shutil.rmtree = die
    if point == "deleting":
        store.delete(name)
    else:
        store.put(ExpertDraft(name, "svf", {{"m": torch.full((4,), 7.0)}}))
    print("not killed")
""").format(root=str(ROOT))


def _run_child(root: Path, point: str, name: str) -> None:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(root), point, name], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr


@pytest.mark.parametrize("point, name, expect", [
    ("staged", "x", "old"), ("tensors", "x", "old"), ("record-temp", "x", "old"), ("committed", "x", "new"),
    ("deleting", "x", None), ("tensors", "y", None), ("record-temp", "y", None), ("committed", "y", "new"),
])
def test_sigkill_at_each_step_of_a_write(tmp_path, point, name, expect):
    ExpertStore(tmp_path).put(ExpertDraft("x", "svf", {"m": torch.full((4,), 1.0)}))
    _run_child(tmp_path, point, name)
    store = ExpertStore(tmp_path)
    got = {s.name: s for s in store.load()}
    value = {"old": 1.0, "new": 7.0, None: None}[expect]
    if value is None:
        assert name not in got and name not in store.registry
    else:
        assert got[name].ready and torch.equal(store.registry.get(name).expert.z["m"], torch.full((4,), value))
    if name == "y":  # the other expert is untouched
        assert torch.equal(store.registry.get("x").expert.z["m"], torch.full((4,), 1.0))
    # Only committed versions remain, one per name, and nothing else.
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
                  if p.is_file() and p.name not in CONTROL_FILES)
    want = sorted(f"{n}/v{s.record.version:06d}.{ext}" for n, s in got.items() for ext in ("json", "safetensors"))
    assert left == want


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(settings, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", settings.model, "--served-model-name", "tiny",
           "--cache-dir", str(settings.cache_dir), "--expert-dir", str(settings.expert_dir), "--port", str(port),
           "--log-level", "warning", "--max-model-len", "512"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow  # uploads under a server that is killed and restarted (~12 s on 2 cores)
def test_server_killed_during_uploads_restarts_with_every_acknowledged_upload(expert_settings, tmp_path, base_mlp):
    settings = expert_settings(expert_dir=tmp_path / "store")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = _start_server(settings, port)
    acked: dict[str, int] = {}  # name -> last acknowledged version
    stop = threading.Event()

    def upload_forever():
        i = 0
        with httpx.Client(base_url=url, timeout=30) as c:
            while not stop.is_set():
                name = "hot" if i % 2 else f"e{i}"  # new names and replacements, interleaved
                try:
                    r = c.post("/v1/experts", json={"name": name, "z": as_lists(random_z(base_mlp, i))})
                except httpx.HTTPError:
                    return  # the server is gone
                assert r.status_code == 200, r.text
                acked[name] = r.json()["version"]
                i += 1

    try:
        wait_for_health(url, timeout=120)
        worker = threading.Thread(target=upload_forever)
        worker.start()
        deadline = time.monotonic() + 30
        while len(acked) < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.send_signal(signal.SIGKILL)  # mid-stream of uploads
        server.wait(30)
        stop.set()
        worker.join(30)
        assert len(acked) >= 8
        server = _start_server(settings, port)
        wait_for_health(url, timeout=120)
        with httpx.Client(base_url=url, timeout=30) as c:
            cards = {e["id"]: e for e in c.get("/v1/experts").json()["data"]}
            for name, version in acked.items():  # acknowledged means durable
                assert cards[name]["status"] == "ready"
                assert cards[name]["version"] in (version, version + 1)  # +1: committed, then killed before the reply
            assert all(card["status"] == "ready" for card in cards.values())
            r = c.post("/v1/completions", json={"model": "hot", "prompt": "hi", "max_tokens": 2})
            assert r.status_code == 200, r.text
    finally:
        stop.set()
        server.kill()
        server.wait(30)
    left = [p for p in (tmp_path / "store").rglob("*") if p.is_file() and p.name not in CONTROL_FILES]
    assert len(left) == 2 * len(cards)  # one record and one tensor file per expert, no leftovers
