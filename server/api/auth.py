"""API keys. Inference routes require ``T2_API_KEY`` when one is set (``Authorization: Bearer <key>``);
managing experts (upload, delete, download, few-shot and training jobs) requires ``T2_ADMIN_API_KEY`` when
one is set: the inference key then gets 403. Reading the expert list takes either key. Keys are compared
in constant time.

Requests that carry a body are checked from their headers before the body is read
(``middleware.AuthGate``, by ``key_for_route``); the routes' dependencies check again."""
from __future__ import annotations

import hmac
from typing import Literal

from fastapi import Request

from server.api.state import server_state
from server.config import Settings
from server.errors import APIError

# Routes that manage experts and jobs, for every method that carries a body (path prefixes).
ADMIN_PREFIXES = ("/v1/experts", "/v1/adaptations", "/v1/training")
BODY_METHODS = ("POST", "PUT", "PATCH", "DELETE")


def bearer_token(authorization: str) -> str | None:
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _token(request: Request) -> str | None:
    return bearer_token(request.headers.get("authorization", ""))


def _is(token: str | None, key: str | None) -> bool:
    # compare_digest: the time taken must not reveal how much of a guessed key was right.
    return bool(key) and token is not None and hmac.compare_digest(token.encode(), key.encode())


def _unauthorized(token: str | None) -> APIError:
    message = "Missing API key: send 'Authorization: Bearer <key>'." if token is None else "Incorrect API key provided."
    return APIError(401, message, code="invalid_api_key")


def api_key_error(settings: Settings, token: str | None) -> APIError | None:
    """Why ``token`` may not run inference, or None."""
    if settings.api_key and not _is(token, settings.api_key):
        return _unauthorized(token)
    return None


def admin_key_error(settings: Settings, token: str | None) -> APIError | None:
    """Why ``token`` may not manage experts (the admin key if one is configured, else what inference
    needs), or None."""
    if not settings.admin_api_key:
        return api_key_error(settings, token)
    if _is(token, settings.admin_api_key):
        return None
    if _is(token, settings.api_key):
        return APIError(403, "This key may run inference but not manage experts: uploading and deleting experts "
                        "need the admin key.", type="permission_error", code="admin_key_required")
    return _unauthorized(token)


def key_for_route(method: str, path: str) -> Literal["admin", "api"] | None:
    """Which key a request with a body needs, from its method and path alone (None: no body to protect,
    or a public route)."""
    if method not in BODY_METHODS:
        return None
    if any(path == p or path.startswith(p + "/") for p in ADMIN_PREFIXES):
        return "admin"
    return "api" if path.startswith("/v1/") or path in ("/tokenize", "/detokenize") else None


def require_api_key(request: Request) -> None:
    err = api_key_error(server_state(request).settings, _token(request))
    if err is not None:
        raise err


def require_admin_key(request: Request) -> None:
    """Managing experts: the admin key if one is configured, else whatever inference needs."""
    err = admin_key_error(server_state(request).settings, _token(request))
    if err is not None:
        raise err


def require_read_key(request: Request) -> None:
    """Listing experts: the inference key or the admin key (nothing, when no inference key is set)."""
    settings = server_state(request).settings
    if not settings.api_key:
        return
    token = _token(request)
    if not (_is(token, settings.api_key) or _is(token, settings.admin_api_key)):
        raise _unauthorized(token)
