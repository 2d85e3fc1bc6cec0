"""Small JSON objects with conditional writes (job records, active-job pointers, idempotency
records, the adapter configuration, the training data's flag index), and the listings the
stores share.

Writes follow `contracts.conditional`: `create` is `If-None-Match: *`, `replace` and
`delete_if` are `If-Match: <etag>`, and a write that lost the race answers None/False instead
of raising, so a store's read-modify-write loop reads `for _ in write_attempts(...)` and
retries on a falsy answer. A missing object reads as None.
"""

from __future__ import annotations

import asyncio
from typing import Any

from contracts.conditional import is_not_found, is_precondition_failed
from contracts.ids import is_valid_id
from contracts.keys import avatars_prefix
from handlers.s3_objects import LIST_PAGE_SIZE


class S3Json:
    """One bucket's small JSON objects, at most `max_concurrency` requests at a time."""

    def __init__(self, s3: Any, bucket: str, max_concurrency: int = 64) -> None:
        self._s3 = s3
        self._bucket = bucket
        self._limit = asyncio.Semaphore(max_concurrency)

    @property
    def bucket(self) -> str:
        return self._bucket

    async def read(self, key: str) -> tuple[bytes, str] | None:
        """The object's bytes and ETag, or None when it does not exist."""
        try:
            async with self._limit:
                resp = await self._s3.get_object(Bucket=self._bucket, Key=key)
                async with resp["Body"] as body:
                    data = await body.read()
        except Exception as exc:
            if is_not_found(exc):
                return None
            raise
        return data, resp["ETag"]

    async def _put(self, key: str, data: bytes, **condition: str) -> str | None:
        try:
            async with self._limit:
                resp = await self._s3.put_object(
                    Bucket=self._bucket, Key=key, Body=data, ContentType="application/json", **condition
                )
        except Exception as exc:
            if is_precondition_failed(exc) or is_not_found(exc):
                return None
            raise
        return str(resp["ETag"])

    async def create(self, key: str, data: bytes, tagging: str | None = None) -> str | None:
        """Write a new object (with `tagging`, `k=v&...`, if given); its ETag, or None when one exists already."""
        return await self._put(key, data, IfNoneMatch="*", **({"Tagging": tagging} if tagging else {}))

    async def replace(self, key: str, data: bytes, etag: str) -> str | None:
        """Overwrite the object if it is still the version `etag`; the new ETag, or None when it changed."""
        return await self._put(key, data, IfMatch=etag)

    async def put_if(self, key: str, data: bytes, etag: str | None) -> str | None:
        """`replace` the version `etag`, or `create` the object when `etag` is None (it was
        missing when read): the write of a read-modify-write loop. None when it lost the race."""
        return await (self.create(key, data) if etag is None else self.replace(key, data, etag))

    async def put(self, key: str, data: bytes) -> str:
        """Write the object whatever is there (for objects with one writer)."""
        resp = await self._s3.put_object(Bucket=self._bucket, Key=key, Body=data, ContentType="application/json")
        return str(resp["ETag"])

    async def delete_if(self, key: str, etag: str) -> bool:
        """Delete the object if it is still the version `etag`: False when it changed meanwhile
        (True when it is gone, by us or anyone)."""
        try:
            async with self._limit:
                await self._s3.delete_object(Bucket=self._bucket, Key=key, IfMatch=etag)
        except Exception as exc:
            if is_not_found(exc):
                return True
            if is_precondition_failed(exc):
                return False
            raise
        return True

    async def delete(self, key: str) -> None:
        """Delete the object whatever its version; one that is already gone is no error."""
        try:
            async with self._limit:
                await self._s3.delete_object(Bucket=self._bucket, Key=key)
        except Exception as exc:
            if not is_not_found(exc):
                raise

    async def objects(self, prefix: str, delimiter: str | None = None) -> tuple[list[dict[str, Any]], list[str]]:
        """Every object under `prefix` and, with a delimiter, the child prefixes' names."""
        kwargs: dict[str, Any] = {"Bucket": self._bucket, "Prefix": prefix, "MaxKeys": LIST_PAGE_SIZE}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        contents: list[dict[str, Any]] = []
        children: list[str] = []
        while True:
            async with self._limit:
                resp = await self._s3.list_objects_v2(**kwargs)
            contents.extend(resp.get("Contents", []))
            children.extend(p["Prefix"][len(prefix) :].rstrip("/") for p in resp.get("CommonPrefixes", []))
            if not resp.get("IsTruncated"):
                return contents, children
            kwargs["ContinuationToken"] = resp["NextContinuationToken"]

    async def avatar_ids(self, user_id: str) -> list[str]:
        """The ids of the user's avatars that have anything stored, sorted."""
        _, children = await self.objects(avatars_prefix(user_id), delimiter="/")
        return sorted(c for c in children if is_valid_id(c))
