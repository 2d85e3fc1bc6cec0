"""Job records in S3, updated with conditional writes so the API and workers never overwrite
each other's changes (a cancel request racing a progress update, two workers racing a claim)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from contracts.adapters import ActiveJobPointer
from contracts.jobs import JobRecord, utcnow
from contracts.keys import active_job_key, job_key
from trainer.aws import is_not_found, is_precondition_failed

Mutation = Callable[[JobRecord], JobRecord | None]


class JobStore:
    def __init__(self, s3: Any, bucket: str) -> None:
        self._s3 = s3
        self._bucket = bucket

    def load(self, user_id: str, avatar_id: str, job_id: str) -> tuple[JobRecord, str] | None:
        """The record and its ETag, or None when there is none."""
        try:
            resp = self._s3.get_object(Bucket=self._bucket, Key=job_key(user_id, avatar_id, job_id))
        except Exception as exc:
            if is_not_found(exc):
                return None
            raise
        return JobRecord.model_validate_json(resp["Body"].read()), resp["ETag"]

    def create(self, record: JobRecord) -> bool:
        """Write a new record; False when one exists already."""
        try:
            self._s3.put_object(
                Bucket=self._bucket,
                Key=job_key(record.user_id, record.avatar_id, record.id),
                Body=record.to_json(),
                ContentType="application/json",
                IfNoneMatch="*",
            )
        except Exception as exc:
            if is_precondition_failed(exc):
                return False
            raise
        return True

    def update(self, user_id: str, avatar_id: str, job_id: str, mutate: Mutation) -> JobRecord:
        """Read, mutate, write back if unchanged meanwhile (If-Match); retry on a lost race.

        `mutate` gets a copy and returns the new record, or None to leave it as it is."""
        while True:
            loaded = self.load(user_id, avatar_id, job_id)
            if loaded is None:
                raise LookupError(f"job {job_id} has no record")
            current, etag = loaded
            updated = mutate(current.model_copy(deep=True))
            if updated is None:
                return current
            updated.updated_at = utcnow()
            try:
                self._s3.put_object(
                    Bucket=self._bucket,
                    Key=job_key(user_id, avatar_id, job_id),
                    Body=updated.to_json(),
                    ContentType="application/json",
                    IfMatch=etag,
                )
            except Exception as exc:
                if is_precondition_failed(exc):
                    continue
                raise
            return updated

    def ensure_active_pointer(self, user_id: str, avatar_id: str, job_id: str) -> None:
        """Point the avatar's active-job marker at this job when no other job holds it
        (jobs sent straight to the queue by other services have none yet)."""
        try:
            self._s3.put_object(
                Bucket=self._bucket,
                Key=active_job_key(user_id, avatar_id),
                Body=ActiveJobPointer(job_id=job_id).model_dump_json().encode(),
                ContentType="application/json",
                IfNoneMatch="*",
            )
        except Exception as exc:
            if not is_precondition_failed(exc):
                raise

    def clear_active_pointer(self, user_id: str, avatar_id: str, job_id: str) -> None:
        """Remove the avatar's active-job marker if, and only if, it still names this job."""
        key = active_job_key(user_id, avatar_id)
        try:
            resp = self._s3.get_object(Bucket=self._bucket, Key=key)
        except Exception as exc:
            if is_not_found(exc):
                return
            raise
        if ActiveJobPointer.model_validate_json(resp["Body"].read()).job_id != job_id:
            return
        try:
            self._s3.delete_object(Bucket=self._bucket, Key=key, IfMatch=resp["ETag"])
        except Exception as exc:
            if not (is_precondition_failed(exc) or is_not_found(exc)):
                raise
