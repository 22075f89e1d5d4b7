"""The adapter cache: one build per distinct key, LRU within its bound, never evicting what is in use,
ids never reused, failures and departed callers handled."""
from __future__ import annotations

import asyncio
import threading

import pytest

from engine.vllm.adapter_cache import AdapterCache


class Builder:
    def __init__(self, delay: float = 0.0, fail: set | None = None):
        self.built: list[str] = []
        self.delay, self.fail = delay, fail or set()
        self.release = threading.Event()
        self.release.set()

    def __call__(self, key):
        def build(path):
            self.release.wait(5)
            if key in self.fail:
                raise ValueError(f"bad adapter {key}")
            path.mkdir(parents=True)
            (path / "adapter_config.json").write_text("{}")
            self.built.append(key)
            return {"key": key}
        return build


def test_concurrent_requests_share_one_build_and_ids_are_unique(tmp_path):
    async def main():
        b = Builder()
        b.release.clear()
        cache = AdapterCache(tmp_path, capacity=4)
        tasks = [asyncio.create_task(cache.acquire(k, b(k))) for k in ["x", "x", "y", "x"]]
        await asyncio.sleep(0.05)
        b.release.set()
        got = await asyncio.gather(*tasks)
        return b, cache, got

    b, cache, got = asyncio.run(main())
    assert sorted(b.built) == ["x", "y"] and cache.builds == 2
    assert got[0] is got[1] is got[3] and got[0].refs == 3 and got[2].refs == 1
    assert got[0].lora_id != got[2].lora_id and got[0].info == {"key": "x"}
    assert got[0].path.is_dir() and got[0].name == f"t2-{got[0].lora_id}"


def test_lru_eviction_keeps_entries_in_use_and_never_reuses_ids(tmp_path):
    evicted = []

    async def on_evict(a):
        evicted.append(a.key)

    async def main():
        b = Builder()
        cache = AdapterCache(tmp_path, capacity=2, on_evict=on_evict)
        a1 = await cache.acquire("a", b("a"))
        for k in ["b", "c"]:
            await cache.release(await cache.acquire(k, b(k)))
        assert "a" in cache and "b" not in cache and "c" in cache  # "a" is in use: "b" went
        d = await cache.acquire("d", b("d"))
        assert "c" not in cache and len(cache) == 2
        await cache.acquire("e", b("e"))
        assert len(cache) == 3  # over the bound while "a", "d" and "e" are in use
        await cache.release(a1)
        assert "a" not in cache and len(cache) == 2
        again = await cache.acquire("a", b("a"))  # built anew, under a new id
        return a1, again, d, cache

    a1, again, d, cache = asyncio.run(main())
    assert evicted == ["b", "c", "a"]
    assert again.lora_id > d.lora_id > a1.lora_id and not a1.path.exists()
    with pytest.raises(RuntimeError):
        asyncio.run(cache.release(a1))


def test_failed_build_leaves_nothing_and_a_gone_caller_keeps_the_build(tmp_path):
    async def main():
        b = Builder(fail={"bad"})
        cache = AdapterCache(tmp_path, capacity=4)
        with pytest.raises(ValueError):
            await cache.acquire("bad", b("bad"))
        assert "bad" not in cache and list(tmp_path.glob("adapter-*")) == []
        b.release.clear()
        caller = asyncio.create_task(cache.acquire("slow", b("slow")))
        await asyncio.sleep(0.05)
        caller.cancel()
        await asyncio.gather(caller, return_exceptions=True)
        b.release.set()
        for _ in range(100):
            if "slow" in cache:
                break
            await asyncio.sleep(0.01)
        return cache

    cache = asyncio.run(main())
    assert "slow" in cache and cache.get("slow").refs == 0  # built once, kept for the next request


def test_folders_of_engines_whose_process_is_gone_are_removed(tmp_path):
    import os

    from engine.vllm.engine import remove_stale_runs

    gone, mine = tmp_path / "run-999999999-abc", tmp_path / f"run-{os.getpid()}-abc"
    for d in (gone, mine):
        (d / "adapters").mkdir(parents=True)
    remove_stale_runs(tmp_path)
    assert not gone.exists() and mine.exists()
