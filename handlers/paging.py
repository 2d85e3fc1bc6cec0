"""Listing cursors: the opaque `next_cursor` a page ends with, and the name the next page
starts after. Document listings (training data, context documents) and job listings use them;
a cursor the API did not issue is a 400."""

from __future__ import annotations

import base64

from handlers.problems import Problem

MAX_CURSOR_TEXT = 1024

INVALID_CURSOR = "invalid cursor: pass back the next_cursor of a previous page"


def encode_cursor(last_name: str) -> str:
    return base64.urlsafe_b64encode(last_name.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The name a page ends after; raises ValueError for a cursor we did not issue."""
    padded = cursor + "=" * (-len(cursor) % 4)
    try:
        name = base64.urlsafe_b64decode(padded.encode()).decode()
    except Exception:
        raise ValueError("invalid cursor") from None
    # Control characters never appear in a name we list (and S3 refuses them in a StartAfter).
    if not name or "/" in name or len(name) > MAX_CURSOR_TEXT or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError("invalid cursor")
    return name


def page_after(cursor: str | None) -> str | None:
    """The name a listing page starts after, from a `next_cursor` we issued (400 otherwise)."""
    if not cursor:
        return None
    try:
        return decode_cursor(cursor)
    except ValueError:
        raise Problem(400, INVALID_CURSOR) from None
