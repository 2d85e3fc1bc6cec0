"""S3 calls whose failures are answers: a missing object comes back as `None`, a lost
conditional race as `None`/`False` or `RecordNotFound` (`contracts.conditional`), so the stores
never look at botocore's error codes themselves. With `handlers.s3_json` (small JSON objects),
the only modules of the API that do.

Every function takes the aiobotocore client and the bucket; none holds state.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from contracts.conditional import RecordNotFound, is_not_found, is_precondition_failed

LIST_PAGE_SIZE = 1000  # S3's maximum per ListObjectsV2 call
DELETE_BATCH_SIZE = 1000  # S3's maximum per DeleteObjects call
CHUNK_BYTES = 64 * 1024  # the body chunks a streamed object is handed out in

OpenedObject = tuple[dict[str, Any], AsyncIterator[bytes]]


async def open_object(s3: Any, bucket: str, key: str, **get_args: Any) -> OpenedObject | None:
    """An object's GetObject response and an iterator over its body chunks; None when the object
    does not exist. `get_args` go to GetObject (a `Range`, ...)."""
    try:
        resp = await s3.get_object(Bucket=bucket, Key=key, **get_args)
    except Exception as exc:
        if is_not_found(exc):
            return None
        raise

    async def chunks() -> AsyncIterator[bytes]:
        async with resp["Body"] as body:
            async for chunk in body.iter_chunks(CHUNK_BYTES):
                yield chunk

    return resp, chunks()


async def head_object(s3: Any, bucket: str, key: str) -> dict[str, Any] | None:
    """The object's HeadObject response, or None when it does not exist."""
    try:
        return await s3.head_object(Bucket=bucket, Key=key)
    except Exception as exc:
        if is_not_found(exc):
            return None
        raise


async def object_tagging(s3: Any, bucket: str, key: str) -> dict[str, Any] | None:
    """The object's GetObjectTagging response, or None when it does not exist."""
    try:
        return await s3.get_object_tagging(Bucket=bucket, Key=key)
    except Exception as exc:
        if is_not_found(exc):
            return None
        raise


async def copy_if_unchanged(s3: Any, **copy_args: Any) -> dict[str, Any] | None:
    """CopyObject guarded by `CopySourceIfMatch`: its response, or None when the source changed
    meanwhile (the caller reads it again). Raises RecordNotFound when the source is gone."""
    try:
        return await s3.copy_object(**copy_args)
    except Exception as exc:
        if is_not_found(exc):
            raise RecordNotFound(copy_args.get("Key")) from None
        if is_precondition_failed(exc):
            return None
        raise


async def delete_if_match(s3: Any, bucket: str, key: str, etag: str) -> dict[str, Any] | None:
    """DeleteObject guarded by `If-Match`: its response (with the delete marker's VersionId on a
    versioned bucket), or None when the object changed or vanished since `etag` was read."""
    try:
        return await s3.delete_object(Bucket=bucket, Key=key, IfMatch=etag)
    except Exception as exc:
        if is_not_found(exc) or is_precondition_failed(exc):
            return None
        raise


async def version_below(s3: Any, bucket: str, key: str, marker_id: str) -> str | None:
    """On a versioned bucket: the VersionId of the version a delete marker `marker_id` covers
    (the newest version of `key` older than the marker), or None."""
    resp = await s3.list_object_versions(Bucket=bucket, Prefix=key)
    markers = {m["VersionId"]: m for m in resp.get("DeleteMarkers", []) if m["Key"] == key}
    if marker_id not in markers:
        return None
    when = markers[marker_id]["LastModified"]
    older = [v for v in resp.get("Versions", []) if v["Key"] == key and v["LastModified"] <= when]
    return max(older, key=lambda v: v["LastModified"])["VersionId"] if older else None


async def delete_keys(s3: Any, bucket: str, keys: list[str], what: str = "objects") -> int:
    """Delete `keys` in DeleteObjects batches; how many were deleted. Raises RuntimeError naming
    `what` when S3 refuses any of a batch."""
    deleted = 0
    for i in range(0, len(keys), DELETE_BATCH_SIZE):
        batch = keys[i : i + DELETE_BATCH_SIZE]
        resp = await s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
        errors = resp.get("Errors", [])
        if errors:
            raise RuntimeError(f"S3 refused to delete {len(errors)} {what}")
        deleted += len(batch)
    return deleted
