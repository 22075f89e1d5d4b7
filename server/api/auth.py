"""API keys. Inference routes require ``T2_API_KEY`` when one is set (``Authorization: Bearer <key>``);
managing experts (upload, delete, download) requires ``T2_ADMIN_API_KEY`` when one is set: the inference
key then gets 403. Reading the expert list takes either key. Keys are compared in constant time."""
from __future__ import annotations

import hmac

from fastapi import Request

from server.api.state import server_state
from server.errors import APIError


def _token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _is(token: str | None, key: str | None) -> bool:
    # compare_digest: the time taken must not reveal how much of a guessed key was right.
    return bool(key) and token is not None and hmac.compare_digest(token.encode(), key.encode())


def _unauthorized(token: str | None) -> APIError:
    message = "Missing API key: send 'Authorization: Bearer <key>'." if token is None else "Incorrect API key provided."
    return APIError(401, message, code="invalid_api_key")


def require_api_key(request: Request) -> None:
    expected = server_state(request).settings.api_key
    if not expected:
        return
    token = _token(request)
    if not _is(token, expected):
        raise _unauthorized(token)


def require_admin_key(request: Request) -> None:
    """Managing experts: the admin key if one is configured, else whatever inference needs."""
    settings = server_state(request).settings
    if not settings.admin_api_key:
        return require_api_key(request)
    token = _token(request)
    if _is(token, settings.admin_api_key):
        return
    if _is(token, settings.api_key):
        raise APIError(403, "This key may run inference but not manage experts: uploading and deleting experts "
                       "need the admin key.", type="permission_error", code="admin_key_required")
    raise _unauthorized(token)


def require_read_key(request: Request) -> None:
    """Listing experts: the inference key or the admin key (nothing, when no inference key is set)."""
    settings = server_state(request).settings
    if not settings.api_key:
        return
    token = _token(request)
    if not (_is(token, settings.api_key) or _is(token, settings.admin_api_key)):
        raise _unauthorized(token)
