"""Moves sequences between waiting, running and finished. Decides who joins the batch each step and
which KV slot each running sequence holds; never touches tensors (slot moves are requested from the
cache through the `move` callback)."""
from __future__ import annotations

from collections import deque
from typing import Callable

from engine.native.sequence import Sequence, Status


class Scheduler:
    def __init__(self, max_num_seqs: int, max_prefill_tokens: int, move_slot: Callable[[int, int, int], None],
                 admit_batch: int = 1, admit_max_delay: int = 0, background_prefill_tokens: int | None = None):
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        # Background work (priority > 0) is admitted only in steps that admit no user request, and at most
        # this many of its prompt tokens per step (one longer prompt alone, when nothing else runs): a user
        # who arrives meanwhile waits for at most one such short step. Its tokens are dearer than users'
        # (every row its own mixture, scored over the whole continuation), hence the small share.
        self.background_prefill_tokens = (max_prefill_tokens // 16 if background_prefill_tokens is None
                                          else background_prefill_tokens)
        self.admit_batch = admit_batch  # while decoding, wait for this many free slots before a prefill ...
        self.admit_max_delay = admit_max_delay  # ... but never for more than this many steps
        self._delayed = 0
        self._move_slot = move_slot  # (src, dst, length): copy a sequence's cache into another slot
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # running[i].slot == i, always

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def _next(self) -> Sequence:
        """The waiting sequence to admit next: the first of the lowest priority value (users before
        background work, each in arrival order)."""
        return min(self.waiting, key=lambda s: s.priority)

    def admit(self) -> list[Sequence]:
        """Move waiting sequences into free slots (by priority, then FIFO) within the prefill token budget.

        The first sequence chosen is always admitted when a slot is free, whatever its length, so a long
        prompt cannot starve. Admitted sequences take slots len(running).. contiguously.
        """
        free = self.max_num_seqs - len(self.running)
        if not self.waiting or free == 0:
            return []
        # A prefill is a forward of its own on top of the step's decode forward; where a step's cost is
        # mostly fixed overhead (small models on a GPU) admitting one sequence per step would nearly double
        # the step count. So while a batch is decoding, newcomers are admitted in groups.
        want = min(len(self.waiting), self.admit_batch)
        if self.running and free < want and self._delayed < self.admit_max_delay:
            self._delayed += 1
            return []
        self._delayed = 0
        new: list[Sequence] = []
        budget, background = self.max_prefill_tokens, self.background_prefill_tokens
        busy = bool(self.running)
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self._next()
            n = len(seq.prompt_ids)
            if seq.priority > 0:
                if any(s.priority == 0 for s in new) or (n > background and (new or busy)):
                    break
                background -= n
            if new and n > budget:
                break
            self.waiting.remove(seq)
            seq.status, seq.slot = Status.RUNNING, len(self.running)
            self.running.append(seq)
            new.append(seq)
            budget -= n
        return new

    def finish(self, seq: Sequence) -> None:
        """Take `seq` out (finished or aborted), freeing its slot by moving the last running sequence in."""
        if seq.status is Status.WAITING:
            self.waiting.remove(seq)
        elif seq.status is Status.RUNNING:
            last = self.running.pop()
            if last is not seq:
                self._move_slot(last.slot, seq.slot, last.num_cached)
                last.slot = seq.slot
                self.running[seq.slot] = last
        seq.status, seq.slot = Status.FINISHED, -1

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
