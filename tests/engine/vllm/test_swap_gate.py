"""The swap gate in front of vLLM, with a fake executor: requests only ever run on their own weights,
swaps happen only with nothing running, groups are served oldest first, failures are contained."""
from __future__ import annotations

import asyncio
import random

import pytest

from engine.contract import EngineDeadError
from engine.vllm.swap_gate import SwapError, WeightGate


class FakeExecutor:
    """Holds one set of weights; records swaps and any request that saw foreign or changing weights."""

    def __init__(self, delay: float = 0.01, fail: set | None = None):
        self.loaded = None
        self.running = 0
        self.swaps: list = []
        self.violations: list[str] = []
        self.delay, self.fail = delay, fail or set()

    async def load(self, key, weights):
        if self.running:
            self.violations.append(f"swap to {key} while {self.running} requests run")
        self.loaded = "?"  # half-swapped until the load completes
        await asyncio.sleep(self.delay)
        if key in self.fail:
            raise RuntimeError(f"cannot load {key}")
        assert weights == (None if key is None else f"weights of {key}")
        self.loaded = key
        self.swaps.append(key)

    async def run(self, gate: WeightGate, key, steps: int = 3, step: float = 0.002):
        async with gate.admitted(key, None if key is None else f"weights of {key}"):
            self.running += 1
            try:
                for _ in range(steps):
                    if self.loaded != key:
                        self.violations.append(f"request of {key} ran on {self.loaded}")
                    await asyncio.sleep(step)
            finally:
                self.running -= 1
        return key


async def gate_held_by_base(ex: FakeExecutor):
    """A gate (no quantum) with one base request admitted and held until the returned event is set."""
    gate = WeightGate(ex.load, quantum=0.0)
    hold = asyncio.Event()

    async def held():
        async with gate.admitted(None):
            await hold.wait()

    first = asyncio.create_task(held())
    await asyncio.sleep(0)
    return gate, first, hold


def test_random_traffic_never_runs_on_foreign_weights():
    async def main():
        ex = FakeExecutor(delay=0.003)
        gate = WeightGate(ex.load, quantum=0.02)
        rng = random.Random(0)
        tasks = []
        for _ in range(300):
            key = rng.choice([None, None, "a", "b", "c"])
            tasks.append(asyncio.create_task(ex.run(gate, key, steps=rng.randint(1, 4))))
            await asyncio.sleep(rng.random() * 0.003)
        done = await asyncio.gather(*tasks)
        return ex, gate, done

    ex, gate, done = asyncio.run(main())
    assert ex.violations == []
    assert len(done) == 300 and gate.active == 0 and gate.waiting == 0
    assert gate.swaps == len(ex.swaps) and 3 <= gate.swaps < 150  # grouped: far fewer swaps than requests


def test_loaded_group_is_admitted_at_once_and_stops_growing_after_the_quantum():
    async def main():
        t = [0.0]
        ex = FakeExecutor(delay=0)
        gate = WeightGate(ex.load, quantum=1.0, clock=lambda: t[0])
        hold = asyncio.Event()

        async def held(key):
            async with gate.admitted(key, None if key is None else f"weights of {key}"):
                await hold.wait()
            return key

        base1 = asyncio.create_task(held(None))
        await asyncio.sleep(0)
        assert gate.active == 1
        a = asyncio.create_task(held("a"))
        await asyncio.sleep(0)
        assert gate.waiting == 1  # "a" waits for the base group to drain
        base2 = asyncio.create_task(held(None))
        await asyncio.sleep(0)
        assert gate.active == 2  # within the quantum, the loaded group still grows
        t[0] = 1.5
        base3 = asyncio.create_task(held(None))
        await asyncio.sleep(0)
        assert gate.active == 2 and gate.waiting == 2  # past it, new base requests queue behind "a"
        hold.set()
        await asyncio.gather(base1, base2, a, base3)
        return ex

    ex = asyncio.run(main())
    assert ex.swaps == ["a", None] and ex.violations == []


def test_oldest_waiting_group_goes_first():
    async def main():
        ex = FakeExecutor(delay=0)
        gate, first, hold = await gate_held_by_base(ex)
        order = []

        async def req(key):
            async with gate.admitted(key, f"weights of {key}"):
                order.append(key)

        tasks = []
        for key in ["b", "a", "b", "c", "a"]:
            tasks.append(asyncio.create_task(req(key)))
            await asyncio.sleep(0.001)
        hold.set()
        await asyncio.gather(first, *tasks)
        return ex, order

    ex, order = asyncio.run(main())
    assert ex.swaps == ["b", "a", "c"]  # by the arrival of each group's oldest request
    assert order == ["b", "b", "a", "a", "c"]


def test_failed_swap_fails_its_group_and_restores_the_base():
    async def main():
        ex = FakeExecutor(delay=0, fail={"bad"})
        gate = WeightGate(ex.load, quantum=0.0)
        results = await asyncio.gather(ex.run(gate, "bad"), ex.run(gate, "bad"), ex.run(gate, "good"),
                                       return_exceptions=True)
        after = await ex.run(gate, None)
        return ex, gate, results, after

    ex, gate, results, after = asyncio.run(main())
    assert [type(r) for r in results[:2]] == [SwapError, SwapError] and results[2] == "good"
    assert after is None and gate.dead is None and ex.violations == []
    assert ex.swaps[0] is None  # the base weights were loaded back first


def test_failed_restore_kills_the_gate():
    async def main():
        ex = FakeExecutor(delay=0, fail={"bad", None})
        gate = WeightGate(ex.load, quantum=0.0)
        r = await asyncio.gather(ex.run(gate, "bad"), return_exceptions=True)
        with pytest.raises(EngineDeadError):
            await ex.run(gate, None)
        return gate, r

    gate, r = asyncio.run(main())
    assert isinstance(r[0], SwapError) and gate.dead is not None


def test_cancelled_waiter_leaves_no_trace():
    async def main():
        ex = FakeExecutor(delay=0)
        gate, first, hold = await gate_held_by_base(ex)
        waiter = asyncio.create_task(ex.run(gate, "a"))
        await asyncio.sleep(0)
        assert gate.waiting == 1
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert gate.waiting == 0
        hold.set()
        await first
        return ex, gate

    ex, gate = asyncio.run(main())
    assert ex.swaps == [] and gate.active == 0  # nobody wanted "a" any more: no swap
