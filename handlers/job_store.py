"""Job records (`adapters/jobs/{job_id}.json`), the avatar's active-job pointer
(`adapters/active_job.json`) and idempotency records (`adapters/idempotency/{sha256}.json`).
The only module of the API that touches those keys.

Every write is conditional: records and pointers are created with `If-None-Match: *` and
changed with `If-Match: <etag>` in a read-modify-write loop (`contracts.conditional`, through
`handlers.s3_json`), so the API and the trainer never overwrite each other's changes (a cancel
racing a progress update, two requests racing for the avatar's one active slot)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, timedelta
from typing import Any, TypeVar

from pydantic import ValidationError

from contracts.adapters import ActiveJobPointer, IdempotencyRecord
from contracts.conditional import RecordNotFound, write_attempts
from contracts.ids import is_valid_id
from contracts.jobs import JobRecord, utcnow
from contracts.keys import active_job_key, checkpoint_prefix, idempotency_key, job_key, jobs_prefix
from handlers.avatar_ref import AvatarRef
from handlers.idempotency import IDEMPOTENCY_RECORD_TAG
from handlers.s3_json import S3Json

# A pointer whose job record does not exist yet belongs to a request still creating its job
# (the pointer is written first); only once it is this old is it taken for debris.
POINTER_GRACE = timedelta(seconds=120)

Mutation = Callable[[JobRecord], JobRecord | None]
K = TypeVar("K")
T = TypeVar("T")


class JobNotFound(RecordNotFound):
    """The job an update was asked to change does not exist."""


@dataclass(frozen=True)
class ActiveJob:
    """The avatar's active job; `record` is None while the request creating it is still writing it."""

    job_id: str
    record: JobRecord | None


@dataclass(frozen=True)
class JobPage:
    items: list[JobRecord]
    # (job_id, avatar_id) of the last item when more follow, else None.
    next_after: tuple[str, str] | None


async def fill_page(
    candidates: Sequence[K], limit: int, load: Callable[[K], Awaitable[T | None]]
) -> tuple[list[T], bool]:
    """Up to `limit` items loaded from `candidates`, in their order, loading only as many as
    that takes (a load answering None is left out); and whether candidates are left unread."""
    items: list[T] = []
    read = 0
    while len(items) < limit and read < len(candidates):
        chunk = candidates[read : read + limit - len(items)]
        read += len(chunk)
        items.extend(item for item in await asyncio.gather(*(load(c) for c in chunk)) if item is not None)
    return items, read < len(candidates)


class JobStore:
    """Typed access to job records, active-job pointers and idempotency records."""

    def __init__(self, s3: Any, bucket: str, max_concurrency: int = 64) -> None:
        self.objects = S3Json(s3, bucket, max_concurrency)

    # -- job records ------------------------------------------------------------------------

    async def _load(self, ref: AvatarRef, job_id: str) -> tuple[JobRecord, str] | None:
        loaded = await self.objects.read(job_key(ref.user_id, ref.avatar_id, job_id))
        if loaded is None:
            return None
        data, etag = loaded
        return JobRecord.model_validate_json(data), etag

    async def get(self, ref: AvatarRef, job_id: str) -> JobRecord | None:
        loaded = await self._load(ref, job_id)
        return loaded[0] if loaded else None

    async def create(self, record: JobRecord) -> str | None:
        """Write a new record; its ETag, or None when the id is taken."""
        return await self.objects.create(job_key(record.user_id, record.avatar_id, record.id), record.to_json())

    async def update(self, ref: AvatarRef, job_id: str, mutate: Mutation) -> JobRecord:
        """Read, mutate, write back if unchanged meanwhile (If-Match); retry on a lost race.

        `mutate` gets a copy and returns the new record, or None to leave it as it is; it may
        raise to abort. Raises JobNotFound, StoreBusy."""
        for _ in write_attempts(f"job {job_id}"):
            loaded = await self._load(ref, job_id)
            if loaded is None:
                raise JobNotFound(job_id)
            current, etag = loaded
            updated = mutate(current.model_copy(deep=True))
            if updated is None:
                return current
            updated.updated_at = utcnow()
            if await self.objects.replace(job_key(ref.user_id, ref.avatar_id, job_id), updated.to_json(), etag):
                return updated
        raise AssertionError("unreachable: write_attempts raises StoreBusy")

    async def delete_created(self, ref: AvatarRef, job_id: str, etag: str) -> bool:
        """Roll back a record this request created, unless someone changed it since."""
        return await self.objects.delete_if(job_key(ref.user_id, ref.avatar_id, job_id), etag)

    async def job_ids(self, ref: AvatarRef) -> list[str]:
        """The avatar's job ids, newest first (ids sort by creation time)."""
        prefix = jobs_prefix(ref.user_id, ref.avatar_id)
        contents, _ = await self.objects.objects(prefix)
        ids = []
        for obj in contents:
            name = obj["Key"][len(prefix) :]
            if "/" in name or not name.endswith(".json"):
                continue
            job_id = name.removesuffix(".json")
            if is_valid_id(job_id):
                ids.append(job_id)
        return sorted(ids, reverse=True)

    async def page(self, refs: list[AvatarRef], limit: int, after: tuple[str, str] | None) -> JobPage:
        """Up to `limit` jobs of the given avatars, newest first, after the (job_id, avatar_id)
        `after`. Only the page's records are read."""
        by_avatar = {ref.avatar_id: ref for ref in refs}
        lists = await asyncio.gather(*(self.job_ids(ref) for ref in refs))
        entries = sorted(
            ((job_id, ref.avatar_id) for ref, ids in zip(refs, lists, strict=True) for job_id in ids), reverse=True
        )
        if after is not None:
            entries = [e for e in entries if e < after]
        # None: rolled back since the listing.
        items, more = await fill_page(entries, limit, lambda e: self.get(by_avatar[e[1]], e[0]))
        return JobPage(items=items, next_after=(items[-1].id, items[-1].avatar_id) if more and items else None)

    # -- the active-job pointer -------------------------------------------------------------

    async def claim_active(self, ref: AvatarRef, job_id: str) -> str | None:
        """Point the avatar's active slot at `job_id`; the pointer's ETag, or None when taken."""
        body = ActiveJobPointer(job_id=job_id).model_dump_json().encode()
        return await self.objects.create(active_job_key(ref.user_id, ref.avatar_id), body)

    async def release_claim(self, ref: AvatarRef, etag: str) -> bool:
        """Remove a pointer this request created (rollback), unless it changed since."""
        return await self.objects.delete_if(active_job_key(ref.user_id, ref.avatar_id), etag)

    async def release_active(self, ref: AvatarRef, job_id: str) -> None:
        """Remove the avatar's pointer if, and only if, it still names `job_id`."""
        key = active_job_key(ref.user_id, ref.avatar_id)
        loaded = await self.objects.read(key)
        if loaded is None:
            return
        data, etag = loaded
        try:
            pointer = ActiveJobPointer.model_validate_json(data)
        except ValidationError:
            return
        if pointer.job_id == job_id:
            await self.objects.delete_if(key, etag)

    async def active_job(self, ref: AvatarRef) -> ActiveJob | None:
        """The avatar's queued or running job, or None. A pointer to a finished or missing job
        is stale (its owner died between steps): it is removed, if still unchanged."""
        key = active_job_key(ref.user_id, ref.avatar_id)
        loaded = await self.objects.read(key)
        if loaded is None:
            return None
        data, etag = loaded
        try:
            pointer: ActiveJobPointer | None = ActiveJobPointer.model_validate_json(data)
        except ValidationError:
            pointer = None
        if pointer is not None and is_valid_id(pointer.job_id):
            record = await self.get(ref, pointer.job_id)
            if record is not None and record.is_active:
                return ActiveJob(pointer.job_id, record)
            created = pointer.created_at if pointer.created_at.tzinfo else pointer.created_at.replace(tzinfo=UTC)
            if record is None and utcnow() - created < POINTER_GRACE:
                return ActiveJob(pointer.job_id, None)
        await self.objects.delete_if(key, etag)
        return None

    async def avatar_ids(self, user_id: str) -> list[str]:
        return await self.objects.avatar_ids(user_id)

    async def active_jobs(self, user_id: str) -> list[tuple[AvatarRef, ActiveJob]]:
        """The user's avatars that have an active job, with it (stale pointers are cleared)."""
        refs = [AvatarRef(user_id, a) for a in await self.avatar_ids(user_id)]
        active = await asyncio.gather(*(self.active_job(ref) for ref in refs))
        return [(ref, job) for ref, job in zip(refs, active, strict=True) if job is not None]

    async def count_active(self, user_id: str) -> int:
        """How many of the user's avatars have an active job (stale pointers are cleared)."""
        return len(await self.active_jobs(user_id))

    async def delete_checkpoints(self, ref: AvatarRef, job_id: str) -> int:
        """Drop a job's checkpoints (a job that ended without a worker: cancelled while queued
        after a hand-back, or given up); how many objects went."""
        contents, _ = await self.objects.objects(checkpoint_prefix(ref.user_id, ref.avatar_id, job_id))
        for obj in contents:
            await self.objects.delete(obj["Key"])
        return len(contents)

    # -- idempotency records ----------------------------------------------------------------

    async def idempotency_record(self, ref: AvatarRef, key_hash: str) -> tuple[IdempotencyRecord, str] | None:
        """The record of an earlier request with this key and its ETag, or None."""
        loaded = await self.objects.read(idempotency_key(ref.user_id, ref.avatar_id, key_hash))
        if loaded is None:
            return None
        data, etag = loaded
        return IdempotencyRecord.model_validate_json(data), etag

    async def remember(self, ref: AvatarRef, key_hash: str, job_id: str, fingerprint: str) -> str | None:
        """Record that this key created `job_id`; the ETag, or None when the key is taken."""
        body = IdempotencyRecord(job_id=job_id, fingerprint=fingerprint).model_dump_json().encode()
        return await self.objects.create(
            idempotency_key(ref.user_id, ref.avatar_id, key_hash), body, tagging=IDEMPOTENCY_RECORD_TAG
        )

    async def forget(self, ref: AvatarRef, key_hash: str, etag: str) -> bool:
        return await self.objects.delete_if(idempotency_key(ref.user_id, ref.avatar_id, key_hash), etag)
