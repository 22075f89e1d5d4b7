"""Several processes sharing one expert folder, at the store level: each ``ExpertStore`` below stands for
one process (one lock holder, one view). Writes through one are read by the others (``refresh`` and the
watcher thread), writers exclude each other across processes, version numbers never collide, writers
catch up before writing, and nothing half-written is ever published."""
from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import pytest
import torch

from adapters.atomic import write_temp
from experts.store.errors import ExpertError
from experts.store.expert_store import ExpertStore
from experts.store.validation import ExpertDraft
from experts.store.version_files import INCOMING
from experts.store.watcher import StoreWatcher
from tests.support import REPO_ROOT
from tests.support.experts import random_z

ROOT = REPO_ROOT


def svf(name: str, z) -> ExpertDraft:
    return ExpertDraft(name, "svf", dict(z))


def z_of(store: ExpertStore, name: str) -> dict[str, torch.Tensor]:
    return dict(store.registry.get(name).expert.z)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture()
def pair(tmp_path, base_mlp):
    """Two views of one folder, as two server processes have."""
    stores = [ExpertStore(tmp_path, base=base_mlp) for _ in range(2)]
    for s in stores:
        s.load()
    return stores


def test_writes_of_one_are_read_by_the_other(pair, base_mlp):
    a, b = pair
    assert b.refresh() is False  # nothing written: one small read, nothing else
    a.put(svf("math", random_z(base_mlp, 0)))
    assert "math" not in b.registry  # until it looks
    assert b.refresh() is True and same(z_of(b, "math"), random_z(base_mlp, 0))
    held = b.registry.get("math").expert  # what a request running on b holds
    a.put(svf("math", random_z(base_mlp, 1)))
    assert b.refresh() is True and same(z_of(b, "math"), random_z(base_mlp, 1))
    assert b.get("math").record == a.get("math").record  # version 2, same sha256
    assert same(dict(held.z), random_z(base_mlp, 0))  # the running request's copy is untouched
    a.delete("math")
    assert b.refresh() is True and "math" not in b.registry and b.get("math") is None
    assert b.refresh() is False


def test_mixtures_follow_their_parts(pair, base_mlp):
    a, b = pair
    a.put(svf("p", random_z(base_mlp, 0)))
    a.put(ExpertDraft("mix", "mixture", {"alpha": torch.tensor([0.5])}, experts=("p",)))
    b.refresh()
    assert b.get("mix").ready
    a.put(svf("p", random_z(base_mlp, 1)))  # a new version of the part: the mixture is re-mixed
    b.refresh()
    assert same(z_of(b, "mix"), z_of(a, "mix")) and not same(z_of(b, "mix"), z_of(b, "p"))
    a.delete("mix")
    a.delete("p")
    b.refresh()
    assert b.list() == [] and len(b.registry) == 0


def test_version_numbers_never_collide(pair, base_mlp):
    a, b = pair
    versions = [s.put(svf("x", random_z(base_mlp, i))).record.version for i, s in enumerate([a, b, a, b, b, a])]
    assert versions == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (a.root / "x").iterdir()) == ["v000006.json", "v000006.safetensors"]
    for s in pair:
        s.refresh()
        assert s.get("x").record.version == 6 and same(z_of(s, "x"), random_z(base_mlp, 5))


def test_a_writer_catches_up_before_writing(pair, base_mlp):
    a, b = pair
    a.put(svf("p", random_z(base_mlp, 0)))
    b.refresh()
    a.delete("p")  # b has not looked since
    with pytest.raises(ExpertError) as e:
        b.put(ExpertDraft("mix", "mixture", {"alpha": torch.tensor([1.0])}, experts=("p",)))
    assert e.value.code == "expert_not_found"
    with pytest.raises(ExpertError) as e:
        b.delete("p")
    assert e.value.status == 404
    assert "p" not in b.registry  # the write caught b up


def test_half_written_or_damaged_versions_are_never_published(pair, base_mlp):
    a, b = pair
    a.put(svf("x", random_z(base_mlp, 0)))
    b.refresh()
    a.put(svf("x", random_z(base_mlp, 1)))
    tensors = a.root / "x" / "v000002.safetensors"
    good = tensors.read_bytes()
    tensors.write_bytes(good[: len(good) // 2])  # as if b read it while it was being written
    b.refresh()
    assert b.get("x").record.version == 1 and same(z_of(b, "x"), random_z(base_mlp, 0))  # the old copy stays
    tensors.write_bytes(good)
    b.refresh()  # the generation did not move, but the unreadable version is read again
    assert b.get("x").record.version == 2 and same(z_of(b, "x"), random_z(base_mlp, 1))
    # A version being created (tensors in place, record not yet written) does not exist for readers.
    (a.root / "y").mkdir()
    (a.root / "y" / "v000001.safetensors").write_bytes(good)
    b.refresh(force=True)
    assert b.get("y") is None


LOCK_HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from experts.store.lock import StoreLock
    with StoreLock(sys.argv[1]).exclusive():
        print("locked", flush=True)
        time.sleep(600)
""").format(root=str(ROOT))


def test_writers_exclude_each_other_across_processes_and_a_dead_holder_frees_the_lock(tmp_path, base_mlp):
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        store = ExpertStore(tmp_path, base=base_mlp, lock_timeout=0.3)
        t0 = time.monotonic()
        with pytest.raises(ExpertError) as e:
            store.put(svf("x", random_z(base_mlp, 0)))
        assert e.value.status == 503 and e.value.code == "store_busy" and time.monotonic() - t0 >= 0.3
        assert not (tmp_path / "x").exists()
        holder.send_signal(signal.SIGKILL)  # a writer killed while holding the lock
        holder.wait(30)
        assert store.put(svf("x", random_z(base_mlp, 0))).record.version == 1
    finally:
        holder.kill()
        holder.wait(30)


def test_recovery_at_start_waits_for_a_writer_of_another_process(pair, tmp_path, base_mlp):
    a, _ = pair
    starting = ExpertStore(tmp_path, base=base_mlp, lock_timeout=0.1)  # a start waits past the timeout
    with a._lock.exclusive():  # a is in the middle of a write: its tensors are staged
        staged = write_temp(tmp_path / INCOMING, b"tensors", prefix="x.")
        loader = threading.Thread(target=starting.load)
        loader.start()
        loader.join(0.3)
        assert loader.is_alive() and staged.exists()  # recovery would remove them: it waits
        a.put(svf("x", random_z(base_mlp, 0)))
    loader.join(30)
    assert starting.get("x").ready and same(z_of(starting, "x"), random_z(base_mlp, 0))
    assert not staged.exists()  # what a writer left behind is removed once no writer runs


def wait_for(predicate, timeout: float = 10.0) -> float:
    """Seconds until ``predicate()`` held (fails the test after ``timeout``)."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            pytest.fail("condition never held")
        time.sleep(0.005)
    return time.monotonic() - t0


def test_the_watcher_publishes_and_drops_within_its_interval_and_frees_memory(pair, base_mlp):
    a, b = pair
    watcher = StoreWatcher(b, interval=0.1).start()
    try:
        a.put(svf("math", random_z(base_mlp, 0)))
        assert wait_for(lambda: "math" in b.registry) < 0.1 + 0.5
        gone = weakref.ref(b.registry.get("math").expert)
        a.delete("math")
        assert wait_for(lambda: "math" not in b.registry) < 0.1 + 0.5
        gc.collect()
        assert gone() is None  # the deleted expert's tensors left b's memory
    finally:
        watcher.stop()


def test_a_commit_never_announced_is_found_by_the_full_scan(pair, base_mlp, monkeypatch):
    a, b = pair
    monkeypatch.setattr(a, "_announce", lambda: 0)  # a writer killed between its commit and its announcement
    a.put(svf("x", random_z(base_mlp, 0)))
    watcher = StoreWatcher(b, interval=0.05, full_scan_every=0.3).start()
    try:
        waited = wait_for(lambda: "x" in b.registry)
        assert 0.2 < waited < 0.3 + 0.5
    finally:
        watcher.stop()


def test_watcher_survives_a_missing_folder(tmp_path, base_mlp):
    store = ExpertStore(tmp_path / "store", base=base_mlp)
    store.load()
    os.rename(tmp_path / "store", tmp_path / "away")  # a volume unmounted for a moment
    watcher = StoreWatcher(store, interval=0.02).start()
    try:
        time.sleep(0.1)
        os.rename(tmp_path / "away", tmp_path / "store")
        ExpertStore(tmp_path / "store", base=base_mlp).put(svf("x", random_z(base_mlp, 0)))
        wait_for(lambda: "x" in store.registry)
    finally:
        watcher.stop()
