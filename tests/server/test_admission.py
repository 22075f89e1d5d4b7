"""The client gate alone: each client's engine places and waiting places, its line in arrival order, places
given back by sequences that end or leave the line, and the waiting places of all clients together."""
from __future__ import annotations

import asyncio

import pytest

from server.admission import ClientBusyError, ClientGate, client_limits


def test_limits_are_shares_of_the_slots_and_the_queue():
    assert client_limits(0.75, 32, 256) == (24, 192, 256)
    assert client_limits(0.5, 1, 1) == (1, 1, 1)  # at least one engine place
    assert client_limits(1.0, 8, 0) == (8, 0, 0)


def test_a_client_beyond_its_share_waits_in_line_and_beyond_its_queue_is_refused():
    async def main():
        gate = ClientGate(slots=2, queue=2, total_queue=3)
        gate.reserve("a", 3)
        assert gate.try_enter("a") and gate.try_enter("a") and not gate.try_enter("a")
        third = asyncio.create_task(gate.enter("a"))
        await asyncio.sleep(0)
        assert not third.done()
        gate.reserve("b", 2)  # another client: its own places, free at once
        assert gate.try_enter("b") and gate.try_enter("b")
        with pytest.raises(ClientBusyError, match="may hold 4"):
            gate.reserve("a", 2)  # 3 + 2 > 2 + 2
        gate.reserve("a", 1)
        fifth = asyncio.create_task(gate.enter("a"))
        gate.reserve("b", 1)  # the third waiting place of all clients together
        with pytest.raises(ClientBusyError, match="waiting"):
            gate.reserve("c", 3)  # c would wait for one: none left
        gate.leave("a", entered=True)  # one of a's ends: the first in a's line enters
        await asyncio.sleep(0)
        assert third.done() and not fifth.done()
        fifth.cancel()  # leaving the line gives nothing back twice
        await asyncio.gather(fifth, return_exceptions=True)
        gate.leave("a", entered=False)
        assert gate.stats() == {"clients": 2, "waiting": 1}  # b's third
        for _ in range(2):
            gate.leave("a", entered=True)
        for _ in range(2):
            gate.leave("b", entered=True)
        gate.leave("b", entered=False)
        assert gate.stats() == {"clients": 0, "waiting": 0}

    asyncio.run(main())
