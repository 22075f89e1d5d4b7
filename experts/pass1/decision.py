"""What pass 1 hands to pass 2 and to the response: a ``Decision``, or an ``AdaptationError`` saying why
a request's adaptation cannot be decided (the HTTP edge answers it in the OpenAI error shape)."""
from __future__ import annotations

from dataclasses import dataclass, field

from adapters.adaptation import Adaptation


@dataclass
class Decision:
    strategy: str
    adaptation: Adaptation | None = None  # None: the base weights
    chosen: str | list[str] | None = None  # the category pass 1 chose (or the explicit expert names)
    expert: str | None = None  # the expert applied; None = base weights
    weights: dict[str, float] = field(default_factory=dict)  # category probabilities or mixture α
    pass1_ms: float = 0.0

    def info(self) -> dict:
        return {"strategy": self.strategy, "chosen": self.chosen, "expert": self.expert, "weights": self.weights,
                "pass1_ms": round(self.pass1_ms, 3)}


class AdaptationError(ValueError):
    """A request's adaptation cannot be decided. ``status``, ``code`` and ``param`` are what the HTTP edge
    answers (clients branch on ``code``)."""

    def __init__(self, message: str, *, code: str = "invalid_value", param: str = "adaptation", status: int = 400,
                 retry_after: float | None = None):
        super().__init__(message)
        self.message, self.code, self.param, self.status = message, code, param, status
        self.retry_after = retry_after  # seconds (503: when to try again)


def model_not_found(name: str) -> AdaptationError:
    return AdaptationError(f"The model `{name}` does not exist or you do not have access to it.",
                           code="model_not_found", param="model", status=404)
