"""One expert as the store holds it in memory: its current record, whether it is served, and what is served."""
from __future__ import annotations

from dataclasses import dataclass, field

from adapters.adaptation import SVFExpert
from adapters.sapt import SAPTBundle
from experts.store.records import ExpertRecord
from experts.store.validation import PreparedExpert


@dataclass(frozen=True)
class StoredExpert:
    record: ExpertRecord
    status: str = "ready"  # ready | incompatible (does not fit the served model) | unavailable (mixture parts)
    reason: str | None = None  # why it is not ready
    payload: SVFExpert | SAPTBundle | None = None  # what is served: svf and mixture -> SVFExpert, sapt -> bundle
    prepared: PreparedExpert | None = field(default=None, repr=False)  # mixtures: to re-mix when parts change

    def __post_init__(self):
        if self.payload is not None and self.status == "ready":
            self.payload.freeze()  # served weights never change in place: their keys are computed once

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def ready(self) -> bool:
        return self.status == "ready"
