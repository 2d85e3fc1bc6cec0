"""AWS Lambda entry point: `handlers.lambda_handler.handler`.

A Lambda's init imports this module before its first request. It holds only Mangum and a front
that answers `GET /healthz` itself (what a health check or a warm-up ping at init needs) and
imports the whole application (`handlers.app`: FastAPI, the routes, the contracts) on the first
request that needs it: the start-up path imports only what the first request needs (benchmark
2 measures both the health check and the first API request). Both answer exactly as
`handlers.app` does locally under uvicorn.

Lifespan is off: under Lambda it would run on every invocation, and the app keeps its
clients per process instead (see handlers.aws).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from mangum import Mangum

from handlers.settings import get_settings

# Refuse to start (the Lambda's init fails, loudly) without a way to verify tokens, as the app does.
get_settings().check_startable()

ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]

# The answer of `GET /healthz` (handlers.routes.health): no token, no S3, no SQS.
HEALTHY = json.dumps({"status": "ok"}, separators=(",", ":")).encode()

_app: ASGIApp | None = None


def api() -> ASGIApp:
    """The whole application, imported on first use."""
    global _app
    if _app is None:
        from handlers.app import app

        _app = app
    return _app


async def front(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """`GET /healthz` here; everything else to the application."""
    if scope["type"] == "http" and scope["path"] == "/healthz" and scope["method"] in ("GET", "HEAD"):
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(HEALTHY)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": HEALTHY if scope["method"] == "GET" else b""})
        return
    await api()(scope, receive, send)


handler = Mangum(front, lifespan="off")
