"""The experts a running server can apply, by name.

Request handlers read it (many threads/tasks); the store writes to it. Entries are replaced whole, so a
reader sees either the old expert or the new one, never a half-updated one.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from adapters.adaptation import SVFExpert


@dataclass(frozen=True)
class ExpertEntry:
    expert: SVFExpert
    meta: dict[str, Any] = field(default_factory=dict)  # kind, category, created, sha256, ...

    @property
    def name(self) -> str:
        return self.expert.name


class ExpertRegistry:
    def __init__(self):
        self._lock = threading.Lock()
        self._entries: dict[str, ExpertEntry] = {}

    def put(self, expert: SVFExpert, meta: dict[str, Any] | None = None) -> None:
        with self._lock:
            self._entries = {**self._entries, expert.name: ExpertEntry(expert, dict(meta or {}))}

    def remove(self, name: str) -> bool:
        with self._lock:
            if name not in self._entries:
                return False
            self._entries = {k: v for k, v in self._entries.items() if k != name}
            return True

    def get(self, name: str) -> ExpertEntry | None:
        return self._entries.get(name)

    def entries(self) -> list[ExpertEntry]:
        return sorted(self._entries.values(), key=lambda e: e.name)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)
