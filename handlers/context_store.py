"""Context documents in S3: `users/{u}/avatars/{a}/vectorstore_data/{name}` (RAG). The only
module of the API that touches those keys, and the only one that looks (never writes) under
the user's vector index `users/{u}/vectorstore/`, which index jobs on the trainer own.

Context documents carry no tags, so a listing is a plain ListObjectsV2 in name order.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel

from contracts.context_documents import context_content_type
from contracts.keys import context_data_prefix, context_document_key, document_name_from_key, vectorstore_prefix
from handlers.avatar_ref import AvatarRef
from handlers.documents import DocumentNotFound, PresignedUpload
from handlers.s3_objects import LIST_PAGE_SIZE, OpenedObject, head_object, open_object


class ContextDocument(BaseModel):
    """A context document as the API shows it."""

    name: str
    size: int
    etag: str
    last_modified: datetime
    content_type: str


def _content_type_or_default(name: str) -> str:
    try:
        return context_content_type(name)
    except ValueError:  # an object put behind the API's back with another extension
        return "application/octet-stream"


class ContextStore:
    """Typed access to one bucket's context documents."""

    def __init__(self, s3: Any, bucket: str, max_concurrency: int = 64) -> None:
        self._s3 = s3
        self._bucket = bucket
        self._limit = asyncio.Semaphore(max_concurrency)

    async def _exists(self, key: str) -> bool:
        async with self._limit:
            return await head_object(self._s3, self._bucket, key) is not None

    async def put(self, ref: AvatarRef, name: str, data: bytes) -> tuple[ContextDocument, bool]:
        """Create or replace a document (an already validated `name` and body); returns it and
        whether it was created."""
        key = context_document_key(ref.user_id, ref.avatar_id, name)
        existed = await self._exists(key)
        content_type = context_content_type(name)
        resp = await self._s3.put_object(Bucket=self._bucket, Key=key, Body=data, ContentType=content_type)
        doc = ContextDocument(
            name=name,
            size=len(data),
            etag=resp["ETag"].strip('"'),
            last_modified=datetime.now(UTC),
            content_type=content_type,
        )
        return doc, not existed

    async def open(self, ref: AvatarRef, name: str) -> OpenedObject:
        """The object's GetObject response and an iterator over its body chunks; DocumentNotFound
        when there is none."""
        opened = await open_object(self._s3, self._bucket, context_document_key(ref.user_id, ref.avatar_id, name))
        if opened is None:
            raise DocumentNotFound(name)
        return opened

    async def delete(self, ref: AvatarRef, name: str) -> None:
        """Delete one document; DocumentNotFound when there is none (S3 itself would not say)."""
        key = context_document_key(ref.user_id, ref.avatar_id, name)
        if not await self._exists(key):
            raise DocumentNotFound(name)
        await self._s3.delete_object(Bucket=self._bucket, Key=key)

    async def list(
        self, ref: AvatarRef, limit: int, after: str | None = None
    ) -> tuple[list[ContextDocument], str | None]:
        """Up to `limit` documents after the name `after`, in name order, and the name to continue
        after (None on the last page). Nested keys under the prefix are not documents and skipped."""
        prefix = context_data_prefix(ref.user_id, ref.avatar_id)
        docs: list[ContextDocument] = []
        start_after = prefix + after if after else None
        while True:
            args: dict[str, Any] = {
                "Bucket": self._bucket,
                "Prefix": prefix,
                "MaxKeys": min(LIST_PAGE_SIZE, limit + 1 - len(docs)),
            }
            if start_after:
                args["StartAfter"] = start_after
            resp = await self._s3.list_objects_v2(**args)
            contents = resp.get("Contents", [])
            for obj in contents:
                name = document_name_from_key(obj["Key"], prefix)
                if name is None:
                    continue
                docs.append(
                    ContextDocument(
                        name=name,
                        size=obj["Size"],
                        etag=obj["ETag"].strip('"'),
                        last_modified=obj["LastModified"],
                        content_type=_content_type_or_default(name),
                    )
                )
            if len(docs) > limit:
                return docs[:limit], docs[limit - 1].name
            if not resp.get("IsTruncated") or not contents:
                return docs, None
            start_after = contents[-1]["Key"]

    async def has_documents(self, ref: AvatarRef) -> bool:
        docs, _ = await self.list(ref, 1)
        return bool(docs)

    async def has_vector_index(self, user_id: str) -> bool:
        """Whether index jobs have written anything of the user's vector index yet."""
        resp = await self._s3.list_objects_v2(Bucket=self._bucket, Prefix=vectorstore_prefix(user_id), MaxKeys=1)
        return bool(resp.get("Contents"))

    async def presign_upload(self, ref: AvatarRef, name: str, size: int, expires_in: int) -> PresignedUpload:
        """A SigV4 presigned PUT with `Content-Type` and `Content-Length` signed: the client sends
        them exactly as returned, and S3 accepts no body of another size."""
        key = context_document_key(ref.user_id, ref.avatar_id, name)
        content_type = context_content_type(name)
        url = await self._s3.generate_presigned_url(
            "put_object",
            Params={"Bucket": self._bucket, "Key": key, "ContentType": content_type, "ContentLength": size},
            ExpiresIn=expires_in,
            HttpMethod="PUT",
        )
        return PresignedUpload(
            url=url,
            headers={"Content-Type": content_type, "Content-Length": str(size)},
            expires_at=datetime.now(UTC) + timedelta(seconds=expires_in),
        )
