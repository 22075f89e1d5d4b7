"""What the reliability suite shares: its budget (how long and how hard each part runs, from the
environment) and its report (the figures every part adds, written as JSON and printed at the end).

Budget variables (defaults keep the whole suite within a few minutes on 2 CPU cores):
    T2_REL_LOAD_SECONDS    measured load phase, after a warm-up phase as long     (default 8)
    T2_REL_CLIENTS         concurrent load clients                                (default 8)
    T2_REL_CHURN_OPS       expert uploads/replacements/deletions attempted        (default 2500)
    T2_REL_FUZZ_EXAMPLES   fuzzed cases per API operation and generation mode     (default 10)
    T2_REL_KILL_CYCLES     SIGKILL/restart cycles of a real server under writes   (default 3)
    T2_REL_REPORT          where the JSON report goes (default: pytest's temporary folder)
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


@dataclass(frozen=True)
class Budget:
    load_seconds: float
    clients: int
    churn_ops: int
    fuzz_examples: int
    kill_cycles: int

    @classmethod
    def from_env(cls) -> "Budget":
        return cls(load_seconds=float(_env_int("T2_REL_LOAD_SECONDS", 8)), clients=_env_int("T2_REL_CLIENTS", 8),
                   churn_ops=_env_int("T2_REL_CHURN_OPS", 2500), fuzz_examples=_env_int("T2_REL_FUZZ_EXAMPLES", 10),
                   kill_cycles=_env_int("T2_REL_KILL_CYCLES", 3))


# Figures every run reports, even when the part that adds them did not run (so a reader sees the zero).
HEADLINE = ("load.requests_served", "load.disconnects", "load.rejected_429", "overload.rejected_429",
            "churn.ops", "churn.requests", "faults.injected", "faults.survived", "fuzz.cases", "hostile.cases",
            "lost_writes", "http_5xx")


class Report:
    """Counters and values by dotted name ("load.disconnects"); thread-safe, one per test session."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.values: dict[str, float | str] = {}
        self.started = time.time()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def set(self, name: str, value: float | str) -> None:
        with self._lock:
            self.values[name] = value

    def figures(self) -> dict[str, float | int | str]:
        with self._lock:
            out: dict[str, float | int | str] = {name: 0 for name in HEADLINE}
            out.update(self.counts)
            out.update(self.values)
        return dict(sorted(out.items()))

    @property
    def used(self) -> bool:
        return bool(self.counts or self.values)

    def write(self, path: Path, budget: Budget) -> None:
        data = {"figures": self.figures(), "budget": budget.__dict__,
                "seconds": round(time.time() - self.started, 1)}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1) + "\n")

    def summary_lines(self) -> list[str]:
        figures = self.figures()
        width = max(len(k) for k in figures)
        return [f"{k:<{width}}  {v}" for k, v in figures.items()]


REPORT = Report()
BUDGET = Budget.from_env()
