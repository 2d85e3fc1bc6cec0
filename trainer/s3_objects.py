"""The trainer's S3 objects: reads that answer None for a missing object, conditional writes that
answer False for a lost race (`contracts.conditional`'s rule), listings and bulk deletes.

The stores (`trainer.job_store`, `trainer.artifacts`, ...) build on this, so no call site looks
at botocore error codes. Every call goes through the worker's boto3 client, whose standard retry
mode already retries throttling, 5xx and connection errors (`trainer.aws`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from contracts.conditional import is_not_found, is_precondition_failed

M = TypeVar("M", bound=BaseModel)
JSON = "application/json"
# Keys a DeleteObjects refused (in its `Errors`) are sent again this many times in all, pausing
# 0.5 s, then 1 s: throttling passes; a refusal that lasts is raised.
DELETE_TRIES = 3
DELETE_PAUSE_SECONDS = 0.5


class TooLarge(Exception):
    """An object bigger than the caller accepts."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"{size} bytes or more; at most {limit}")
        self.size = size
        self.limit = limit


class S3Objects:
    """One bucket's objects through a boto3 S3 client."""

    def __init__(self, s3: Any, bucket: str) -> None:
        self.client = s3
        self.bucket = bucket

    # -- reads ------------------------------------------------------------------------------

    def read(self, key: str, **condition: str) -> tuple[bytes, str] | None:
        """The object's bytes and ETag; None when it does not exist (or, with `IfMatch`, changed)."""
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=key, **condition)
        except Exception as exc:
            if is_not_found(exc) or (condition and is_precondition_failed(exc)):
                return None
            raise
        return resp["Body"].read(), resp["ETag"]

    def read_model(self, key: str, model: type[M]) -> M | None:
        """The JSON object at `key` as `model`, or None when there is none."""
        found = self.read(key)
        return None if found is None else model.model_validate_json(found[0])

    def head(self, key: str) -> dict[str, Any] | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            if is_not_found(exc):
                return None
            raise

    def tags(self, key: str) -> list[dict[str, str]] | None:
        """The object's tag set, or None when it does not exist."""
        try:
            return self.client.get_object_tagging(Bucket=self.bucket, Key=key).get("TagSet", [])
        except Exception as exc:
            if is_not_found(exc):
                return None
            raise

    def stream_to(self, key: str, path: Path, max_bytes: int, **condition: str) -> int | None:
        """Stream the object to `path` in 1 MiB chunks (never whole in memory); its size. None
        when it does not exist (or, with `IfMatch`, changed). Raises TooLarge past `max_bytes`
        (the partial file is removed)."""
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=key, **condition)
        except Exception as exc:
            if is_not_found(exc) or (condition and is_precondition_failed(exc)):
                return None
            raise
        declared = int(resp.get("ContentLength") or 0)
        if declared > max_bytes:
            resp["Body"].close()
            raise TooLarge(declared, max_bytes)
        size = 0
        with open(path, "wb") as out:
            for chunk in resp["Body"].iter_chunks(1 << 20):
                size += len(chunk)
                if size > max_bytes:
                    out.close()
                    path.unlink(missing_ok=True)
                    resp["Body"].close()
                    raise TooLarge(size, max_bytes)
                out.write(chunk)
        return size

    def download(self, key: str, path: str) -> bool:
        """Download the object to `path`; False when it does not exist."""
        try:
            self.client.download_file(self.bucket, key, path)
        except Exception as exc:
            if is_not_found(exc):
                return False
            raise
        return True

    # -- writes -----------------------------------------------------------------------------

    def put(self, key: str, body: bytes, content_type: str = JSON, **extra: Any) -> str:
        """Write unconditionally; the new ETag."""
        resp = self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type, **extra)
        return str(resp.get("ETag", ""))

    def create(self, key: str, body: bytes, content_type: str = JSON) -> str | None:
        """Write a new object; its ETag, or None when one exists already (If-None-Match)."""
        return self._conditional_put(key, body, content_type, IfNoneMatch="*")

    def replace(self, key: str, body: bytes, etag: str, content_type: str = JSON) -> str | None:
        """Overwrite the object if it is still version `etag`; the new ETag, or None when it changed."""
        return self._conditional_put(key, body, content_type, IfMatch=etag)

    def _conditional_put(self, key: str, body: bytes, content_type: str, **condition: str) -> str | None:
        try:
            return self.put(key, body, content_type, **condition)
        except Exception as exc:
            if is_precondition_failed(exc):
                return None
            raise

    def delete_if(self, key: str, etag: str) -> bool:
        """Delete the object if it is still version `etag`: False when it changed meanwhile
        (True when it is gone, by us or anyone)."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key, IfMatch=etag)
        except Exception as exc:
            if is_not_found(exc):
                return True
            if is_precondition_failed(exc):
                return False
            raise
        return True

    def delete_keys(self, keys: list[str]) -> None:
        """Delete `keys` in DeleteObjects batches. S3 answers 200 even when it refused some keys
        (each in `Errors`, e.g. SlowDown): those are tried again a few times with a pause, then
        raise, so the caller's step is retried rather than reported done with objects left."""
        for i in range(0, len(keys), 1000):
            pending = keys[i : i + 1000]
            for attempt in range(DELETE_TRIES):
                if attempt:
                    time.sleep(DELETE_PAUSE_SECONDS * 2 ** (attempt - 1))
                resp = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in pending], "Quiet": True}
                )
                errors = resp.get("Errors") or []
                refused = {e.get("Key") for e in errors}
                pending = [k for k in pending if k in refused]
                if not pending:
                    break
            else:
                first = errors[0]
                raise RuntimeError(
                    f"S3 refused to delete {len(pending)} object(s) {DELETE_TRIES} times "
                    f"(first: {first.get('Key')}: {first.get('Code')})"
                )

    # -- listings ---------------------------------------------------------------------------

    def list(self, prefix: str, bucket: str | None = None) -> list[dict[str, Any]]:
        """Every object under `prefix` (of `bucket`, default this store's), as ListObjectsV2 gives them."""
        objects: list[dict[str, Any]] = []
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket or self.bucket, Prefix=prefix)
        for page in pages:
            objects.extend(page.get("Contents", []))
        return objects

    def keys(self, prefix: str) -> list[str]:
        return [o["Key"] for o in self.list(prefix)]

    def child_numbers(self, prefix: str) -> list[int]:
        """The numbered "folders" directly under `prefix` (versions/1/, versions/2/, ...) that hold
        an object, sorted. Read from the keys themselves rather than a delimited listing: some S3
        implementations (moto) list a prefix whose objects are only delete markers on a versioned
        bucket."""
        numbers = set()
        for key in self.keys(prefix):
            part = key[len(prefix) :].split("/", 1)[0]
            if part.isdigit():
                numbers.add(int(part))
        return sorted(numbers)
