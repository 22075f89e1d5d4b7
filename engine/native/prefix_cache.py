"""KV of shared prompt prefixes (a classification prompt's instructions, a system prompt), computed
once and copied into each new sequence's slot instead of being recomputed by every prefill.

Entries are keyed by the prefix tokens and the adaptation the KV was computed under (an expert applied
in pass 1 changes the keys and values). Bounded LRU.
"""
from __future__ import annotations

from collections import OrderedDict

import torch


class PrefixCache:
    def __init__(self, max_entries: int = 16):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(prefix_ids: list[int], adaptation) -> tuple | None:
        if adaptation is not None and (getattr(adaptation, "requires_grad", False) or not hasattr(adaptation, "key")):
            return None  # being trained: its KV changes with every step
        return (None if adaptation is None else adaptation.key, tuple(prefix_ids))

    def get(self, key) -> tuple[torch.Tensor, torch.Tensor] | None:
        hit = self._entries.get(key) if key is not None else None
        if hit is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return hit

    def put(self, key, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (layers, kv_heads, P, head_dim) copies (not views of the slot buffers)."""
        if key is None or self.max_entries <= 0:
            return
        self._entries[key] = (k, v)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
