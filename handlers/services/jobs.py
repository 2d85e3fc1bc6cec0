"""Jobs of every kind: creating one (`queue_job`) and cancelling one (`cancel_job`).

Creating a job (one avatar has at most one queued or running job of any type; a user at most
MAX_ACTIVE_JOBS_PER_USER across avatars):

1. an `Idempotency-Key` seen before answers the job it created (handlers.idempotency: a
   different request under the key is a 422; a record older than its TTL frees the key);
2. the job type's own check (train: 409 unless a document is flagged for training);
3. 429 when the user is at the cap;
4. claim the avatar's active-job pointer (If-None-Match); 409 naming the holder when taken;
   count again, and step back (retry, then 429) when a concurrent request made it one too many;
5. write the job record, 6. the idempotency record, 7. send the request on the train queue.

A failure after 4 removes what this request wrote (If-Match on each ETag) and answers 503,
unless a worker has claimed the job meanwhile (its record's ETag changed: the message went out
after all, e.g. a send that timed out after SQS took it): then the job lives, nothing is undone
and the answer is 202 with the job, so a retry does not make a duplicate.

A job whose worker vanished (`handlers.services.job_recovery`) is settled whenever these steps
meet it (the avatar's slot, the user's count), so it never locks an avatar or the cap.

Each kind's service (`train_jobs`, `adapter_jobs`, `context_jobs`) brings step 2 and the queue
request (`api_request`); the record written in step 5 is the one the job-kind registry derives
from that request (`contracts.job_kinds.record_of`), as the trainer does for a request that
reached the queue without the API.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, TypeVar

from contracts.conditional import StoreBusy
from contracts.job_kinds import JOB_KINDS, record_of
from contracts.jobs import JobRecord, new_job_id, utcnow
from contracts.messages import QueueRequest
from handlers.avatar_ref import AvatarRef
from handlers.idempotency import Idempotency
from handlers.job_store import JobNotFound, JobStore
from handlers.problems import Problem
from handlers.services.job_recovery import JobRecovery
from handlers.settings import Settings
from handlers.train_queue import TrainQueue

log = logging.getLogger("avatune.api")

CAP_RETRY_AFTER_SECONDS = 60
CAP_ATTEMPTS = 3

RequestT = TypeVar("RequestT", bound=QueueRequest)
# The queue request of the job about to be created, for its job id.
JobPlan = Callable[[str], QueueRequest]
# Removes again what one step of a job's creation wrote (rollback).
Undo = Callable[[], Awaitable[object]]
# What a job stores before it is queued (train: its inline training document), for a job id;
# returns the step that removes it again should the job not be queued.
JobStage = Callable[[str], Awaitable[Undo]]


@dataclass(frozen=True)
class JobIntake:
    """What creating a job of any kind needs besides its avatar: the job records, the train
    queue, the settings and the request's `Idempotency-Key` (None without one).
    `handlers.dependencies.JobIntakeDep` builds it for a route."""

    jobs: JobStore
    queue: TrainQueue
    settings: Settings
    idempotency: Idempotency | None = None

    def without_key(self) -> JobIntake:
        """The same, for a job the request did not ask for (AUTO_INDEX): no Idempotency-Key."""
        return replace(self, idempotency=None)


def api_request(model: type[RequestT], avatar: AvatarRef, job_id: str, **fields: Any) -> RequestT:
    """The queue request (of the kind `model` is) for a job the API creates: `origin="api"`, so
    the trainer drops it should the API have rolled the job's record back."""
    schema = next(kind.schema for kind in JOB_KINDS.values() if kind.request is model)
    return model(
        schema_=schema, job_id=job_id, user_id=avatar.user_id, avatar_id=avatar.avatar_id, origin="api", **fields
    )


# -- creating a job --------------------------------------------------------------------------


async def queue_job(
    avatar: AvatarRef,
    intake: JobIntake,
    prepare: Callable[[], Awaitable[JobPlan]],
    stage: JobStage | None = None,
) -> JobRecord:
    """Create and queue one job of any type (steps 1-7 of the module docstring); its record.

    `prepare` runs after the idempotency check and before the slot is taken: it raises the job
    type's own problems (409 no flagged document, 404 no adapter version, ...) or returns the
    plan that builds the job's queue request. `stage` stores what the job needs before it is
    queued (rolled back with the rest when queueing fails)."""
    jobs, queue, settings, idempotency = intake.jobs, intake.queue, intake.settings, intake.idempotency
    ttl = timedelta(hours=settings.idempotency_key_ttl_hours)
    if idempotency and (earlier := await _earlier_job(jobs, avatar, idempotency, ttl)):
        return earlier

    plan = await prepare()

    job_id = new_job_id()
    recovery = JobRecovery(jobs, queue, settings)
    try:
        pointer_etag = await _take_slot(recovery, jobs, avatar, job_id, settings.max_active_jobs_per_user)
    except Problem as conflict:
        if conflict.status == 409 and idempotency and (earlier := await _earlier_job(jobs, avatar, idempotency, ttl)):
            return earlier
        raise
    undo: list[Undo] = [lambda: jobs.release_claim(avatar, pointer_etag)]
    record_etag: str | None = None

    try:
        if stage is not None:
            undo.append(await stage(job_id))
        request = plan(job_id)
        record = record_of(request)
        record_etag = await jobs.create(record)
        if record_etag is None:
            raise RuntimeError(f"job id {job_id} is taken")
        if idempotency:
            key_hash = idempotency.key_hash
            key_etag = await jobs.remember(avatar, key_hash, job_id, idempotency.fingerprint)
            if key_etag is None:  # a concurrent request with the same key won: answer its job
                await _roll_back(undo)
                if earlier := await _earlier_job(jobs, avatar, idempotency, ttl):
                    return earlier
                raise Problem(
                    409, "a request with this Idempotency-Key is in progress; retry", headers={"Retry-After": "1"}
                )
            undo.append(lambda: jobs.forget(avatar, key_hash, key_etag))
        await queue.send(request)
    except Problem:
        raise
    except Exception:
        log.exception("creating job %s failed; rolling back", job_id)
        if record_etag is not None and not await _delete_unclaimed(jobs, avatar, job_id, record_etag):
            live = await jobs.get(avatar, job_id)
            if live is not None:  # a worker claimed it: the message went out after all
                log.warning("job %s was claimed by a worker: kept", job_id)
                return live
        await _roll_back(undo)
        raise _unavailable() from None
    return record


async def _delete_unclaimed(jobs: JobStore, avatar: AvatarRef, job_id: str, etag: str) -> bool:
    """Roll back the record this request wrote unless a worker changed it since (claimed it);
    True when it is gone. A failure to tell counts as claimed (nothing is undone)."""
    try:
        return await jobs.delete_created(avatar, job_id, etag)
    except Exception:
        log.exception("rolling back the record of job %s failed", job_id)
        return False


async def _earlier_job(jobs: JobStore, avatar: AvatarRef, idempotency: Idempotency, ttl: timedelta) -> JobRecord | None:
    """The job an earlier request with the same Idempotency-Key created; None when there is
    none, it is older than `ttl` or its job is gone (rolled back): the key is then free again.
    Raises the 422 for a different request under a used key."""
    found = await jobs.idempotency_record(avatar, idempotency.key_hash)
    if found is None:
        return None
    earlier, etag = found
    if utcnow() - earlier.created_at > ttl:
        await jobs.forget(avatar, idempotency.key_hash, etag)
        return None
    record = await jobs.get(avatar, earlier.job_id)
    if record is None:
        await jobs.forget(avatar, idempotency.key_hash, etag)
        return None
    if earlier.fingerprint is not None and earlier.fingerprint != idempotency.fingerprint:
        raise Problem(
            422,
            f"this Idempotency-Key was already used for a different request (job {earlier.job_id}); "
            "send a new key for a new request",
            job_id=earlier.job_id,
        )
    return record


def _active_conflict(avatar: AvatarRef, job_id: str) -> Problem:
    return Problem(
        409,
        f"avatar {avatar.avatar_id!r} already has an active job {job_id}; cancel it or wait for it to end",
        active_job_id=job_id,
    )


def _too_many(cap: int) -> Problem:
    return Problem(
        429,
        f"this user already has {cap} queued or running jobs (MAX_ACTIVE_JOBS_PER_USER); retry when one ends",
        headers={"Retry-After": str(CAP_RETRY_AFTER_SECONDS)},
    )


def _unavailable() -> Problem:
    return Problem(503, "could not queue the job; nothing was kept, retry later", headers={"Retry-After": "5"})


async def _claim_slot(recovery: JobRecovery, jobs: JobStore, avatar: AvatarRef, job_id: str) -> str:
    """Take the avatar's active-job pointer for `job_id`; its ETag. A pointer left by a finished
    job is removed (an abandoned job settled first) and the claim retried once. Raises the 409
    naming the active job."""
    for _ in range(2):
        etag = await jobs.claim_active(avatar, job_id)
        if etag is not None:
            return etag
        active = await jobs.active_job(avatar)  # clears a stale pointer
        if active is not None and recovery.abandoned(active.record):
            assert active.record is not None
            if not (await recovery.settle(avatar, active.record)).is_active:
                continue  # given up: the slot is free now
        if active is not None:
            raise _active_conflict(avatar, active.job_id)
    active = await jobs.active_job(avatar)
    if active is not None:
        raise _active_conflict(avatar, active.job_id)
    raise Problem(503, "the avatar's active job changed while creating this one; retry", headers={"Retry-After": "1"})


async def _take_slot(recovery: JobRecovery, jobs: JobStore, avatar: AvatarRef, job_id: str, cap: int) -> str:
    """Claim the avatar's slot within the user's cap of active jobs; the pointer's ETag.

    Requests on several avatars of one user may all pass the count at once, so the count is
    taken again with our pointer in place: one too many, and we step back, wait a random
    moment and try again (at most CAP_ATTEMPTS times), so the cap holds even under a burst."""
    for attempt in range(CAP_ATTEMPTS):
        if await recovery.count_active(avatar.user_id) >= cap:
            raise _too_many(cap)
        etag = await _claim_slot(recovery, jobs, avatar, job_id)
        try:
            within_cap = await jobs.count_active(avatar.user_id) <= cap
        except Exception:
            log.exception("counting active jobs failed; releasing the slot")
            await _roll_back([lambda etag=etag: jobs.release_claim(avatar, etag)])
            raise _unavailable() from None
        if within_cap:
            return etag
        await jobs.release_claim(avatar, etag)
        await asyncio.sleep(random.uniform(0.05, 0.25) * (attempt + 1))
    raise _too_many(cap)


async def _roll_back(undo: list[Undo]) -> None:
    """Undo what this request wrote, newest first; a failure is logged, never raised."""
    for step in reversed(undo):
        try:
            await step()
        except Exception:
            log.exception("rollback step failed")
    undo.clear()


# -- cancelling a job ------------------------------------------------------------------------


class _AlreadyFinal(Exception):
    pass


async def cancel_job(
    avatar: AvatarRef, jobs: JobStore, queue: TrainQueue, settings: Settings, job_id: str
) -> JobRecord:
    """Cancel a job: a queued one at once (its slot freed, checkpoints of an earlier attempt
    dropped, `job.cancelled` published), a running one by asking the trainer (`cancel_requested`,
    honoured at its next step and by any worker that claims it later), and a running one whose
    worker vanished (`job_recovery`) at once too. The job as it is now; 404 for no such job, 409
    once it has ended, 503 when its record kept changing."""
    recovery = JobRecovery(jobs, queue, settings)
    ended_here = False

    def cancel(record: JobRecord) -> JobRecord | None:
        nonlocal ended_here
        ended_here = False
        if record.status == "queued" or recovery.abandoned(record):
            ended_here = True
            record.status = "cancelled"
            record.finished_at = utcnow()
            record.cancel_requested = True
            record.error = "cancelled by request"
            record.lease = None
            return record
        if record.status == "running":
            if record.cancel_requested:
                return None
            record.cancel_requested = True
            return record
        raise _AlreadyFinal(record.status)

    try:
        record = await jobs.update(avatar, job_id, cancel)
    except JobNotFound:
        raise Problem(404, f"avatar {avatar.avatar_id!r} has no job {job_id}") from None
    except _AlreadyFinal as final:
        raise Problem(409, f"job {job_id} has already ended ({final})", job_status=str(final)) from None
    except StoreBusy as exc:
        raise Problem(503, f"{exc}; retry", headers={"Retry-After": "1"}) from None

    if ended_here:
        await recovery.finished_here(avatar, record)
    return record
