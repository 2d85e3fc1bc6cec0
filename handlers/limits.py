"""Request limits, enforced before any route (or body parser) sees the request.

- Headers over MAX_HEADER_BYTES (all names and values together): 431. API Gateway stops
  larger ones itself; behind uvicorn nothing else would.
- JSON bodies over MAX_JSON_BODY_BYTES: 413, from the declared Content-Length before a byte is
  read, or as a chunked body streams past the limit. Parsing a 40 MB JSON body inside the
  documented field limits would otherwise hold the event loop for seconds before its 422
  (Lambda's own cap on a request is about 6 MB). Raw document bodies have their own cap
  (MAX_UPLOAD_BYTES, `handlers.uploads`).
"""

from __future__ import annotations

from typing import Any

from handlers.problems import problem_response

Scope = dict[str, Any]


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


class RequestLimits:
    """Pure ASGI middleware (works the same under uvicorn and Mangum)."""

    def __init__(self, app: Any, max_header_bytes: int, max_json_body_bytes: int) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes
        self.max_json_body_bytes = max_json_body_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers") or []
        size = sum(len(name) + len(value) + 4 for name, value in headers)
        if size > self.max_header_bytes:
            detail = f"request headers of {size} bytes exceed MAX_HEADER_BYTES ({self.max_header_bytes})"
            await problem_response(431, detail, instance=scope.get("path"))(scope, receive, send)
            return
        found = {name.lower(): value for name, value in headers}
        if not _is_json(found.get(b"content-type", b"").decode("latin-1")):
            await self.app(scope, receive, send)
            return
        declared = found.get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > self.max_json_body_bytes:
            await problem_response(413, self._too_large(int(declared)), instance=scope.get("path"))(
                scope, receive, send
            )
            return
        body = await self._read_capped(receive)
        if body is None:
            await problem_response(413, self._too_large(self.max_json_body_bytes + 1), instance=scope.get("path"))(
                scope, receive, send
            )
            return
        await self.app(scope, _replay(body, receive), send)

    def _too_large(self, size: int) -> str:
        return f"a JSON body of {size} bytes or more exceeds MAX_JSON_BODY_BYTES ({self.max_json_body_bytes})"

    async def _read_capped(self, receive: Any) -> bytes | None:
        """The whole (JSON, so small) body, or None as soon as it streams past the limit."""
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message.get("type") != "http.request":
                break  # the client went away: let the app see an empty body
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_json_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive: Any) -> Any:
    """A `receive` that hands the app the buffered body, then defers to the real one."""
    sent = False

    async def replayed() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
