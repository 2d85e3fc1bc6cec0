"""Errors of the OpenAI-compatible API (`handlers.openai_app`, mounted at `/openai/v1`):
OpenAI's body, `{"error": {"message", "type", "param", "code"}}`, with the status codes the
`openai` SDK maps to its exception classes; the rest of the API keeps problem+json
(`handlers.problems`).

The services raise the same `Problem`s everywhere; `install_openai_error_handlers` answers
them (and FastAPI's own errors) on the OpenAI application this way:

| status | SDK exception | `type` | note |
| --- | --- | --- | --- |
| 400 | `BadRequestError` | `invalid_request_error` | also every 422 (invalid parameters; `param` names the field) |
| 401 | `AuthenticationError` | `authentication_error` | |
| 403 | `PermissionDeniedError` | `permission_error` | |
| 404 | `NotFoundError` | `invalid_request_error` | |
| 409 | `ConflictError` | `invalid_request_error` | `x-should-retry: false` unless it says Retry-After |
| 413 | `APIStatusError` | `invalid_request_error` | |
| 429 | `RateLimitError` | `rate_limit_error` | `x-should-retry: false`, Retry-After kept |
| 5xx | `InternalServerError` | `server_error` | |

The SDK retries 409s and 429s by default (honouring Retry-After, up to two minutes per try). A
conflict that a retry cannot resolve (an active job on the avatar, a job that has ended) and the
per-user cap of active jobs (freed only when a job ends, minutes or hours later) say
`x-should-retry: false`, so the caller sees them at once instead of after minutes of waiting.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from handlers.openai_models import ErrorBody
from handlers.problems import Problem

log = logging.getLogger("avatune.api")

_TYPE_TAGS = frozenset({"int", "float", "str", "bool", "none"})
_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
_CODES = {
    401: "invalid_api_key",
    403: "permission_denied",
    404: "not_found",
    409: "conflict",
    413: "file_too_large",
    429: "rate_limit_exceeded",
}

# The routes' documented error answers (OpenAPI): OpenAI's body, whatever the status.
OPENAI_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in (
        (400, "invalid request; `param` names the parameter"),
        (401, "missing or invalid API key (the avatune token)"),
        (403, "the key may not act for the named organization"),
        (404, "no such file or job (another user's included)"),
        (409, "the avatar has an active job, or the job has ended"),
        (429, "the user is at MAX_ACTIVE_JOBS_PER_USER"),
    )
}


def openai_error(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """OpenAI's error body; a 422 answers 400 (the SDK's BadRequestError, as OpenAI's own API)."""
    status = 400 if status == 422 else status
    kind = "server_error" if status >= 500 else _TYPES.get(status, "invalid_request_error")
    headers = dict(headers or {})
    if (status == 409 and "Retry-After" not in headers) or status == 429:
        headers["x-should-retry"] = "false"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code or _CODES.get(status)}}
    return JSONResponse(body, status_code=status, headers=headers)


async def _from_problem(request: Request, exc: Problem) -> JSONResponse:
    field = exc.extensions.get("field")
    code = exc.extensions.get("code")
    return openai_error(
        exc.status,
        exc.detail,
        param=field if isinstance(field, str) else None,
        code=code if isinstance(code, str) else None,
        headers=exc.headers,
    )


async def _from_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    if exc.status_code in (404, 405) and detail in ("Not Found", "Method Not Allowed"):
        detail = f"Invalid URL ({request.method} {request.url.path})"
    return openai_error(exc.status_code, detail, headers=exc.headers)


def _is_union_tag(part: str) -> bool:
    """A union member's tag in a pydantic error location ("literal['auto']", "constrained-int")."""
    return part in _TYPE_TAGS or part.startswith(("literal[", "constrained-", "function-", "list[", "dict["))


def _param(loc: tuple[Any, ...]) -> str | None:
    """("body", "hyperparameters", "n_epochs", "constrained-int") -> "hyperparameters.n_epochs"."""
    return ".".join(str(p) for p in loc[1:] if not _is_union_tag(str(p))) or None


async def _from_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if not errors:
        return openai_error(400, "invalid request")
    param = _param(tuple(errors[0].get("loc", ())))
    # A union ("auto" or an integer >= 1) fails once per member: say what each would take.
    same_field = (e for e in errors if _param(tuple(e.get("loc", ()))) == param)
    said = list(dict.fromkeys(e.get("msg", "invalid value") for e in same_field))
    message = " or ".join([said[0], *(m.removeprefix("Input should be ") for m in said[1:])])
    return openai_error(400, f"{param}: {message}" if param else message, param=param)


async def _from_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return openai_error(500, "an internal error occurred; retry later")


def install_openai_error_handlers(app: FastAPI) -> None:
    """Answer every error of `app` with OpenAI's body."""
    app.add_exception_handler(Problem, _from_problem)
    app.add_exception_handler(StarletteHTTPException, _from_http)
    app.add_exception_handler(RequestValidationError, _from_validation)
    app.add_exception_handler(Exception, _from_unexpected)
