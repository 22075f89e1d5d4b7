"""Handoff: outputs cross from an engine thread to the callers' loops in order, batched, and never to a closed
loop."""
import asyncio
import threading

from engine.contract import Handoff, RequestOutput


def _out(rid: str, i: int, last: bool) -> RequestOutput:
    return RequestOutput(rid, [i], str(i), last, "length" if last else None)


def test_each_stream_gets_its_outputs_in_order_with_fewer_wake_ups_than_outputs():
    handoff, streams, tokens = Handoff(), 64, 50
    wakes = []

    async def main():
        loop = asyncio.get_running_loop()
        queues = [asyncio.Queue() for _ in range(streams)]
        original = loop.call_soon_threadsafe

        def counted(cb, *args, **kw):
            wakes.append(cb)
            return original(cb, *args, **kw)

        loop.call_soon_threadsafe = counted

        def engine_thread():  # one step: a token for every stream
            for t in range(tokens):
                for s, q in enumerate(queues):
                    handoff.put(loop, q, _out(f"r{s}", t, t == tokens - 1))

        async def consume(q):
            got = []
            while not got or not got[-1].finished:
                got.append(await q.get())
            return [o.token_ids[0] for o in got], {o.request_id for o in got}

        thread = threading.Thread(target=engine_thread)
        thread.start()
        results = await asyncio.wait_for(asyncio.gather(*(consume(q) for q in queues)), 30)
        thread.join()
        return results

    results = asyncio.run(main())
    for s, (ids, rids) in enumerate(results):
        assert ids == list(range(tokens)) and rids == {f"r{s}"}
    assert 1 <= len(wakes) < streams * tokens


def test_a_closed_loop_drops_its_outputs_and_others_still_get_theirs():
    handoff = Handoff()
    dead = asyncio.new_event_loop()
    dead_q = asyncio.Queue()
    dead.close()
    handoff.put(dead, dead_q, _out("gone", 0, True))  # no error: nobody listens there any more
    assert dead_q.empty()

    async def main():
        q = asyncio.Queue()
        threading.Thread(target=handoff.put, args=(asyncio.get_running_loop(), q, _out("live", 1, True))).start()
        return await asyncio.wait_for(q.get(), 10)

    assert asyncio.run(main()).request_id == "live"
