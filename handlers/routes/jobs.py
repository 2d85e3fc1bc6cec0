"""Training jobs: `/v1/users/{user_id}/avatars/{avatar_id}/training-jobs` and the user's jobs
across avatars, `/v1/users/{user_id}/training-jobs`. Every job type (train, fuse) is listed,
shown and cancelled here; `queue_job` creates any of them (`routes/fuse.py` creates fuse jobs).

Creating a job (one avatar has at most one queued or running job of any type; a user at most
MAX_ACTIVE_JOBS_PER_USER across avatars):

1. an `Idempotency-Key` seen before answers the job it created (handlers.idempotency: a
   different request under the key is a 422; a record older than its TTL frees the key);
2. the job type's own check (train: 409 unless a document is flagged for training);
3. 429 when the user is at the cap;
4. claim the avatar's active-job pointer (If-None-Match); 409 naming the holder when taken;
   count again, and step back (retry, then 429) when a concurrent request made it one too many;
5. write the job record, 6. the idempotency record, 7. send the request on the train queue.

A failure after 4 removes what this request wrote (If-Match on each ETag) and answers 503.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query, status
from pydantic import BaseModel, Field, field_serializer

from contracts.adapter import AdapterSettings
from contracts.conditional import StoreBusy
from contracts.ids import InvalidIdentifier, validate_id
from contracts.jobs import JobProgress, JobRecord, JobStatus, JobType, TrainingDocumentRef, new_job_id, utcnow
from contracts.keys import LOSS_CURVE_FILE, METRICS_FILE, SAMPLES_FILE
from contracts.messages import TRAIN_REQUEST_SCHEMA, JobEvent, QueueRequest, TrainRequest
from contracts.sealing import SealError, job_context, seal_callbacks
from contracts.spec import JobSpec
from handlers.avatar_ref import AvatarRef
from handlers.dependencies import (
    AuthorizedAvatar,
    AuthorizedUser,
    IdempotencyDep,
    JobStoreDep,
    SettingsDep,
    TrainingDataStoreDep,
    TrainQueueDep,
)
from handlers.documents import DocumentNotFound
from handlers.idempotency import Idempotency
from handlers.job_spec import TrainJobBody, check_job_body
from handlers.job_store import JobNotFound, JobStore
from handlers.paging import INVALID_CURSOR, decode_cursor, encode_cursor
from handlers.problems import Problem
from handlers.routes.adapters import version_file_path
from handlers.routes.models import whole_model_path
from handlers.settings import Settings
from handlers.train_queue import TrainQueue
from handlers.training_data_store import TrainingDataStore

log = logging.getLogger("avatune.api")

router = APIRouter(tags=["training jobs"])

BASE = "/v1/users/{user_id}/avatars/{avatar_id}/training-jobs"
CAP_RETRY_AFTER_SECONDS = 60
CAP_ATTEMPTS = 3


class JobView(BaseModel):
    """A job as the API shows it."""

    id: str
    type: JobType
    status: JobStatus
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    avatar_id: str
    config: AdapterSettings
    progress: JobProgress
    metrics: dict[str, Any]
    error: str | None
    adapter_version: int | None
    data: list[TrainingDocumentRef]
    spec: JobSpec
    request: dict[str, Any]
    result: dict[str, Any] | None
    cancel_requested: bool
    attempts: int
    links: dict[str, str] = Field(
        default_factory=dict,
        description="train jobs with a published version: API paths of that version's metrics.json, "
        "samples.json (base vs adapter completions) and loss.png (loss curve); a succeeded fuse or "
        "full fine-tuning job: `model`, the API path of the model it wrote",
    )

    @field_serializer("config")
    def _overrides_only(self, config: AdapterSettings) -> dict[str, Any]:
        """The job's overrides: only the fields it set."""
        return config.model_dump(exclude_none=True)

    @field_serializer("spec")
    def _spec_without_secrets(self, spec: JobSpec) -> dict[str, Any]:
        """The spec as sent, less defaults and the webhook's Authorization (never returned)."""
        return spec.model_dump(
            mode="json", exclude_defaults=True, exclude={"callbacks": {"auth_header", "auth_header_sealed"}}
        )

    @classmethod
    def of(cls, record: JobRecord) -> JobView:
        view = cls.model_validate(record.model_dump(exclude={"lease", "user_id", "source", "schema_"}))
        version = record.adapter_version
        if version is None:
            return view
        # A full fine-tune's version numbers a whole model under full/, not an adapter version.
        if record.type == "train" and record.config.method != "full":
            view.links = {
                link: version_file_path(record.user_id, record.avatar_id, version, name)
                for link, name in (
                    ("metrics", METRICS_FILE),
                    ("samples", SAMPLES_FILE),
                    ("loss_curve", LOSS_CURVE_FILE),
                )
            }
        elif record.status == "succeeded" and (record.type == "fuse" or record.type == "train"):
            kind = "merged" if record.type == "fuse" else "full"
            view.links = {"model": whole_model_path(record.user_id, record.avatar_id, kind, version)}
        return view


class JobList(BaseModel):
    items: list[JobView]
    next_cursor: str | None


# -- helpers ---------------------------------------------------------------------------------


def _checked_job_id(job_id: str) -> str:
    try:
        return validate_id(job_id, "job_id")
    except InvalidIdentifier as exc:
        raise Problem(400, str(exc)) from None


def _decode_page_cursor(cursor: str | None) -> tuple[str, str] | None:
    if not cursor:
        return None
    try:
        job_id, avatar_id = decode_cursor(cursor).split(" ")
        return validate_id(job_id), validate_id(avatar_id)
    except ValueError:  # InvalidIdentifier is one too
        raise Problem(400, INVALID_CURSOR) from None


async def _page(jobs: JobStore, refs: list[AvatarRef], limit: int, cursor: str | None) -> JobList:
    page = await jobs.page(refs, limit, _decode_page_cursor(cursor))
    next_cursor = encode_cursor(" ".join(page.next_after)) if page.next_after else None
    return JobList(items=[JobView.of(r) for r in page.items], next_cursor=next_cursor)


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


async def _claim_slot(jobs: JobStore, avatar: AvatarRef, job_id: str) -> str:
    """Take the avatar's active-job pointer for `job_id`; its ETag. A pointer left by a finished
    job is removed and the claim retried once. Raises the 409 naming the active job."""
    for _ in range(2):
        etag = await jobs.claim_active(avatar, job_id)
        if etag is not None:
            return etag
        active = await jobs.active_job(avatar)  # clears a stale pointer
        if active is not None:
            raise _active_conflict(avatar, active.job_id)
    active = await jobs.active_job(avatar)
    if active is not None:
        raise _active_conflict(avatar, active.job_id)
    raise Problem(503, "the avatar's active job changed while creating this one; retry", headers={"Retry-After": "1"})


async def _take_slot(jobs: JobStore, avatar: AvatarRef, job_id: str, cap: int) -> str:
    """Claim the avatar's slot within the user's cap of active jobs; the pointer's ETag.

    Requests on several avatars of one user may all pass the count at once, so the count is
    taken again with our pointer in place: one too many, and we step back, wait a random
    moment and try again (at most CAP_ATTEMPTS times), so the cap holds even under a burst."""
    for attempt in range(CAP_ATTEMPTS):
        if await jobs.count_active(avatar.user_id) >= cap:
            raise _too_many(cap)
        etag = await _claim_slot(jobs, avatar, job_id)
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


async def _roll_back(undo: list[Callable[[], Awaitable[bool]]]) -> None:
    """Undo what this request wrote, newest first; a failure is logged, never raised."""
    for step in reversed(undo):
        try:
            await step()
        except Exception:
            log.exception("rollback step failed")
    undo.clear()


# The job a request is about to create: its record and the request to queue, for a job id.
JobPlan = Callable[[str], tuple[JobRecord, QueueRequest]]
# What a job stores before it is queued (train: its inline training document), for a job id;
# returns the step that removes it again should the job not be queued.
JobStage = Callable[[str], Awaitable[Callable[[], Awaitable[Any]]]]


async def queue_job(
    avatar: AvatarRef,
    jobs: JobStore,
    queue: TrainQueue,
    settings: Settings,
    idempotency: Idempotency | None,
    prepare: Callable[[], Awaitable[JobPlan]],
    stage: JobStage | None = None,
) -> JobView:
    """Create and queue one job of any type (steps 1-7 of the module docstring).

    `prepare` runs after the idempotency check and before the slot is taken: it raises the job
    type's own problems (409 no flagged document, 404 no adapter version, ...) or returns the
    plan that builds the job's record and queue request. `stage` stores what the job needs
    before it is queued (rolled back with the rest when queueing fails)."""
    ttl = timedelta(hours=settings.idempotency_key_ttl_hours)
    if idempotency and (earlier := await _earlier_job(jobs, avatar, idempotency, ttl)):
        return JobView.of(earlier)

    plan = await prepare()

    job_id = new_job_id()
    try:
        pointer_etag = await _take_slot(jobs, avatar, job_id, settings.max_active_jobs_per_user)
    except Problem as conflict:
        if conflict.status == 409 and idempotency and (earlier := await _earlier_job(jobs, avatar, idempotency, ttl)):
            return JobView.of(earlier)
        raise
    undo: list[Callable[[], Awaitable[bool]]] = [lambda: jobs.release_claim(avatar, pointer_etag)]

    try:
        if stage is not None:
            undo.append(await stage(job_id))
        record, request = plan(job_id)
        record_etag = await jobs.create(record)
        if record_etag is None:
            raise RuntimeError(f"job id {job_id} is taken")
        undo.append(lambda: jobs.delete_created(avatar, job_id, record_etag))
        if idempotency:
            key_hash = idempotency.key_hash
            key_etag = await jobs.remember(avatar, key_hash, job_id, idempotency.fingerprint)
            if key_etag is None:  # a concurrent request with the same key won: answer its job
                await _roll_back(undo)
                if earlier := await _earlier_job(jobs, avatar, idempotency, ttl):
                    return JobView.of(earlier)
                raise Problem(
                    409, "a request with this Idempotency-Key is in progress; retry", headers={"Retry-After": "1"}
                )
            undo.append(lambda: jobs.forget(avatar, key_hash, key_etag))
        await queue.send(request)
    except Problem:
        raise
    except Exception:
        log.exception("creating job %s failed; rolling back", job_id)
        await _roll_back(undo)
        raise _unavailable() from None
    return JobView.of(record)


# -- routes ----------------------------------------------------------------------------------


def inline_document_name(job_id: str) -> str:
    """The training document a job's inline `training_data` is stored as."""
    return f"inline-{job_id}.jsonl"


def _inline_stage(avatar: AvatarRef, documents: TrainingDataStore, data: bytes) -> JobStage:
    """Store the inline data as the job's flagged document; the step that removes it again."""

    async def stage(job_id: str) -> Callable[[], Awaitable[Any]]:
        name = inline_document_name(job_id)
        await documents.put(avatar, name, data, True)

        async def remove() -> None:
            try:
                await documents.delete(avatar, name)
            except DocumentNotFound:
                pass

        return remove

    return stage


@router.post(
    BASE,
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobView,
    summary="Queue a training job",
    responses={
        409: {
            "description": "no document flagged for training (and no datasets or training_data), "
            "or a job is already active"
        },
        422: {"description": "an impossible spec; `field` names the field"},
        429: {"description": "the user is at MAX_ACTIVE_JOBS_PER_USER"},
    },
)
async def create_job(
    avatar: AuthorizedAvatar,
    jobs: JobStoreDep,
    documents: TrainingDataStoreDep,
    queue: TrainQueueDep,
    settings: SettingsDep,
    idempotency: IdempotencyDep,
    body: TrainJobBody | None = None,
) -> JobView:
    body = body or TrainJobBody()
    inline = check_job_body(
        body,
        user_id=avatar.user_id,
        bucket=settings.s3_bucket,
        max_gpus=settings.max_gpus_per_job,
        max_inline_bytes=settings.max_upload_bytes,
        base_model_prefixes=settings.base_model_prefixes(),
    )
    config, spec = body.config(), body.spec()
    sealed: dict[str, JobSpec] = {}  # job id -> spec with callbacks.auth_header sealed (see _sealing_stage)

    def plan(job_id: str) -> tuple[JobRecord, QueueRequest]:
        job_spec = sealed[job_id] if _has_auth_header(spec) else spec  # never the plaintext header
        record = JobRecord(
            id=job_id, user_id=avatar.user_id, avatar_id=avatar.avatar_id, config=config, spec=job_spec, source="api"
        )
        return record, TrainRequest(
            schema_=TRAIN_REQUEST_SCHEMA,
            job_id=job_id,
            user_id=avatar.user_id,
            avatar_id=avatar.avatar_id,
            config=config,
            requested_at=record.created_at,
            origin="api",
            **dict(job_spec),
        )

    async def prepare() -> JobPlan:
        if inline is None and not spec.datasets:
            flagged, _ = await documents.list(avatar, True, 1)
            if not flagged:
                raise Problem(
                    409,
                    f"avatar {avatar.avatar_id!r} has no document with use_for_training=true; "
                    "upload or flag one first, or send datasets or training_data",
                )
        return plan

    stage = _inline_stage(avatar, documents, inline) if inline is not None else None
    if _has_auth_header(spec):
        stage = _sealing_stage(settings, avatar, spec, sealed, stage)
    return await queue_job(avatar, jobs, queue, settings, idempotency, prepare, stage)


def _has_auth_header(spec: JobSpec) -> bool:
    return spec.callbacks is not None and spec.callbacks.auth_header is not None


def _sealing_stage(
    settings: Settings, avatar: AvatarRef, spec: JobSpec, sealed: dict[str, JobSpec], then: JobStage | None
) -> JobStage:
    """Seal callbacks.auth_header for the new job's id (the KMS encryption context names the
    job) into `sealed`, then run `then`. The sealer is checked now, so a deployment without one
    answers 422 before anything is stored; KMS runs in a thread (boto3 is synchronous)."""
    try:
        sealer = settings.sealer()
    except SealError:
        log.exception("CALLBACK_SEALER is misconfigured")
        raise Problem(
            503, "callbacks.auth_header cannot be stored right now; retry later", headers={"Retry-After": "30"}
        ) from None
    if sealer is None:
        raise Problem(
            422,
            "callbacks.auth_header: this deployment has no key to encrypt it at rest "
            "(CALLBACK_SEALER); send the job without it",
            field="callbacks.auth_header",
        )

    async def stage(job_id: str) -> Callable[[], Awaitable[Any]]:
        context = job_context(avatar.user_id, avatar.avatar_id, job_id)
        sealed[job_id] = await asyncio.to_thread(seal_callbacks, spec, sealer, context)
        if then is not None:
            return await then(job_id)

        async def nothing() -> None:
            return None

        return nothing

    return stage


@router.get(BASE, response_model=JobList, summary="The avatar's jobs, newest first")
async def list_jobs(
    avatar: AuthorizedAvatar,
    jobs: JobStoreDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=2048)] = None,
) -> JobList:
    return await _page(jobs, [avatar], limit, cursor)


@router.get(BASE + "/{job_id}", response_model=JobView, summary="One job")
async def get_job(avatar: AuthorizedAvatar, jobs: JobStoreDep, job_id: str) -> JobView:
    record = await jobs.get(avatar, _checked_job_id(job_id))
    if record is None:
        raise Problem(404, f"avatar {avatar.avatar_id!r} has no job {job_id}")
    return JobView.of(record)


class _AlreadyFinal(Exception):
    pass


@router.post(
    BASE + "/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobView,
    summary="Cancel a job (queued: at once; running: at the trainer's next step)",
    responses={409: {"description": "the job has already ended"}},
)
async def cancel_job(avatar: AuthorizedAvatar, jobs: JobStoreDep, queue: TrainQueueDep, job_id: str) -> JobView:
    job_id = _checked_job_id(job_id)
    cancelled_here = False

    def cancel(record: JobRecord) -> JobRecord | None:
        nonlocal cancelled_here
        cancelled_here = False
        if record.status == "queued":
            cancelled_here = True
            record.status = "cancelled"
            record.finished_at = utcnow()
            record.cancel_requested = True
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

    if cancelled_here:
        # The job is cancelled either way; a failure below only delays the bookkeeping (a pointer
        # to a finished job is stale and cleared by the next request that meets it).
        try:
            await jobs.release_active(avatar, job_id)
        except Exception:
            log.exception("releasing the active pointer of cancelled job %s failed", job_id)
        try:
            await queue.publish(
                JobEvent(
                    event="job.cancelled",
                    job_id=job_id,
                    user_id=avatar.user_id,
                    avatar_id=avatar.avatar_id,
                    status="cancelled",
                    job_type=record.type,
                    adapter_version=record.adapter_version,
                )
            )
        except Exception:
            log.exception("publishing job.cancelled for %s failed", job_id)
    return JobView.of(record)


@router.get(
    "/v1/users/{user_id}/training-jobs", response_model=JobList, summary="The user's jobs across avatars, newest first"
)
async def list_user_jobs(
    user_id: AuthorizedUser,
    jobs: JobStoreDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=2048)] = None,
) -> JobList:
    refs = [AvatarRef(user_id, a) for a in await jobs.avatar_ids(user_id)]
    return await _page(jobs, refs, limit, cursor)
