"""Jobs whose worker vanished, and the final events the API itself publishes.

A `running` job whose lease expired more than STALE_LEASE_SECONDS ago has no worker: its message
should have come back to another one long before (SQS returns it once its visibility lapses), so
the message is lost too (in the dead-letter queue, or deleted by a worker that crashed at the
wrong moment). Left alone it would keep the avatar locked and count against the user's cap for
ever. Whenever the API meets such a job (creating a job on its avatar, counting the user's
active jobs, showing or cancelling it) it settles it in one conditional write:

- one more failed attempt (the vanished one); under MAX_JOB_ATTEMPTS, `queued` again with a
  fresh copy of its request on the train queue (the trainer resumes from its last checkpoint);
- at MAX_JOB_ATTEMPTS, `failed` with the reason, the avatar's slot freed, `job.failed` published.

Events the API publishes (a cancel of a queued job, a job given up) are marked on the record
(`events_published`), so the trainer, meeting the job's message later, does not send them again.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from contracts.job_kinds import request_of
from contracts.jobs import JobRecord, utcnow
from contracts.messages import EventType, JobEvent, event_id
from handlers.avatar_ref import AvatarRef
from handlers.job_store import JobNotFound, JobStore
from handlers.settings import Settings
from handlers.train_queue import TrainQueue

log = logging.getLogger("avatune.api")


def is_abandoned(record: JobRecord, stale_after: timedelta) -> bool:
    """`running` under a lease that expired more than `stale_after` ago: no worker has it."""
    lease = record.lease
    return record.status == "running" and lease is not None and lease.expires_at < utcnow() - stale_after


class JobRecovery:
    """Settles abandoned jobs and publishes the API's own final events."""

    def __init__(self, jobs: JobStore, queue: TrainQueue, settings: Settings) -> None:
        self._jobs = jobs
        self._queue = queue
        self._stale_after = timedelta(seconds=settings.stale_lease_seconds)
        self._max_failures = settings.max_job_attempts

    def abandoned(self, record: JobRecord | None) -> bool:
        return record is not None and is_abandoned(record, self._stale_after)

    async def settle(self, avatar: AvatarRef, record: JobRecord) -> JobRecord:
        """`record` as it is once settled (unchanged when it is not abandoned)."""
        if not self.abandoned(record):
            return record

        def settle(current: JobRecord) -> JobRecord | None:
            if not self.abandoned(current):
                return None  # a worker took it back meanwhile (or our own write already went in)
            assert current.lease is not None
            lost = (
                f"its worker stopped renewing its lease at {current.lease.expires_at:%Y-%m-%d %H:%M:%S}Z "
                "and no worker took the job back"
            )
            current.failures += 1
            current.lease = None
            current.redelivery = None
            if current.failures >= self._max_failures:
                current.status = "failed"
                current.finished_at = utcnow()
                current.error = f"gave up after {current.failures} failed attempts: {lost}"
            else:
                current.status = "queued"
                current.error = lost
            return current

        try:
            settled = await self._jobs.update(avatar, record.id, settle)
        except JobNotFound:
            return record
        # Decided by what the record says now, not by whether this call's write went in: when
        # S3's answer to it is lost, the retry finds the job already settled (by this very
        # write) and changes nothing, and the message must go out all the same. The
        # deduplication id makes a second send of the same settlement a no-op.
        if settled.failures <= record.failures:
            return settled  # someone else's change: not ours to follow up
        if settled.status == "queued":
            log.warning("job %s had no worker for its lease; queued again", record.id)
            await self._queue.send(request_of(settled), deduplication_id=f"{record.id}.requeue-{settled.failures}")
        elif settled.status == "failed":
            log.warning("job %s had no worker for its lease; failed", record.id)
            await self.finished_here(avatar, settled)
        return settled

    async def count_active(self, user_id: str) -> int:
        """The user's active jobs, abandoned ones settled first (a given-up one no longer counts)."""
        count = 0
        for avatar, active in await self._jobs.active_jobs(user_id):
            record = active.record
            if record is not None and self.abandoned(record):
                record = await self.settle(avatar, record)
            count += record is None or record.is_active
        return count

    async def finished_here(self, avatar: AvatarRef, record: JobRecord) -> None:
        """The tail of a job the API ended itself (cancelled while queued, given up): the slot
        freed, checkpoints dropped, the final event published once. Each step is best effort
        (the job is final either way; a stale pointer is cleared by the next request that meets
        it, and the trainer publishes a missing event when it meets the job's message)."""
        try:
            await self._jobs.release_active(avatar, record.id)
            await self._jobs.delete_checkpoints(avatar, record.id)
        except Exception:
            log.exception("cleaning up after job %s failed", record.id)
        event: EventType = f"job.{record.status}"  # type: ignore[assignment]
        if event_id(record.id, event) in record.events_published:
            return
        try:
            await self._queue.publish(
                JobEvent(
                    event=event,
                    job_id=record.id,
                    user_id=avatar.user_id,
                    avatar_id=avatar.avatar_id,
                    status=record.status,
                    job_type=record.type,
                    adapter_version=record.adapter_version,
                    metrics=record.metrics,
                    error=record.error,
                )
            )
            await self._jobs.update(avatar, record.id, lambda r: _published(r, event_id(record.id, event)))
        except Exception:
            log.exception("publishing %s for job %s failed", event, record.id)


def _published(record: JobRecord, published: str) -> JobRecord | None:
    if published in record.events_published:
        return None
    record.events_published.append(published)
    return record
