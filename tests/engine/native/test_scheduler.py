"""Scheduler: admission by priority then FIFO into contiguous slots, grouped admissions while decoding,
compaction; and the engine's waiting count."""
from __future__ import annotations

from engine.contract import BACKGROUND, SamplingParams
from engine.native.scheduler import Scheduler
from engine.native.sequence import Sequence, Status


def seq(i: int, n: int = 4) -> Sequence:
    return Sequence(f"r{i}", list(range(n)), SamplingParams(), None, detok=None)


def test_admission_is_grouped_while_decoding_but_never_starves():
    moves = []
    s = Scheduler(8, 10_000, lambda a, b, n: moves.append((a, b)), admit_batch=3, admit_max_delay=2)
    first = [seq(i) for i in range(8)]
    for q in first:
        s.add(q)
    assert s.admit() == first  # an idle engine admits at once
    assert [q.slot for q in first] == list(range(8))
    for i in range(8, 12):
        s.add(seq(i))
    s.finish(first[2])  # one free slot: wait for a group of 3 ...
    assert moves == [(7, 2)] and first[7].slot == 2 and s.running[2] is first[7]
    assert s.admit() == [] and s.admit() == []
    got = s.admit()  # ... but not longer than admit_max_delay steps
    assert [q.request_id for q in got] == ["r8"] and got[0].slot == 7
    for q in (first[0], first[1], first[3]):
        s.finish(q)
    got = s.admit()  # three free slots: admitted at once, FIFO, contiguous
    assert [q.request_id for q in got] == ["r9", "r10", "r11"]
    assert sorted(q.slot for q in s.running) == list(range(8))
    assert all(s.running[i].slot == i and s.running[i].status is Status.RUNNING for i in range(8))


def test_prefill_budget_limits_a_group_but_admits_one_long_prompt():
    s = Scheduler(8, 10, lambda *a: None)
    for i, n in enumerate([12, 4, 4]):
        s.add(seq(i, n))
    assert [q.request_id for q in s.admit()] == ["r0"]  # longer than the budget, still admitted alone
    assert [q.request_id for q in s.admit()] == ["r1", "r2"]


def test_users_are_admitted_before_background_work_each_in_arrival_order():
    s = Scheduler(2, 10_000, lambda *a: None)
    background = [Sequence(f"b{i}", [1, 2], SamplingParams(), None, detok=None, priority=BACKGROUND) for i in range(3)]
    for b in background:
        s.add(b)
    s.add(seq(0))
    s.add(seq(1))
    assert [q.request_id for q in s.admit()] == ["r0", "r1"]  # the users first, though they came last
    s.finish(s.running[0])
    s.finish(s.running[0])
    assert [q.request_id for q in s.admit()] == ["b0", "b1"]  # then background work, FIFO


def test_waiting_counts_requests_not_queued_aborts():
    """The engine's waiting count (t2_requests_waiting) is requests accepted and not yet running; the
    abort messages that share the engine thread's inbox are not requests."""
    import asyncio

    from engine.native.async_engine import AsyncEngine

    class Idle:  # the parts of LLMEngine the asyncio side reads before its thread runs
        tokenizer, config, eos_token_ids, model = None, type("C", (), {"max_model_len": 64, "max_num_seqs": 2}), [], None
        runner = type("R", (), {"adapt": None})

        def stats(self):
            return {"running": 0, "waiting": 0}

    engine = AsyncEngine(Idle(), "tiny")

    async def aborts():
        for i in range(5):
            await engine.abort(f"gone-{i}")

    asyncio.run(aborts())
    assert engine.stats()["waiting"] == 0


def test_background_work_never_shares_a_step_with_users_and_is_budgeted_while_they_run():
    s = Scheduler(8, 1000, lambda *a: None, background_prefill_tokens=10)
    for i in range(3):
        s.add(Sequence(f"b{i}", [1, 2, 3, 4], SamplingParams(), None, detok=None, priority=BACKGROUND))
    s.add(seq(0))
    assert [q.request_id for q in s.admit()] == ["r0"]  # no background prefill in the users' step
    assert [q.request_id for q in s.admit()] == ["b0", "b1"]  # then 10 tokens of it per step while r0 runs
    assert [q.request_id for q in s.admit()] == ["b2"]
