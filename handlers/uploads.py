"""Request-side helpers shared by the document routes (training data, context documents):
name checks and the MAX_UPLOAD_BYTES cap on raw and multipart bodies (listing cursors:
`handlers.paging`). Every refusal is a `Problem`, raised before anything is stored."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Request

from contracts.ids import InvalidIdentifier
from handlers.problems import Problem

# Multipart framing around the file; a request bigger than the cap plus this is refused unread.
MULTIPART_OVERHEAD = 64 * 1024


def checked_name(name: str, validate: Callable[[str], str]) -> str:
    """`name` if `validate` accepts it (a `contracts.ids` name check), else a 400."""
    try:
        return validate(name)
    except InvalidIdentifier as exc:
        raise Problem(400, str(exc)) from None


def too_large(limit: int, uploads_path: str) -> Problem:
    """413 pointing at the presigned-upload route (`uploads_path`, e.g. `training-data/uploads`)."""
    return Problem(
        413, f"document exceeds MAX_UPLOAD_BYTES ({limit} bytes); use POST .../{uploads_path} for large files"
    )


def presigned_size(size: int, limit: int) -> int:
    """The size a presigned upload may be signed for; 413 past MAX_PRESIGNED_UPLOAD_BYTES."""
    if size > limit:
        raise Problem(
            413, f"size {size} exceeds MAX_PRESIGNED_UPLOAD_BYTES ({limit} bytes): split the document", field="size"
        )
    return size


def refuse_declared_size(request: Request, limit: int, uploads_path: str, overhead: int = 0) -> None:
    """Refuse a body whose declared length exceeds the document limit plus framing `overhead`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + overhead:
        raise too_large(limit, uploads_path)


async def read_capped_body(request: Request, limit: int, uploads_path: str) -> bytes:
    """The raw request body, refused (413) as soon as it is declared or read past `limit` bytes:
    a client that lies about Content-Length (or streams chunked) never gets more buffered."""
    refuse_declared_size(request, limit, uploads_path)
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise too_large(limit, uploads_path)
    return bytes(body)
