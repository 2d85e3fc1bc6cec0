"""The one rule for conditional S3 writes, shared by the API (aiobotocore) and the trainer (boto3).

Objects that several writers change (job records, an avatar's active-job pointer, idempotency
records, version claims) are created with `If-None-Match: *` and changed with `If-Match: <etag>`
in a read-modify-write loop. S3 answers a write that lost the race with 412 PreconditionFailed,
or with 409 ConditionalRequestConflict while another conditional write to the same key is in
flight; either way someone else wrote first, and the loop reads again. A loop gives up after
MAX_WRITE_ATTEMPTS lost races (`StoreBusy`) instead of spinning for ever.

Call sites never look at botocore's error codes themselves: the stores (`handlers.s3_json`,
`trainer.s3_objects`) turn them into `None`/`False` answers or the typed errors below.
"""

from __future__ import annotations

from collections.abc import Iterator

# A read-modify-write that loses this many races in a row gives up (StoreBusy).
MAX_WRITE_ATTEMPTS = 20

NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
PRECONDITION_FAILED_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})


class StoreBusy(Exception):
    """A conditional update kept losing races (MAX_WRITE_ATTEMPTS in a row)."""


class RecordNotFound(LookupError):
    """The object a conditional update was asked to change does not exist (any more)."""


def error_code(exc: BaseException) -> str | None:
    """The AWS error code of a botocore ClientError, else None."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code")) or None
    return None


def is_not_found(exc: BaseException) -> bool:
    return error_code(exc) in NOT_FOUND_CODES


def is_precondition_failed(exc: BaseException) -> bool:
    """The write lost a race: the object changed (or exists, or is being written) meanwhile."""
    return error_code(exc) in PRECONDITION_FAILED_CODES


def write_attempts(what: str, limit: int = MAX_WRITE_ATTEMPTS) -> Iterator[int]:
    """The attempts of one read-modify-write loop: `for _ in write_attempts("job x"): ...`,
    returning from the loop once a write succeeds. Raises StoreBusy after `limit` lost races."""
    yield from range(limit)
    raise StoreBusy(f"{what} kept changing while being updated ({limit} attempts)")
