"""The `Idempotency-Key` header of the job-creating routes (read by the dependency
`handlers.dependencies.idempotency`; what it answers is decided in `handlers.services.jobs`).

A retry with the same key on the same avatar answers the job the first request created, as
long as it is the same request: the key's record keeps a fingerprint of the method, path and
body, and a different request under a used key is a 422 (as the IETF Idempotency-Key draft
recommends) instead of silently answering a job the caller did not ask for. Records older
than IDEMPOTENCY_KEY_TTL_HOURS no longer count: the key may then create a new job. In AWS a
lifecycle rule removes the records themselves (they carry IDEMPOTENCY_RECORD_TAG).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

MAX_IDEMPOTENCY_KEY_LENGTH = 255
# The tag the template's lifecycle rule expires idempotency records by (key=value).
IDEMPOTENCY_RECORD_TAG = "avatune-record=idempotency"


@dataclass(frozen=True)
class Idempotency:
    """One request's key (hashed: the raw key never reaches S3) and its fingerprint."""

    key_hash: str
    fingerprint: str

    @classmethod
    def of(cls, key: str, method: str, path: str, body: bytes) -> Idempotency:
        """The key of a request to `method path` with `body`."""
        return cls(hashlib.sha256(key.encode()).hexdigest(), request_fingerprint(method, path, body))


def _canonical_body(body: bytes) -> bytes:
    """The body as sorted compact JSON, so retries that reorder keys or spacing still match;
    no body, `null` and `{}` alike are empty.
    `callbacks.auth_header` is left out: not even a digest of a secret is stored."""
    try:
        parsed: Any = json.loads(body)
    except ValueError:
        return body  # not JSON: the route refuses it anyway
    if parsed is None or parsed == {}:
        return b""  # the optional-body routes read null and {} as no body: the same request
    if isinstance(parsed, dict) and isinstance(parsed.get("callbacks"), dict) and "auth_header" in parsed["callbacks"]:
        parsed["callbacks"]["auth_header"] = "<secret>"
    return json.dumps(parsed, sort_keys=True, separators=(",", ":")).encode()


def request_fingerprint(method: str, path: str, body: bytes) -> str:
    """sha256 over the method, the path and the canonical body."""
    digest = hashlib.sha256(f"{method.upper()} {path}\n".encode())
    digest.update(_canonical_body(body) if body.strip() else b"")
    return digest.hexdigest()
