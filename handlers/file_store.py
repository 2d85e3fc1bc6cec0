"""The user's files, `users/{user_id}/files/{file_id}.jsonl` (`/openai/v1/files`): the only
module of the API that touches those keys.

A file is one immutable object: created with `If-None-Match: *` under a new id, never replaced,
its facts (the uploaded filename, purpose, creation time) in the object's user metadata, so a
file exists exactly when its object does and a HEAD tells everything about it. S3 metadata is
ASCII: the filename is stored percent-encoded.

Ids sort by creation time (`new_file_id`), so key order is upload order.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from contracts.conditional import is_precondition_failed
from contracts.ids import is_valid_id
from contracts.keys import file_key, files_prefix
from handlers.s3_json import S3Json
from handlers.s3_objects import OpenedObject, head_object, open_object

FILE_CONTENT_TYPE = "application/jsonl"


def new_file_id() -> str:
    """`file-` + creation time (ms, hex) + randomness: ids sort by upload time."""
    return f"file-{time.time_ns() // 1_000_000:013x}{secrets.token_hex(6)}"


@dataclass(frozen=True)
class StoredFile:
    file_id: str
    filename: str
    purpose: str
    size: int
    created_at: int  # Unix seconds


class FileStore:
    """Typed access to one bucket's user files."""

    def __init__(self, s3: Any, bucket: str, max_concurrency: int = 64) -> None:
        self._s3 = s3
        self._bucket = bucket
        self._limit = asyncio.Semaphore(max_concurrency)
        self._listing = S3Json(s3, bucket, max_concurrency)

    def uri(self, user_id: str, file_id: str) -> str:
        """The file as a job's dataset: `s3://{bucket}/users/{user_id}/files/{file_id}.jsonl`."""
        return f"s3://{self._bucket}/{file_key(user_id, file_id)}"

    async def create(self, user_id: str, file_id: str, data: bytes, filename: str, purpose: str) -> StoredFile | None:
        """Store a new file; None when the id is taken."""
        created_at = int(time.time())
        metadata = {"filename": quote(filename, safe=""), "purpose": purpose, "created-at": str(created_at)}
        try:
            async with self._limit:
                await self._s3.put_object(
                    Bucket=self._bucket,
                    Key=file_key(user_id, file_id),
                    Body=data,
                    ContentType=FILE_CONTENT_TYPE,
                    Metadata=metadata,
                    IfNoneMatch="*",
                )
        except Exception as exc:
            if is_precondition_failed(exc):
                return None
            raise
        return StoredFile(file_id, filename, purpose, len(data), created_at)

    async def get(self, user_id: str, file_id: str) -> StoredFile | None:
        """The file, or None when the user has no such file."""
        async with self._limit:
            head = await head_object(self._s3, self._bucket, file_key(user_id, file_id))
        if head is None:
            return None
        metadata = head.get("Metadata") or {}
        created = metadata.get("created-at", "")
        return StoredFile(
            file_id=file_id,
            filename=unquote(metadata.get("filename", "")) or f"{file_id}.jsonl",
            purpose=metadata.get("purpose", "fine-tune"),
            size=int(head.get("ContentLength", 0)),
            created_at=int(created) if created.isdigit() else int(head["LastModified"].timestamp()),
        )

    async def ids(self, user_id: str) -> list[str]:
        """The user's file ids, oldest first."""
        prefix = files_prefix(user_id)
        contents, _ = await self._listing.objects(prefix)
        names = (obj["Key"][len(prefix) :] for obj in contents)
        return sorted(
            name.removesuffix(".jsonl")
            for name in names
            if name.endswith(".jsonl") and "/" not in name and is_valid_id(name.removesuffix(".jsonl"))
        )

    async def open(self, user_id: str, file_id: str) -> OpenedObject | None:
        """The file's GetObject response and its body's chunks; None when there is no such file."""
        return await open_object(self._s3, self._bucket, file_key(user_id, file_id))

    async def delete(self, user_id: str, file_id: str) -> bool:
        """Delete the file; False when there was none."""
        if await self.get(user_id, file_id) is None:
            return False
        async with self._limit:
            await self._s3.delete_object(Bucket=self._bucket, Key=file_key(user_id, file_id))
        return True
