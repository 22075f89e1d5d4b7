"""Every HTTP error in the OpenAI error shape: ``{"error": {"message", "type", "param", "code"}}``.

Handlers raise ``APIError`` (or let an engine error or a pydantic validation error escape); the
exception handlers installed by ``install_error_handlers`` turn each into that shape. Invalid
parameters, malformed JSON and unsatisfiable prompts are all 400, as OpenAI answers them.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.contract import EngineDeadError, EngineError, PromptTooLongError, QueueFullError
from experts.pass1.decision import AdaptationError

log = logging.getLogger("t2serve.http")

# Loc entries pydantic adds for union members and wrap validators ("str", "list[int]",
# "function-wrap[...]"): they name a type, not a field, so they are left out of `param`.
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


class APIError(Exception):
    """An error answered to the client; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist or you do not have access to it.",
                    param="model", code="model_not_found")


def unavailable(message: str, code: str = "engine_unavailable") -> APIError:
    return APIError(503, message, type="server_error", code=code)


def from_engine_error(exc: EngineError) -> APIError:
    """The HTTP answer for an error the engine raised when a request was submitted."""
    if isinstance(exc, QueueFullError):
        return APIError(429, f"The server is busy: too many requests are waiting ({exc}). Retry later.",
                        type="rate_limit_error", code="queue_full")
    if isinstance(exc, PromptTooLongError):
        return invalid_request(str(exc), param="max_tokens", code="context_length_exceeded")
    if isinstance(exc, EngineDeadError):
        return unavailable(f"The engine has stopped: {exc}", code="engine_dead")
    return APIError(500, f"Engine error: {exc}", type="server_error", code="engine_error")


class ErrorJSONResponse(JSONResponse):
    """JSON escaped to ASCII: a message that quotes the request (a model name, a field's value) may
    hold a lone surrogate, which UTF-8 cannot encode; escaped, it is still valid JSON."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


def error_response(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return ErrorJSONResponse(err.body(), status_code=err.status, headers=headers)


def _unparsable_body(cause: BaseException | None) -> APIError:
    """FastAPI's 400 for a JSON body that json.loads could not take for a reason other than syntax."""
    why = {UnicodeDecodeError: "it is not valid UTF-8",
           RecursionError: "it is nested too deeply"}.get(type(cause), "it could not be parsed")
    return invalid_request(f"Malformed JSON in the request body: {why}.", code="invalid_json")


# --- pydantic validation errors -------------------------------------------------------------------

def _param(loc: tuple) -> str | None:
    """'messages.0.content' from ('body', 'messages', 0, 'content'), without union type tags."""
    parts = [str(p) for p in loc[1:] if not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS))]
    return ".".join(parts) or None


def _describe(err: dict) -> str:
    kind, param = err.get("type"), _param(tuple(err.get("loc", ())))
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return f"Malformed JSON in the request body: {detail}".rstrip(": ")
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}"
    if kind == "missing" and param is None:
        return "The request body is missing: send a JSON object"
    if param is None and kind in ("model_attributes_type", "dict_type"):
        return "The request body must be a JSON object (Content-Type: application/json)"
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    if kind == "missing":
        return f"Missing required parameter: '{param}'"
    if param is None:
        return msg
    if param.startswith("adaptation"):  # mixture weights and expert values are not quoted back (nor logged)
        return f"Invalid value for '{param}': {msg}"
    shown = repr(err.get("input"))
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return f"Invalid value for '{param}': {msg} (got {shown})"


def validation_error(errors: list[dict]) -> APIError:
    """One 400 naming the first bad field; the message lists every problem found."""
    first = errors[0] if errors else {}
    code = "invalid_json" if first.get("type") == "json_invalid" else "invalid_value"
    message = "; ".join(dict.fromkeys(_describe(e).rstrip(".") for e in errors)) or "Invalid request"
    message += "."
    param = None if code == "invalid_json" else _param(tuple(first.get("loc", ())))
    return invalid_request(message, param=param, code=code)


# --- handlers ---------------------------------------------------------------------------------------

def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(list(exc.errors())))

    @app.exception_handler(AdaptationError)
    async def _adaptation(_: Request, exc: AdaptationError) -> JSONResponse:
        resp = error_response(APIError(exc.status, exc.message, param=exc.param, code=exc.code,
                                       type="server_error" if exc.status >= 500 else "invalid_request_error"))
        if exc.retry_after is not None:
            resp.headers["Retry-After"] = str(max(1, round(exc.retry_after)))
        return resp

    @app.exception_handler(EngineError)
    async def _engine(_: Request, exc: EngineError) -> JSONResponse:
        return error_response(from_engine_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown routes (404), wrong methods (405), bodies FastAPI could not parse (400) and the like.
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        err = APIError(exc.status_code, str(exc.detail), type=type_)
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            err = _unparsable_body(exc.__cause__)
        resp = error_response(err)
        for k, v in (exc.headers or {}).items():
            resp.headers[k] = v
        return resp

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, "Internal server error.", type="server_error", code="internal_error"))
