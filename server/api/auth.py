"""The optional API key (``T2_API_KEY``): inference routes require ``Authorization: Bearer <key>``."""
from __future__ import annotations

import hmac

from fastapi import Request

from server.api.state import server_state
from server.errors import APIError


def require_api_key(request: Request) -> None:
    expected = server_state(request).settings.api_key
    if not expected:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # compare_digest: the time taken must not reveal how much of a guessed key was right.
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        message = ("Missing API key: send 'Authorization: Bearer <key>'." if not token
                   else "Incorrect API key provided.")
        raise APIError(401, message, code="invalid_api_key")
