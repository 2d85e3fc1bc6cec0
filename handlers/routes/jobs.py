"""Training jobs: `/v1/users/{user_id}/avatars/{avatar_id}/training-jobs` and the user's jobs
across avatars, `/v1/users/{user_id}/training-jobs`. Every job type (train, fuse, generate,
index, retrieve) is listed, shown and cancelled here; training jobs are created here too
(`handlers.services.train_jobs`), the other types by their own routes. How a job is created
and cancelled: `handlers.services.jobs`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, status

from contracts.ids import InvalidIdentifier, validate_id
from handlers.avatar_ref import AvatarRef
from handlers.dependencies import (
    AuthorizedAvatar,
    AuthorizedUser,
    JobIntakeDep,
    JobStoreDep,
    SettingsDep,
    TrainingDataStoreDep,
    TrainQueueDep,
)
from handlers.job_spec import TrainJobBody
from handlers.job_store import JobStore
from handlers.job_views import JobList, JobView
from handlers.openapi import AUTHORIZED, JOB_CREATED, TRAIN_JOB_EXAMPLES, JobIdPath, problems
from handlers.paging import INVALID_CURSOR, decode_cursor, encode_cursor
from handlers.problems import Problem
from handlers.services import jobs as job_service
from handlers.services.job_recovery import JobRecovery
from handlers.services.train_jobs import queue_train_job

router = APIRouter(tags=["training jobs"], responses=AUTHORIZED)

BASE = "/v1/users/{user_id}/avatars/{avatar_id}/training-jobs"


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


@router.post(
    BASE,
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobView,
    summary="Queue a training job",
    responses=problems(
        *JOB_CREATED,
        _409="no document flagged for training (and no datasets or training_data), or a job of the avatar is active",
        _422="an impossible spec (`field` names the field), or an Idempotency-Key used for a different request",
    ),
)
async def create_job(
    avatar: AuthorizedAvatar,
    documents: TrainingDataStoreDep,
    intake: JobIntakeDep,
    body: Annotated[TrainJobBody | None, Body(openapi_examples=TRAIN_JOB_EXAMPLES)] = None,
) -> JobView:
    """Queue a training job on the avatar's documents flagged `use_for_training` (and the body's
    `datasets` and inline `training_data`). The optional body holds flat overrides of the
    adapter configuration and/or the full job spec (`tuning`, `promote`, `callbacks`, ...).
    Answers 202 with the job; follow it with `GET .../training-jobs/{job_id}`. One active job
    per avatar (409 naming it), MAX_ACTIVE_JOBS_PER_USER per user (429)."""
    record = await queue_train_job(avatar, body or TrainJobBody(), documents, intake)
    return JobView.of(record)


@router.get(BASE, response_model=JobList, summary="The avatar's jobs, newest first", responses=problems(422))
async def list_jobs(
    avatar: AuthorizedAvatar,
    jobs: JobStoreDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=2048)] = None,
) -> JobList:
    """Every job of the avatar, of every kind (train, fuse, generate, index, retrieve), newest
    first, a page at a time (`next_cursor` until null)."""
    return await _page(jobs, [avatar], limit, cursor)


@router.get(BASE + "/{job_id}", response_model=JobView, summary="One job", responses=problems(404))
async def get_job(
    avatar: AuthorizedAvatar, jobs: JobStoreDep, queue: TrainQueueDep, settings: SettingsDep, job_id: JobIdPath
) -> JobView:
    """A job of any kind: its `status` (queued, running, then succeeded, failed or cancelled),
    `progress`, `metrics`, `error`, a generate/index/retrieve job's `result` and `links` to
    what a finished job wrote. A running job whose worker vanished is queued again (or given
    up) as soon as it is looked at."""
    record = await jobs.get(avatar, _checked_job_id(job_id))
    if record is None:
        raise Problem(404, f"avatar {avatar.avatar_id!r} has no job {job_id}")
    # A job whose worker vanished is queued again (or given up) as soon as anyone looks at it.
    return JobView.of(await JobRecovery(jobs, queue, settings).settle(avatar, record))


@router.post(
    BASE + "/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobView,
    summary="Cancel a job (queued: at once; running: at the trainer's next step)",
    responses=problems(404, 409, 503, _409="the job has already ended"),
)
async def cancel_job(
    avatar: AuthorizedAvatar, jobs: JobStoreDep, queue: TrainQueueDep, settings: SettingsDep, job_id: JobIdPath
) -> JobView:
    """A queued job is cancelled at once (checkpoints of an earlier attempt dropped); a running
    one gets `cancel_requested: true` and the trainer stops it at its next step (the current
    adapter is kept); a running one whose worker vanished is cancelled at once."""
    record = await job_service.cancel_job(avatar, jobs, queue, settings, _checked_job_id(job_id))
    return JobView.of(record)


@router.get(
    "/v1/users/{user_id}/training-jobs",
    response_model=JobList,
    summary="The user's jobs across avatars, newest first",
    responses=problems(422),
)
async def list_user_jobs(
    user_id: AuthorizedUser,
    jobs: JobStoreDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=2048)] = None,
) -> JobList:
    """Every job of every avatar of the user, newest first, a page at a time."""
    refs = [AvatarRef(user_id, a) for a in await jobs.avatar_ids(user_id)]
    return await _page(jobs, refs, limit, cursor)
