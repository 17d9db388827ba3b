"""Every error a client sees has OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Routes raise exceptions of the project's families; the handlers here are the one place they become HTTP:
    node.errors.ApiError        its own status_code / error_type (401, 402, 404, 413, 429, 503, ...)
    engine AdapterNotFound      404    engine AdapterError / RequestError   400
    engine CapacityError        413 (the request can never fit: prompt + max_tokens too long)
    RequestValidationError      422 (FastAPI's default body rewritten to the OpenAI shape)
    HTTPException (routing)     its status (404 unknown path, 405 wrong method)
    anything else               500 with a generic message; the traceback goes to the log only
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import AdapterError, AdapterNotFound, CapacityError, EngineError, RequestError
from node.errors import ApiError

log = logging.getLogger("openlora.api")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    # extensions, 402 only: `required` (decimal string: the cumulative voucher value to sign, with
    # voucher_too_low), `node_id`; with insufficient_escrow also `available` and `max_cost`
    required: str | None = None
    node_id: int | None = None
    available: str | None = None
    max_cost: str | None = None


class ErrorResponse(BaseModel):
    """The body of every non-2xx response (documented in the OpenAPI schema under these statuses)."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int, dict]:
    """`responses=` for a route: the statuses it can answer with, all carrying ErrorResponse."""
    return {s: {"model": ErrorResponse, "description": _DESCRIPTIONS.get(s, "error")} for s in statuses}


_DESCRIPTIONS = {
    400: "invalid request", 401: "missing or invalid credentials", 402: "insufficient funds or escrow",
    403: "forbidden", 409: "conflicts with the resource's state", 404: "unknown model, adapter or resource", 413: "request body or prompt too large",
    422: "request body failed validation", 429: "engine queue full (see Retry-After)",
    503: "the node is still loading or shutting down",
}

_HTTP_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "conflict_error", 405: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable"}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None,
               extra: dict | None = None) -> dict:
    """OpenAI's error object; `extra` adds extension fields beside its four (they never replace them)."""
    error = {**(extra or {}), "message": message, "type": type_, "param": param, "code": code}
    return {"error": error}


def json_error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
               headers: dict[str, str] | None = None, extra: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code, extra), status_code=status, headers=headers)


def api_error_response(exc: ApiError) -> JSONResponse:
    headers = None
    if exc.retry_after is not None:
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    return json_error(exc.status_code, exc.message, exc.error_type, exc.param, exc.code, headers,
                      getattr(exc, "extra", None))


def engine_error_response(exc: EngineError) -> JSONResponse:
    if isinstance(exc, AdapterNotFound):
        return json_error(404, str(exc), "not_found_error", "model", "model_not_found")
    if isinstance(exc, CapacityError):
        return json_error(413, str(exc), "invalid_request_error", "messages", "context_length_exceeded")
    if isinstance(exc, (AdapterError, RequestError)):
        return json_error(400, str(exc), "invalid_request_error")
    log.error("engine error: %s", exc)
    return json_error(500, "the engine failed to serve this request", "server_error")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return (f"{param}: {msg}{more}" if param else f"{msg}{more}"), param


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return api_error_response(exc)

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError):
        return engine_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return json_error(422, message, "invalid_request_error", param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        return json_error(exc.status_code, message, _HTTP_TYPES.get(exc.status_code, "invalid_request_error"),
                          headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # the traceback stays in the server log; the client learns only that it was our fault
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return json_error(500, "internal server error", "server_error")
