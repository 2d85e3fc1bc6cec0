"""Training documents in S3: `users/{u}/avatars/{a}/adapters/training_data/{name}`, each with
the `use_for_training` tag. The only module of the API that touches those keys.

Listing by flag at scale: S3 lists no tags, so a listing reads each object's tag, unless the
avatar's *flag index* (`handlers.flag_index`, a cache whose entries carry their own proof)
still vouches for it. A large avatar's listing loads the index, and is then split at index
names into ranges fetched concurrently; a filtered page lists only as far as the index says
matches reach. What the listing learnt (tags read, documents gone) is written back.

The index only stays honest if a flag changes with a write of its object, so `set_flag`
(PATCH) rewrites the object in place with CopyObject and the new tag set rather than calling
PutObjectTagging (objects over CopyObject's 5 GiB limit: PutObjectTagging, and the index is
dropped).

"Delete all unused" never loses a document that is flagged `true` when it is deleted: each
listed document goes with `If-Match` on its listed ETag (a re-upload with other content
survives), and since a flag change keeps the ETag (same bytes), the version the delete covered
is checked afterwards on the versioned bucket: flagged `true` by a PATCH or a re-upload that
raced the delete, the delete marker is removed again and the document is back as it was.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlencode

from pydantic import BaseModel

from contracts.conditional import RecordNotFound
from contracts.documents import content_type_for
from contracts.keys import document_name_from_key, training_data_prefix, training_document_key
from contracts.tags import (
    DEFAULT_USE_FOR_TRAINING,
    USE_FOR_TRAINING,
    flag_from_tagset,
    flag_value,
    tagging_header,
)
from handlers.avatar_ref import AvatarRef
from handlers.documents import DocumentNotFound, PresignedUpload
from handlers.flag_index import INDEX_MIN_OBJECTS, FlagIndex, FlagIndexes, ListingScan
from handlers.s3_json import S3Json
from handlers.s3_objects import (
    LIST_PAGE_SIZE,
    OpenedObject,
    copy_if_unchanged,
    delete_if_match,
    head_object,
    object_tagging,
    open_object,
    version_below,
)

COPY_MAX_BYTES = 5 * 1024**3  # S3's largest CopyObject source

# Index names per concurrently listed range; MaxKeys leaves room for objects added since.
RANGE_NAMES = 900
RANGE_SLACK = 100
LIST_CONCURRENCY = 8


class TrainingDocument(BaseModel):
    """A training document as the API shows it."""

    name: str
    size: int
    etag: str
    last_modified: datetime
    use_for_training: bool
    content_type: str


class TrainingDataStore:
    """Typed access to one bucket's training documents."""

    def __init__(
        self,
        s3: Any,
        bucket: str,
        max_concurrency: int = 64,
        *,
        use_index: bool = True,
        index_min_objects: int = INDEX_MIN_OBJECTS,
    ) -> None:
        self._s3 = s3
        self._bucket = bucket
        self._indexes = FlagIndexes(S3Json(s3, bucket, max_concurrency))
        self._limit = asyncio.Semaphore(max_concurrency)
        self._list_limit = asyncio.Semaphore(LIST_CONCURRENCY)
        self._use_index = use_index
        self._index_min_objects = index_min_objects

    # -- single documents -------------------------------------------------------------------

    async def read_flag(self, key: str) -> bool | None:
        """The document's flag, or None when the object does not exist."""
        read = await self._read_flag_at(key)
        return None if read is None else read[0]

    async def _read_flag_at(self, key: str) -> tuple[bool, int] | None:
        """The flag and when S3 answered (epoch seconds, its `Date` header), or None when the
        object does not exist."""
        async with self._limit:
            resp = await object_tagging(self._s3, self._bucket, key)
        if resp is None:
            return None
        return flag_from_tagset(resp.get("TagSet", [])), _server_time(resp)

    async def put(self, ref: AvatarRef, name: str, data: bytes, flag: bool | None) -> tuple[TrainingDocument, bool]:
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
            last_modified=datetime.now(UTC),
            use_for_training=flag,
            content_type=content_type,
        )
        return doc, existing is None

    async def _head_and_tags(self, key: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """HeadObject and GetObjectTagging of one document, concurrently; DocumentNotFound if gone."""
        head, tags = await asyncio.gather(
            head_object(self._s3, self._bucket, key),
            object_tagging(self._s3, self._bucket, key),
            return_exceptions=True,
        )
        for result in (head, tags):
            if isinstance(result, BaseException):
                raise result
            if result is None:
                raise DocumentNotFound(name)
        return head, tags  # type: ignore[return-value]

    async def describe(self, ref: AvatarRef, name: str) -> TrainingDocument:
        key = training_document_key(ref.user_id, ref.avatar_id, name)
        head, tags = await self._head_and_tags(key, name)
        return TrainingDocument(
            name=name,
            size=head["ContentLength"],
            etag=head["ETag"].strip('"'),
            last_modified=head["LastModified"],
            use_for_training=flag_from_tagset(tags.get("TagSet", [])),
            content_type=content_type_for(name),
        )

    async def open(self, ref: AvatarRef, name: str) -> OpenedObject:
        """The object's GetObject response and an iterator over its body chunks; DocumentNotFound
        when there is none."""
        opened = await open_object(self._s3, self._bucket, training_document_key(ref.user_id, ref.avatar_id, name))
        if opened is None:
            raise DocumentNotFound(name)
        return opened

    async def set_flag(self, ref: AvatarRef, name: str, flag: bool) -> TrainingDocument:
        """Set the flag, keeping any other tags the object carries.

        The object is rewritten in place (CopyObject onto itself with the new tag set, same
        content, metadata and content type) instead of PutObjectTagging, so the change gives it
        a new LastModified, which is what keeps every flag index entry honest (module doc)."""
        key = training_document_key(ref.user_id, ref.avatar_id, name)
        for _ in range(5):
            head, tags = await self._head_and_tags(key, name)
            tagset = [t for t in tags.get("TagSet", []) if t.get("Key") != USE_FOR_TRAINING]
            tagset.append({"Key": USE_FOR_TRAINING, "Value": flag_value(flag)})
            if head["ContentLength"] > COPY_MAX_BYTES:
                return await self._set_flag_in_place(ref, name, key, tagset)
            try:
                resp = await copy_if_unchanged(self._s3, **_copy_in_place_args(self._bucket, key, head, tagset))
            except RecordNotFound:
                raise DocumentNotFound(name) from None
            if resp is None:  # replaced meanwhile: start over on the new object
                continue
            result = resp.get("CopyObjectResult", {})
            return TrainingDocument(
                name=name,
                size=head["ContentLength"],
                etag=str(result.get("ETag", head["ETag"])).strip('"'),
                last_modified=result.get("LastModified") or datetime.now(UTC),
                use_for_training=flag,
                content_type=content_type_for(name),
            )
        raise RuntimeError(f"{name} kept changing while its flag was being set")

    async def _set_flag_in_place(
        self, ref: AvatarRef, name: str, key: str, tagset: list[dict[str, str]]
    ) -> TrainingDocument:
        """Objects over CopyObject's 5 GiB limit: PutObjectTagging, then drop the avatar's flag
        index so that no listing trusts the old flag."""
        await self._s3.put_object_tagging(Bucket=self._bucket, Key=key, Tagging={"TagSet": tagset})
        await self._indexes.forget(ref)
        return await self.describe(ref, name)

    async def delete(self, ref: AvatarRef, name: str) -> None:
        key = training_document_key(ref.user_id, ref.avatar_id, name)
        if await head_object(self._s3, self._bucket, key) is None:
            raise DocumentNotFound(name)
        await self._s3.delete_object(Bucket=self._bucket, Key=key)

    # -- listings ---------------------------------------------------------------------------

    async def list(
        self, ref: AvatarRef, flag: bool | None, limit: int, after: str | None = None
    ) -> tuple[list[TrainingDocument], str | None]:
        """Up to `limit` documents after the name `after` (matching `flag` when given) and the
        name to continue after, or None on the last page."""
        docs = await self._collect(ref, flag, after, need=limit + 1)
        if len(docs) > limit:
            return docs[:limit], docs[limit - 1].name
        return docs, None

    async def list_named(
        self, ref: AvatarRef, name_prefix: str, limit: int, after: str | None = None
    ) -> tuple[list[TrainingDocument], str | None]:
        """Up to `limit` documents whose names start with `name_prefix`, in name order after
        `after`, with their flags; and the name to continue after (None on the last page). S3
        lists that prefix alone: one page and a tag read per document listed, however many
        other documents the avatar has (feedback items, `handlers.services.feedback`)."""
        prefix = training_data_prefix(ref.user_id, ref.avatar_id)
        kwargs: dict[str, Any] = {"Prefix": prefix + name_prefix, "MaxKeys": limit + 1}
        if after:
            kwargs["StartAfter"] = prefix + after
        resp = await self._list_page(**kwargs)
        contents = resp.get("Contents", [])
        objects = contents[:limit]
        more = len(contents) > limit or bool(resp.get("IsTruncated"))
        docs = await self._page_documents(prefix, objects, None, None, ListingScan(start=after))
        last = document_name_from_key(objects[-1]["Key"], prefix) if more and objects else None
        return docs, last

    async def read(self, ref: AvatarRef, name: str, max_bytes: int | None = None) -> bytes:
        """A document's content (its first `max_bytes` only, when given); DocumentNotFound when
        there is none."""
        key = training_document_key(ref.user_id, ref.avatar_id, name)
        extra = {} if max_bytes is None else {"Range": f"bytes=0-{max_bytes - 1}"}
        async with self._limit:
            opened = await open_object(self._s3, self._bucket, key, **extra)
            if opened is None:
                raise DocumentNotFound(name)
            return b"".join([chunk async for chunk in opened[1]])

    async def iter_all(self, ref: AvatarRef, flag: bool | None) -> AsyncIterator[TrainingDocument]:
        """Every document matching `flag` (all when None), in name order."""
        for doc in await self._collect(ref, flag, None, need=None):
            yield doc

    async def delete_where(self, ref: AvatarRef, flag: bool) -> int:
        """Delete every document whose flag equals `flag`; returns how many were deleted."""
        return await self.delete_listed(ref, [doc async for doc in self.iter_all(ref, flag)], flag)

    async def delete_listed(self, ref: AvatarRef, docs: list[TrainingDocument], flag: bool) -> int:
        """Delete the listed documents that still are as listed with flag `flag` (module doc);
        how many went."""

        async def one(doc: TrainingDocument) -> bool:
            async with self._limit:
                return await self._delete_as_listed(
                    training_document_key(ref.user_id, ref.avatar_id, doc.name), doc, flag
                )

        return sum(await asyncio.gather(*(one(doc) for doc in docs)))

    async def _delete_as_listed(self, key: str, doc: TrainingDocument, flag: bool) -> bool:
        deleted = await delete_if_match(self._s3, self._bucket, key, f'"{doc.etag}"')
        if deleted is None:
            return False  # replaced or gone since the listing: not ours to delete
        marker = deleted.get("VersionId")
        if not marker or not deleted.get("DeleteMarker"):
            return True  # an unversioned bucket: the ETag condition is all the check there is
        covered = await version_below(self._s3, self._bucket, key, marker)
        if covered is None:
            return True
        tags = await self._s3.get_object_tagging(Bucket=self._bucket, Key=key, VersionId=covered)
        if flag_from_tagset(tags.get("TagSet", [])) == flag:
            return True
        # The flag changed between the listing and the delete (same bytes, same ETag): undo.
        await self._s3.delete_object(Bucket=self._bucket, Key=key, VersionId=marker)
        return False

    async def _collect(
        self, ref: AvatarRef, flag: bool | None, after: str | None, need: int | None
    ) -> list[TrainingDocument]:
        """Documents after `after` matching `flag`, in name order, until `need` of them (all
        when None). Lists the objects, takes each flag from the index when the index entry
        still proves it, reads the tag otherwise, and writes what it learnt back."""
        prefix = training_data_prefix(ref.user_id, ref.avatar_id)
        index = self._indexes.cached(ref) if self._use_index else None
        scan = ListingScan(start=after)
        docs: list[TrainingDocument] = []
        pages = self._planned_pages(prefix, after, index, flag, need) if index else self._pages(prefix, after)
        try:
            while need is None or len(docs) < need:
                page = await anext(pages, None)
                if page is None:
                    scan.reached_end = True
                    break
                objects, upper = page
                if index is None and self._use_index and (len(objects) >= self._index_min_objects or upper is not None):
                    # A large avatar (or a long scan): worth the index from here on.
                    index = await self._indexes.load(ref)
                    if upper is not None:
                        await pages.aclose()
                        docs += await self._page_documents(prefix, objects, flag, index, scan)
                        scan.cover(upper)
                        remaining = None if need is None else need - len(docs)
                        if remaining is not None and remaining <= 0:
                            break
                        pages = self._planned_pages(prefix, upper, index, flag, remaining)
                        continue
                docs += await self._page_documents(prefix, objects, flag, index, scan)
                scan.cover(upper)
        finally:
            await pages.aclose()
        if index is not None:
            await self._indexes.save(ref, index, scan)
        return docs if need is None else docs[:need]

    async def _page_documents(
        self, prefix: str, objects: list[dict[str, Any]], flag: bool | None, index: FlagIndex | None, scan: ListingScan
    ) -> list[TrainingDocument]:
        """The documents of one listed page that match `flag` (flags from the index or read)."""
        now = time.time()
        named: list[tuple[str, dict[str, Any], int]] = []
        unknown: list[int] = []
        flags: list[bool | None] = []
        for obj in objects:
            name = document_name_from_key(obj["Key"], prefix)
            if name is None:
                continue
            modified = _epoch(obj["LastModified"])
            scan.seen.add(name)
            known = index.flag(name, obj["ETag"], modified, now) if index is not None else None
            if known is None:
                unknown.append(len(named))
            named.append((name, obj, modified))
            flags.append(known)
        if unknown:
            reads = await asyncio.gather(*(self._read_flag_at(named[i][1]["Key"]) for i in unknown))
            for i, read in zip(unknown, reads):
                if read is None:  # deleted between the listing and the tag read
                    continue
                name, obj, modified = named[i]
                flags[i] = read[0]
                if index is not None:
                    scan.verify(name, obj["ETag"], modified, read[0], read[1])
            scan.tag_reads += len(unknown)
        docs = []
        for (name, obj, _), doc_flag in zip(named, flags):
            if doc_flag is None or (flag is not None and doc_flag != flag):
                continue
            docs.append(
                TrainingDocument(
                    name=name,
                    size=obj["Size"],
                    etag=obj["ETag"].strip('"'),
                    last_modified=obj["LastModified"],
                    use_for_training=doc_flag,
                    content_type=content_type_or_default(name),
                )
            )
        return docs

    async def _list_page(self, **kwargs: Any) -> dict[str, Any]:
        async with self._list_limit:
            return await self._s3.list_objects_v2(Bucket=self._bucket, **kwargs)

    async def _pages(
        self, prefix: str, start_after: str | None
    ) -> AsyncIterator[tuple[list[dict[str, Any]], str | None]]:
        """Listing pages one after another: (objects, the name they cover up to, None at the end)."""
        kwargs: dict[str, Any] = {"Prefix": prefix, "MaxKeys": LIST_PAGE_SIZE}
        if start_after:
            kwargs["StartAfter"] = prefix + start_after
        while True:
            resp = await self._list_page(**kwargs)
            contents = resp.get("Contents", [])
            if not resp.get("IsTruncated"):
                if contents:
                    yield contents, None
                return
            yield contents, contents[-1]["Key"][len(prefix) :]
            kwargs.pop("StartAfter", None)
            kwargs["ContinuationToken"] = resp["NextContinuationToken"]

    async def _range(self, prefix: str, low: str | None, high: str | None, max_keys: int) -> list[dict[str, Any]]:
        """Every object with low < name <= high (no upper bound when high is None)."""
        kwargs: dict[str, Any] = {"Prefix": prefix, "MaxKeys": max_keys}
        if low:
            kwargs["StartAfter"] = prefix + low
        high_key = None if high is None else prefix + high
        objects: list[dict[str, Any]] = []
        while True:
            resp = await self._list_page(**kwargs)
            contents = resp.get("Contents", [])
            for obj in contents:
                if high_key is not None and obj["Key"] > high_key:
                    return objects
                objects.append(obj)
            if not resp.get("IsTruncated") or (high_key is not None and contents and contents[-1]["Key"] >= high_key):
                return objects
            kwargs.pop("StartAfter", None)
            kwargs["ContinuationToken"] = resp["NextContinuationToken"]
            kwargs["MaxKeys"] = LIST_PAGE_SIZE

    async def _planned_pages(
        self, prefix: str, start_after: str | None, index: FlagIndex, flag: bool | None, need: int | None
    ) -> AsyncIterator[tuple[list[dict[str, Any]], str | None]]:
        """Listing pages after `start_after`, split at index names into ranges that are listed
        concurrently and yielded in order. With `need`, only as far as the index says `need`
        matches reach (plus slack); beyond that, plain pages one after another."""
        names = index.names()
        first = bisect.bisect_right(names, start_after) if start_after else 0
        stop = index.reach(first, flag, need)
        if first >= stop:
            async for page in self._pages(prefix, start_after):
                yield page
            return
        to_end = stop >= len(names)
        ranges = []
        low = start_after
        for i in range(first, stop, RANGE_NAMES):
            j = min(i + RANGE_NAMES, stop)
            high = None if (to_end and j == stop) else names[j - 1]
            ranges.append((low, high, min(LIST_PAGE_SIZE, j - i + RANGE_SLACK)))
            low = high
        tasks = [asyncio.create_task(self._range(prefix, lo, hi, n)) for lo, hi, n in ranges]
        try:
            for task, (_, high, _) in zip(tasks, ranges):
                yield await task, high
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if not to_end:
            async for page in self._pages(prefix, ranges[-1][1]):
                yield page

    # -- presigned uploads ------------------------------------------------------------------

    async def presign_upload(
        self, ref: AvatarRef, name: str, flag: bool, size: int, expires_in: int
    ) -> PresignedUpload:
        """A SigV4 presigned PUT whose `x-amz-tagging`, `Content-Type` and `Content-Length` are
        signed headers: the client must send them exactly as returned, so the flag cannot be
        dropped or changed and no body of another size is accepted."""
        key = training_document_key(ref.user_id, ref.avatar_id, name)
        content_type = content_type_for(name)
        tagging = tagging_header(flag)
        url = await self._s3.generate_presigned_url(
            "put_object",
            Params={
                "Bucket": self._bucket,
                "Key": key,
                "Tagging": tagging,
                "ContentType": content_type,
                "ContentLength": size,
            },
            ExpiresIn=expires_in,
            HttpMethod="PUT",
        )
        return PresignedUpload(
            url=url,
            headers={"x-amz-tagging": tagging, "Content-Type": content_type, "Content-Length": str(size)},
            expires_at=datetime.now(UTC) + timedelta(seconds=expires_in),
        )


def content_type_or_default(name: str) -> str:
    """The content type of a listed document's name; octet-stream for a name the API would not
    have accepted (an object put behind its back with another extension)."""
    try:
        return content_type_for(name)
    except ValueError:
        return "application/octet-stream"


def _epoch(value: datetime) -> int:
    return int(value.timestamp())


def _server_time(resp: dict[str, Any]) -> int:
    """S3's clock at the response (its `Date` header), or ours minus a margin without one."""
    date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if date:
        try:
            return int(parsedate_to_datetime(date).timestamp())
        except (TypeError, ValueError):
            pass
    return int(time.time()) - 5


def _copy_in_place_args(bucket: str, key: str, head: dict[str, Any], tagset: list[dict[str, str]]) -> dict[str, Any]:
    """CopyObject arguments that rewrite `key` onto itself with `tagset`, keeping its content,
    content headers, user metadata, storage class and encryption."""
    args: dict[str, Any] = {
        "Bucket": bucket,
        "Key": key,
        "CopySource": {"Bucket": bucket, "Key": key},
        "CopySourceIfMatch": head["ETag"],
        "MetadataDirective": "REPLACE",
        "Metadata": head.get("Metadata") or {},
        "TaggingDirective": "REPLACE",
        "Tagging": urlencode([(t["Key"], t["Value"]) for t in tagset]),
    }
    for name in (
        "ContentType",
        "CacheControl",
        "ContentDisposition",
        "ContentLanguage",
        "Expires",
        "WebsiteRedirectLocation",
        "StorageClass",
    ):
        if head.get(name):
            args[name] = head[name]
    encoding = ",".join(
        e for e in (head.get("ContentEncoding") or "").split(",") if e.strip() and e.strip() != "aws-chunked"
    )
    if encoding:
        args["ContentEncoding"] = encoding
    if head.get("ServerSideEncryption") == "aws:kms":
        args["ServerSideEncryption"] = "aws:kms"
        if head.get("SSEKMSKeyId"):
            args["SSEKMSKeyId"] = head["SSEKMSKeyId"]
        if head.get("BucketKeyEnabled") is not None:
            args["BucketKeyEnabled"] = head["BucketKeyEnabled"]
    return args
