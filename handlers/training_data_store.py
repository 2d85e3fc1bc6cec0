"""Training documents in S3: `users/{u}/avatars/{a}/adapters/training_data/{name}`, each with
the `use_for_training` tag. The only module of the API that touches those keys."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

from pydantic import BaseModel

from contracts.documents import content_type_for
from contracts.keys import document_name_from_key, training_data_prefix, training_document_key
from contracts.tags import (
    DEFAULT_USE_FOR_TRAINING,
    USE_FOR_TRAINING,
    flag_from_tagset,
    flag_value,
    tagging_header,
)
from handlers.auth import AvatarRef
from handlers.aws import NOT_FOUND_CODES, error_code

LIST_PAGE_SIZE = 1000  # S3's maximum per ListObjectsV2 call
DELETE_BATCH_SIZE = 1000  # S3's maximum per DeleteObjects call


class TrainingDocument(BaseModel):
    """A training document as the API shows it."""

    name: str
    size: int
    etag: str
    last_modified: datetime
    use_for_training: bool
    content_type: str


class DocumentNotFound(Exception):
    pass


class PresignedUpload(BaseModel):
    url: str
    headers: dict[str, str]
    expires_at: datetime


def encode_cursor(last_name: str) -> str:
    return base64.urlsafe_b64encode(last_name.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The document name a page ends after; raises ValueError for a cursor we did not issue."""
    padded = cursor + "=" * (-len(cursor) % 4)
    try:
        name = base64.urlsafe_b64decode(padded.encode()).decode()
    except Exception:
        raise ValueError("invalid cursor") from None
    if not name or "/" in name or len(name) > 1024:
        raise ValueError("invalid cursor")
    return name


class TrainingDataStore:
    """Typed access to one bucket's training documents."""

    def __init__(self, s3: Any, bucket: str, max_concurrency: int = 64) -> None:
        self._s3 = s3
        self._bucket = bucket
        self._limit = asyncio.Semaphore(max_concurrency)

    # -- single documents -------------------------------------------------------------------

    async def read_flag(self, key: str) -> bool | None:
        """The document's flag, or None when the object does not exist."""
        try:
            async with self._limit:
                resp = await self._s3.get_object_tagging(Bucket=self._bucket, Key=key)
        except Exception as exc:
            if error_code(exc) in NOT_FOUND_CODES:
                return None
            raise
        return flag_from_tagset(resp.get("TagSet", []))

    async def put(
        self, ref: AvatarRef, name: str, data: bytes, flag: bool | None
    ) -> tuple[TrainingDocument, bool]:
        """Create or replace a document in one PutObject (content and tag land together);
        returns the document and whether it was created.

        A plain PutObject drops the old tags, so a replace without a new flag re-sends the
        existing one."""
        key = training_document_key(ref.user_id, ref.avatar_id, name)
        existing = await self.read_flag(key)
        if flag is None:
            flag = DEFAULT_USE_FOR_TRAINING if existing is None else existing
        content_type = content_type_for(name)
        resp = await self._s3.put_object(
            Bucket=self._bucket, Key=key, Body=data, ContentType=content_type, Tagging=tagging_header(flag)
        )
        doc = TrainingDocument(
            name=name,
            size=len(data),
            etag=resp["ETag"].strip('"'),
            last_modified=datetime.now(timezone.utc),
            use_for_training=flag,
            content_type=content_type,
        )
        return doc, existing is None

    async def describe(self, ref: AvatarRef, name: str) -> TrainingDocument:
        key = training_document_key(ref.user_id, ref.avatar_id, name)
        head, tags = await asyncio.gather(
            self._s3.head_object(Bucket=self._bucket, Key=key),
            self._s3.get_object_tagging(Bucket=self._bucket, Key=key),
            return_exceptions=True,
        )
        for result in (head, tags):
            if isinstance(result, BaseException):
                if error_code(result) in NOT_FOUND_CODES:  # type: ignore[arg-type]
                    raise DocumentNotFound(name)
                raise result
        return TrainingDocument(
            name=name,
            size=head["ContentLength"],
            etag=head["ETag"].strip('"'),
            last_modified=head["LastModified"],
            use_for_training=flag_from_tagset(tags.get("TagSet", [])),
            content_type=content_type_for(name),
        )

    async def open(self, ref: AvatarRef, name: str) -> tuple[dict[str, Any], AsyncIterator[bytes]]:
        """The object's GetObject response and an iterator over its body chunks."""
        key = training_document_key(ref.user_id, ref.avatar_id, name)
        try:
            resp = await self._s3.get_object(Bucket=self._bucket, Key=key)
        except Exception as exc:
            if error_code(exc) in NOT_FOUND_CODES:
                raise DocumentNotFound(name) from None
            raise

        async def chunks() -> AsyncIterator[bytes]:
            async with resp["Body"] as body:
                async for chunk in body.iter_chunks(64 * 1024):
                    yield chunk

        return resp, chunks()

    async def set_flag(self, ref: AvatarRef, name: str, flag: bool) -> TrainingDocument:
        """Set the flag, keeping any other tags the object carries."""
        key = training_document_key(ref.user_id, ref.avatar_id, name)
        try:
            tags = (await self._s3.get_object_tagging(Bucket=self._bucket, Key=key)).get("TagSet", [])
        except Exception as exc:
            if error_code(exc) in NOT_FOUND_CODES:
                raise DocumentNotFound(name) from None
            raise
        tags = [t for t in tags if t.get("Key") != USE_FOR_TRAINING]
        tags.append({"Key": USE_FOR_TRAINING, "Value": flag_value(flag)})
        await self._s3.put_object_tagging(Bucket=self._bucket, Key=key, Tagging={"TagSet": tags})
        return await self.describe(ref, name)

    async def delete(self, ref: AvatarRef, name: str) -> None:
        key = training_document_key(ref.user_id, ref.avatar_id, name)
        try:
            await self._s3.head_object(Bucket=self._bucket, Key=key)
        except Exception as exc:
            if error_code(exc) in NOT_FOUND_CODES:
                raise DocumentNotFound(name) from None
            raise
        await self._s3.delete_object(Bucket=self._bucket, Key=key)

    # -- listings ---------------------------------------------------------------------------

    async def _with_flags(self, prefix: str, objects: list[dict[str, Any]]) -> list[TrainingDocument]:
        """Attach each object's flag: S3 lists no tags, so read them concurrently (bounded)."""

        async def one(obj: dict[str, Any]) -> TrainingDocument | None:
            name = document_name_from_key(obj["Key"], prefix)
            if name is None:
                return None
            flag = await self.read_flag(obj["Key"])
            if flag is None:  # deleted between the listing and the tag read
                return None
            return TrainingDocument(
                name=name,
                size=obj["Size"],
                etag=obj["ETag"].strip('"'),
                last_modified=obj["LastModified"],
                use_for_training=flag,
                content_type=_content_type_or_default(name),
            )

        docs = await asyncio.gather(*(one(o) for o in objects))
        return [d for d in docs if d is not None]

    async def _pages(self, prefix: str, start_after: str | None, page_size: int) -> AsyncIterator[list[dict[str, Any]]]:
        kwargs: dict[str, Any] = {"Bucket": self._bucket, "Prefix": prefix, "MaxKeys": page_size}
        if start_after:
            kwargs["StartAfter"] = prefix + start_after
        while True:
            resp = await self._s3.list_objects_v2(**kwargs)
            contents = resp.get("Contents", [])
            if contents:
                yield contents
            if not resp.get("IsTruncated"):
                return
            kwargs.pop("StartAfter", None)
            kwargs["ContinuationToken"] = resp["NextContinuationToken"]

    async def list(
        self, ref: AvatarRef, flag: bool | None, limit: int, after: str | None = None
    ) -> tuple[list[TrainingDocument], str | None]:
        """Up to `limit` documents after the name `after` (matching `flag` when given) and the
        name to continue after, or None on the last page."""
        prefix = training_data_prefix(ref.user_id, ref.avatar_id)
        items: list[TrainingDocument] = []
        page_size = min(LIST_PAGE_SIZE, limit + 1) if flag is None else LIST_PAGE_SIZE
        async for page in self._pages(prefix, after, page_size):
            for i in range(0, len(page), LIST_PAGE_SIZE):
                docs = await self._with_flags(prefix, page[i : i + LIST_PAGE_SIZE])
                for doc in docs:
                    if flag is not None and doc.use_for_training != flag:
                        continue
                    if len(items) == limit:
                        return items, items[-1].name
                    items.append(doc)
        return items, None

    async def iter_all(self, ref: AvatarRef, flag: bool | None) -> AsyncIterator[TrainingDocument]:
        """Every document matching `flag` (all when None), in name order."""
        prefix = training_data_prefix(ref.user_id, ref.avatar_id)
        async for page in self._pages(prefix, None, LIST_PAGE_SIZE):
            for doc in await self._with_flags(prefix, page):
                if flag is None or doc.use_for_training == flag:
                    yield doc

    async def delete_where(self, ref: AvatarRef, flag: bool) -> int:
        """Delete every document whose flag equals `flag`; returns how many were deleted."""
        keys = [
            training_document_key(ref.user_id, ref.avatar_id, doc.name)
            async for doc in self.iter_all(ref, flag)
        ]
        deleted = 0
        for i in range(0, len(keys), DELETE_BATCH_SIZE):
            batch = keys[i : i + DELETE_BATCH_SIZE]
            resp = await self._s3.delete_objects(
                Bucket=self._bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
            )
            errors = resp.get("Errors", [])
            if errors:
                raise RuntimeError(f"S3 refused to delete {len(errors)} documents")
            deleted += len(batch)
        return deleted

    # -- presigned uploads ------------------------------------------------------------------

    async def presign_upload(self, ref: AvatarRef, name: str, flag: bool, expires_in: int) -> PresignedUpload:
        """A SigV4 presigned PUT whose `x-amz-tagging` and `Content-Type` are signed headers:
        the client must send them exactly as returned, so the flag cannot be dropped or changed."""
        key = training_document_key(ref.user_id, ref.avatar_id, name)
        content_type = content_type_for(name)
        tagging = tagging_header(flag)
        url = await self._s3.generate_presigned_url(
            "put_object",
            Params={"Bucket": self._bucket, "Key": key, "Tagging": tagging, "ContentType": content_type},
            ExpiresIn=expires_in,
            HttpMethod="PUT",
        )
        return PresignedUpload(
            url=url,
            headers={"x-amz-tagging": tagging, "Content-Type": content_type},
            expires_at=datetime.now(timezone.utc) + timedelta(seconds=expires_in),
        )


def _content_type_or_default(name: str) -> str:
    try:
        return content_type_for(name)
    except ValueError:  # an object put behind the API's back with another extension
        return "application/octet-stream"
