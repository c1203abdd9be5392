"""The gateway's domain errors and the ONE place any error becomes an HTTP response.

Every error answer has OpenAI's shape: {"error": {"message", "type", "param", "code"}}. Routes raise typed
errors (these, storage/'s, protocol's); `install` registers handlers that pick the status code here. Once
an invocation id exists, the response carries the x-lorafn-* headers a route stored on `request.state`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from protocol.messages import ErrorCode
from protocol.subjects import InvalidName
from storage.errors import AdapterInvalid, ArchiveInvalid, NotFound, StorageUnavailable, UploadLimitExceeded

log = logging.getLogger(__name__)

HEADERS_STATE = "lorafn_headers"  # request.state attribute holding the x-lorafn-* headers of the call


class GatewayError(Exception):
    """Base of the gateway's own errors."""


class BadRequest(GatewayError, ValueError):
    """A parameter the gateway cannot accept (400)."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_parameter") -> None:
        super().__init__(message)
        self.param, self.code = param, code


class Unauthenticated(GatewayError):
    """No API key, or one that is unknown or revoked (401)."""


class ModelNotFound(GatewayError, LookupError):
    """A model or adapter the caller cannot see (404: another tenant's adapter is not found, never forbidden)."""

    def __init__(self, model: str) -> None:
        super().__init__(f"the model {model!r} does not exist or you do not have access to it")
        self.model = model


class InvocationNotFound(GatewayError, LookupError):
    """An invocation id the caller cannot see (404)."""

    def __init__(self, invocation_id: str) -> None:
        super().__init__(f"invocation {invocation_id!r} not found")
        self.invocation_id = invocation_id


class IdempotencyMismatch(GatewayError):
    """An Idempotency-Key reused with a different request body (422)."""

    def __init__(self, key: str, invocation_id: str) -> None:
        super().__init__(
            f"Idempotency-Key {key!r} was already used for invocation {invocation_id} with a different request "
            f"body; use a new key for a new request"
        )
        self.key, self.invocation_id = key, invocation_id


class BodyTooLarge(GatewayError, StarletteHTTPException):
    """A request body above the limit (413); raised while the body is read, before it is read in full.

    It is also a Starlette HTTPException only so that FastAPI's body reader re-raises it untouched instead
    of turning it into a generic 400; the handlers below still answer it in the OpenAI shape.
    """

    def __init__(self, limit: int, size: int | None = None) -> None:
        seen = f"{size} bytes" if size is not None else "more than that"
        message = f"request body is too large: {seen}, the limit is {limit} bytes"
        StarletteHTTPException.__init__(self, status_code=413, detail=message)
        self.limit, self.size = limit, size

    def __str__(self) -> str:
        return str(self.detail)


class Overloaded(GatewayError):
    """A queue is over its limit (429 with Retry-After)."""

    def __init__(self, scope: str, depth: int, limit: int, retry_after_s: int) -> None:
        super().__init__(f"{scope} has {depth} invocations pending, the limit is {limit}; retry later")
        self.scope, self.depth, self.limit, self.retry_after_s = scope, depth, limit, retry_after_s


class QuotaExceeded(GatewayError):
    """A per-tenant quota or a throttle refused the call (gateway/quotas.py): 429 with Retry-After for rates,
    tokens, concurrency and failed authentications; 403 without it for storage and key counts (waiting does
    not free them: deleting does). The body names the limit and carries its numbers."""

    def __init__(self, limit: str, message: str, *, value: float, current: float,
                 retry_after_s: int | None) -> None:
        super().__init__(message)
        self.limit, self.value, self.current, self.retry_after_s = limit, value, current, retry_after_s


class Unavailable(GatewayError):
    """NATS or Postgres cannot be reached right now (503 with Retry-After)."""

    def __init__(self, service: str, reason: str, retry_after_s: int = 5) -> None:
        super().__init__(f"{service} is unavailable: {reason}")
        self.service, self.retry_after_s = service, retry_after_s


class InvocationFailed(GatewayError):
    """A worker reported the invocation failed (status from its ErrorCode)."""

    def __init__(self, invocation_id: str, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.invocation_id, self.code = invocation_id, code


class InvocationTimeout(GatewayError):
    """No result within the synchronous timeout (504); the invocation stays recorded and may still finish."""

    def __init__(self, invocation_id: str, timeout_s: float) -> None:
        super().__init__(
            f"invocation {invocation_id} did not finish within {timeout_s:g} s; it is still recorded: "
            f"GET /v1/invocations/{invocation_id} for its outcome"
        )
        self.invocation_id, self.timeout_s = invocation_id, timeout_s


# Worker error codes -> HTTP status (protocol.messages.ErrorCode).
ERROR_CODE_STATUS: Mapping[ErrorCode, int] = {
    ErrorCode.bad_request: 400,
    ErrorCode.prompt_too_long: 400,
    ErrorCode.not_found: 404,
    ErrorCode.forbidden: 403,
    ErrorCode.adapter_invalid: 422,
    ErrorCode.adapter_corrupted: 502,
    ErrorCode.overloaded: 429,
    ErrorCode.unavailable: 503,
    ErrorCode.timeout: 504,
    ErrorCode.dead_letter: 500,
    ErrorCode.cancelled: 409,
    ErrorCode.internal: 500,
}

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "insufficient_quota",
          404: "invalid_request_error",
          413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}


def error_body(status: int, message: str, *, code: str | None = None, param: str | None = None,
               **extra: Any) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code,
                      **extra}}


def error_status(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, body, extra headers) of an error; the only mapping of errors to HTTP in the gateway."""
    match exc:
        case BadRequest():
            return 400, error_body(400, str(exc), code=exc.code, param=exc.param), {}
        case InvalidName():
            return 400, error_body(400, str(exc), code="invalid_name", param=exc.kind), {}
        case Unauthenticated():
            return 401, error_body(401, str(exc), code="invalid_api_key"), {"WWW-Authenticate": "Bearer"}
        case ModelNotFound():
            return 404, error_body(404, str(exc), code="model_not_found", param="model"), {}
        case InvocationNotFound():
            return 404, error_body(404, str(exc), code="not_found"), {}
        case NotFound():
            return 404, error_body(404, str(exc), code="not_found"), {}
        case BodyTooLarge():
            return 413, error_body(413, str(exc), code="request_too_large"), {}
        case IdempotencyMismatch():
            return 422, error_body(422, str(exc), code="idempotency_key_reused", param="Idempotency-Key"), {}
        case UploadLimitExceeded():  # refused while the upload was read: too many bytes, members, header or ratio
            return 413, error_body(413, str(exc), code=exc.code, detail=_jsonable(exc.detail)), {}
        case ArchiveInvalid():  # not a readable .tar/.tar.gz/.zip (corrupt, overlapping members, encrypted)
            return 400, error_body(400, str(exc), code=exc.code, detail=_jsonable(exc.detail)), {}
        case AdapterInvalid():
            return 422, error_body(422, str(exc), code=exc.code, detail=_jsonable(exc.detail)), {}
        case Overloaded():
            return 429, error_body(429, str(exc), code="overloaded"), {"Retry-After": str(exc.retry_after_s)}
        case QuotaExceeded():
            status = 403 if exc.retry_after_s is None else 429
            body = error_body(status, str(exc), code="quota_exceeded" if status == 403 else "rate_limit_exceeded",
                              limit=exc.limit, limit_value=exc.value, current=exc.current,
                              retry_after_s=exc.retry_after_s)
            return status, body, {} if exc.retry_after_s is None else {"Retry-After": str(exc.retry_after_s)}
        case Unavailable():
            return 503, error_body(503, str(exc), code="unavailable"), {"Retry-After": str(exc.retry_after_s)}
        case StorageUnavailable():
            return 503, error_body(503, str(exc), code="unavailable"), {"Retry-After": "5"}
        case OperationalError() | InterfaceError():
            return 503, error_body(503, "postgres is unavailable", code="unavailable"), {"Retry-After": "5"}
        case PoolTimeout():  # every pooled connection stayed busy for pool_timeout_s (repo.create_fast_write_engine)
            return 503, error_body(503, "every postgres connection of this gateway is busy", code="unavailable"), {
                "Retry-After": "1"}
        case InvocationFailed():
            status = ERROR_CODE_STATUS.get(exc.code, 500)
            headers = {"Retry-After": "1"} if status in (429, 503) else {}
            return status, error_body(status, str(exc), code=exc.code.value), headers
        case InvocationTimeout():
            return 504, error_body(504, str(exc), code="timeout"), {}
        case DBAPIError() if exc.connection_invalidated:
            return 503, error_body(503, "postgres is unavailable", code="unavailable"), {"Retry-After": "5"}
    return 500, error_body(500, "internal error", code="internal"), {}


def _jsonable(detail: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, str | int | float | bool | None | list | dict) else str(v) for k, v in detail.items()}


def error_response(request: Request | None, exc: BaseException) -> JSONResponse:
    """The JSON answer to an error, with the call's x-lorafn-* headers when an invocation id exists."""
    status, body, headers = error_status(exc)
    if status == 500:
        log.error("unhandled error", exc_info=exc)
    if request is not None:
        headers = {**getattr(request.state, HEADERS_STATE, {}), **headers}
    return JSONResponse(body, status_code=status, headers=headers)


# Validation errors whose type is itself the error code (raised by gateway/params.py with the offending
# parameter in their context, since a whole-body check has no location of its own).
_CODED_VALIDATION_ERRORS = frozenset({"unsupported_parameter", "invalid_unicode"})


def _validation_error(exc: RequestValidationError) -> BadRequest:
    errors = exc.errors()
    if not errors:
        return BadRequest("invalid request")
    first = errors[0]
    kind = first.get("type")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if kind in _CODED_VALIDATION_ERRORS:
        return BadRequest(f"{first.get('msg', kind)}{more}", param=(first.get("ctx") or {}).get("param"), code=kind)
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    param = ".".join(loc) or None
    if kind == "json_invalid":
        return BadRequest(f"the request body is not valid JSON: {first.get('msg', '')}")
    msg = first.get("msg", "invalid value")
    return BadRequest(f"{param}: {msg}{more}" if param else f"{msg}{more}", param=param)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into the OpenAI shape."""

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(request, _validation_error(exc))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if isinstance(exc, GatewayError):
            return error_response(request, exc)
        body = error_body(exc.status_code, str(exc.detail), code=None)
        return JSONResponse(body, status_code=exc.status_code, headers=dict(exc.headers or {}))

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request, exc)

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    for cls in (GatewayError, InvalidName, NotFound, AdapterInvalid, StorageUnavailable, DBAPIError, PoolTimeout):
        app.add_exception_handler(cls, on_error)
