"""The user's index of OpenAI-compatible fine-tuning jobs,
`users/{user_id}/fine_tuning_jobs/{job_id}.json` (`handlers.openai_models.FineTuningEntry`):
the only module of the API that touches those keys.

`/openai/v1/fine_tuning/jobs/{id}` names a job without its avatar; the entry says which avatar's
record (`adapters/jobs/{job_id}.json`, `handlers.job_store`) holds the job's state, and keeps what
only the OpenAI view shows. An entry is written once, before its job's record, with
`If-None-Match: *`, and removed again (If-Match) should the job not be queued; an entry whose
record is missing is left by a request that died in between, and is skipped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from contracts.ids import is_valid_id
from contracts.keys import fine_tuning_job_key, fine_tuning_jobs_prefix
from handlers.s3_json import S3Json

if TYPE_CHECKING:  # the OpenAI models load with the OpenAI application, not with the API's dependencies
    from handlers.openai_models import FineTuningEntry


class FineTuningStore:
    """Typed access to one bucket's fine-tuning job entries."""

    def __init__(self, s3: Any, bucket: str, max_concurrency: int = 64) -> None:
        self.objects = S3Json(s3, bucket, max_concurrency)

    async def create(self, user_id: str, entry: FineTuningEntry) -> str | None:
        """Write a new entry; its ETag, or None when the job id is taken."""
        return await self.objects.create(fine_tuning_job_key(user_id, entry.job_id), entry.to_json())

    async def get(self, user_id: str, job_id: str) -> FineTuningEntry | None:
        from handlers.openai_models import FineTuningEntry

        loaded = await self.objects.read(fine_tuning_job_key(user_id, job_id))
        return FineTuningEntry.model_validate_json(loaded[0]) if loaded else None

    async def delete_created(self, user_id: str, job_id: str, etag: str) -> bool:
        """Roll back an entry this request created."""
        return await self.objects.delete_if(fine_tuning_job_key(user_id, job_id), etag)

    async def job_ids(self, user_id: str) -> list[str]:
        """The user's fine-tuning job ids, newest first (job ids sort by creation time)."""
        prefix = fine_tuning_jobs_prefix(user_id)
        contents, _ = await self.objects.objects(prefix)
        names = (obj["Key"][len(prefix) :] for obj in contents)
        ids = (n.removesuffix(".json") for n in names if n.endswith(".json") and "/" not in n)
        return sorted((i for i in ids if is_valid_id(i)), reverse=True)
