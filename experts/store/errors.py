"""Why an expert was refused, as a plain exception the HTTP edge turns into the OpenAI error shape.

``ExpertError`` carries the HTTP status and a stable ``code`` (clients branch on codes, not messages), so
nothing in ``experts/`` imports the web layer. ``param`` names the part of the request at fault:
``name``, ``metadata`` (or one of its fields), ``tensors`` (the uploaded file or the JSON ``z``).
"""
from __future__ import annotations


class ExpertError(ValueError):
    def __init__(self, message: str, *, code: str = "invalid_expert", status: int = 400, param: str | None = None):
        super().__init__(message)
        self.message, self.code, self.status, self.param = message, code, status, param


def not_found(name: str) -> ExpertError:
    return ExpertError(f"No expert named {name!r}.", code="expert_not_found", status=404, param="name")


def bad_tensors(message: str, code: str = "invalid_tensors") -> ExpertError:
    return ExpertError(message, code=code, param="tensors")


def bad_metadata(message: str, param: str = "metadata") -> ExpertError:
    return ExpertError(message, code="invalid_metadata", param=param)
