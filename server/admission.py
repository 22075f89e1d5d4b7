"""Fair admission: each client (its network address) holds at most a share of the engine's slots and of
its queue, so one client's flood of sequences slows others but never locks them out.

A client's sequences enter the engine while it has fewer than ``slots`` there (running or queued in the
engine); the rest wait here, in the client's own line (FIFO), for one of its sequences to end. Beyond
``slots + queue`` sequences held, its new requests are refused (429) at once, whatever other clients do;
and all clients together keep at most ``total_queue`` sequences waiting here (the engine's own queue
limit applies to what enters it)."""
from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass, field


class ClientBusyError(Exception):
    """The client already holds as many sequences as it may (HTTP 429)."""


@dataclass
class _Client:
    held: int = 0  # sequences accepted and not yet ended (in the engine or waiting here)
    entered: int = 0  # of those, the ones handed to the engine
    line: deque = field(default_factory=deque)  # futures of this client's sequences waiting to enter


def client_limits(share: float, max_num_seqs: int, max_waiting: int) -> tuple[int, int, int]:
    """(engine places, waiting places) one client may hold: ``share`` of each, at least one engine place;
    and the waiting places of all clients together."""
    return max(1, math.floor(share * max_num_seqs)), math.ceil(share * max_waiting), max_waiting


class ClientGate:
    def __init__(self, slots: int, queue: int, total_queue: int | None = None):
        self.slots = slots  # sequences of one client in the engine at once
        self.queue = queue  # more sequences of one client waiting here, beyond those
        self.total_queue = queue if total_queue is None else total_queue  # of all clients waiting here
        self._clients: dict[str, _Client] = {}

    @property
    def most(self) -> int:
        """The most sequences one request may make: more could never be held at once."""
        return self.slots + self.queue

    def reserve(self, client: str, count: int) -> None:
        """Count ``count`` new sequences of ``client`` as held, or raise ``ClientBusyError``."""
        c = self._clients.setdefault(client, _Client())
        waiting = sum(max(0, o.held - self.slots) for o in self._clients.values())
        more = max(0, c.held + count - self.slots) - max(0, c.held - self.slots)  # of these, the ones to wait
        if c.held + count > self.most or waiting + more > self.total_queue:
            if c.held == 0:
                del self._clients[client]
            if c.held + count > self.most:
                raise ClientBusyError(f"this client holds {c.held} sequence(s) and asks for {count} more; a client "
                                      f"may hold {self.most} at a time ({self.slots} generating)")
            raise ClientBusyError(f"{waiting} sequences are waiting for their clients' share of the slots")
        c.held += count

    def try_enter(self, client: str) -> bool:
        """Take an engine place for one of ``client``'s held sequences if one is free and none waits before it."""
        c = self._clients[client]
        if c.line or c.entered >= self.slots:
            return False
        c.entered += 1
        return True

    async def enter(self, client: str) -> None:
        """Wait, in the client's line, for an engine place."""
        if self.try_enter(client):
            return
        c = self._clients[client]
        waiter = asyncio.get_running_loop().create_future()
        c.line.append(waiter)
        try:
            await waiter  # resolved by ``leave`` with the place already taken for it
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # given a place just as it was cancelled
                c.entered -= 1
                self._wake(c)
            elif waiter in c.line:
                c.line.remove(waiter)
            raise

    def leave(self, client: str, entered: bool) -> None:
        """One held sequence of ``client`` has ended (``entered``: it had an engine place)."""
        c = self._clients[client]
        c.held -= 1
        if entered:
            c.entered -= 1
            self._wake(c)
        if c.held == 0:
            del self._clients[client]

    def _wake(self, c: _Client) -> None:
        while c.line and c.entered < self.slots:
            waiter = c.line.popleft()
            if not waiter.done():
                c.entered += 1
                waiter.set_result(None)

    def stats(self) -> dict:
        return {"clients": len(self._clients), "waiting": sum(c.held - c.entered for c in self._clients.values())}
