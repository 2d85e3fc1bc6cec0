"""The `Idempotency-Key` records of feedback POSTs (`contracts.keys.feedback_idempotency_key`).

An app that retries a `POST {base}/feedback` whose answer it lost must not store the judgement
twice: a duplicate would weigh twice in every preference job. Each record names the item its
request created; it is written with If-None-Match before the item, so of two concurrent
requests with one key only one stores anything. Records carry IDEMPOTENCY_RECORD_TAG, so the
bucket's lifecycle rule expires them as it does the jobs' records.
"""

from __future__ import annotations

from typing import Any

from contracts.feedback import FeedbackKeyRecord
from contracts.jobs import utcnow
from contracts.keys import feedback_idempotency_key
from handlers.avatar_ref import AvatarRef
from handlers.idempotency import IDEMPOTENCY_RECORD_TAG
from handlers.s3_json import S3Json


class FeedbackKeys:
    """One bucket's feedback Idempotency-Key records."""

    def __init__(self, s3: Any, bucket: str, max_concurrency: int = 64) -> None:
        self.objects = S3Json(s3, bucket, max_concurrency)

    async def recall(self, ref: AvatarRef, key_hash: str) -> tuple[FeedbackKeyRecord, str] | None:
        """The record of an earlier request with this key and its ETag, or None."""
        loaded = await self.objects.read(feedback_idempotency_key(ref.user_id, ref.avatar_id, key_hash))
        if loaded is None:
            return None
        data, etag = loaded
        return FeedbackKeyRecord.model_validate_json(data), etag

    async def remember(self, ref: AvatarRef, key_hash: str, feedback_id: str, fingerprint: str) -> str | None:
        """Record that this key creates `feedback_id`; the ETag, or None when the key is taken."""
        record = FeedbackKeyRecord(feedback_id=feedback_id, fingerprint=fingerprint, created_at=utcnow())
        key = feedback_idempotency_key(ref.user_id, ref.avatar_id, key_hash)
        return await self.objects.create(key, record.model_dump_json().encode(), tagging=IDEMPOTENCY_RECORD_TAG)

    async def forget(self, ref: AvatarRef, key_hash: str, etag: str) -> bool:
        return await self.objects.delete_if(feedback_idempotency_key(ref.user_id, ref.avatar_id, key_hash), etag)
