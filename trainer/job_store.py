"""Job records and the avatar's active-job pointer in S3, seen from the worker. Every write is
conditional (`contracts.conditional`), so the API and workers never overwrite each other's
changes (a cancel request racing a progress update, two workers racing a claim)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from contracts.adapters import ActiveJobPointer
from contracts.conditional import RecordNotFound, write_attempts
from contracts.jobs import JobRecord, utcnow
from contracts.keys import active_job_key, job_key
from trainer.s3_objects import S3Objects

Mutation = Callable[[JobRecord], JobRecord | None]


class JobStore:
    def __init__(self, s3: Any, bucket: str) -> None:
        self._objects = S3Objects(s3, bucket)

    def load(self, user_id: str, avatar_id: str, job_id: str) -> tuple[JobRecord, str] | None:
        """The record and its ETag, or None when there is none."""
        found = self._objects.read(job_key(user_id, avatar_id, job_id))
        return None if found is None else (JobRecord.model_validate_json(found[0]), found[1])

    def create(self, record: JobRecord) -> bool:
        """Write a new record; False when one exists already."""
        key = job_key(record.user_id, record.avatar_id, record.id)
        return self._objects.create(key, record.to_json()) is not None

    def update(self, user_id: str, avatar_id: str, job_id: str, mutate: Mutation) -> JobRecord:
        """Read, mutate, write back if unchanged meanwhile (If-Match); retry on a lost race.

        `mutate` gets a copy and returns the new record, or None to leave it as it is. Raises
        RecordNotFound when the record is gone, StoreBusy after too many lost races."""
        key = job_key(user_id, avatar_id, job_id)
        for _ in write_attempts(f"job {job_id}"):
            loaded = self.load(user_id, avatar_id, job_id)
            if loaded is None:
                raise RecordNotFound(f"job {job_id} has no record")
            current, etag = loaded
            updated = mutate(current.model_copy(deep=True))
            if updated is None:
                return current
            updated.updated_at = utcnow()
            if self._objects.replace(key, updated.to_json(), etag) is not None:
                return updated
        raise AssertionError("unreachable: write_attempts raises when it runs out")

    def ensure_active_pointer(self, user_id: str, avatar_id: str, job_id: str) -> None:
        """Point the avatar's active-job marker at this job when no other job holds it
        (jobs sent straight to the queue by other services have none yet)."""
        body = ActiveJobPointer(job_id=job_id).model_dump_json().encode()
        self._objects.create(active_job_key(user_id, avatar_id), body)

    def clear_active_pointer(self, user_id: str, avatar_id: str, job_id: str) -> None:
        """Remove the avatar's active-job marker if, and only if, it still names this job."""
        key = active_job_key(user_id, avatar_id)
        found = self._objects.read(key)
        if found is None or ActiveJobPointer.model_validate_json(found[0]).job_id != job_id:
            return
        self._objects.delete_if(key, found[1])
