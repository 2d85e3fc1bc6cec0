"""Generation jobs: `POST /v1/users/{user_id}/avatars/{avatar_id}/generations`.

Try an adapter version (or the base alone) on a prompt: the trainer generates one greedy
completion (bounded by `max_new_tokens` and the worker's MAX_GENERATION_TOKENS) and leaves it
in the job's `result`, read with `GET {base}/training-jobs/{job_id}`. A generation is a job
(`type: "generate"`) created by the same `queue_job` steps as every other (Idempotency-Key, the
avatar's one active slot, the user's cap, rollback) and queued as a `GenerateRequest`. For
trying an adapter, not for serving traffic.

`adapter_version`: omitted = the avatar's current adapter, resolved and recorded in the
job's request (404 when the avatar has none yet: the caller asked for the adapter, so the
base is never answered silently in its place); `0` = the base model alone; `N` = that kept
version (404 otherwise). See `handlers.services.adapter_jobs`.
"""

from __future__ import annotations

from fastapi import APIRouter, status

from contracts.messages import GenerateParams
from handlers.dependencies import (
    AdapterStoreDep,
    AuthorizedAvatar,
    IdempotencyDep,
    JobStoreDep,
    SettingsDep,
    TrainQueueDep,
)
from handlers.job_views import JobView
from handlers.services.adapter_jobs import queue_generation

router = APIRouter(tags=["generations"])

BASE = "/v1/users/{user_id}/avatars/{avatar_id}/generations"


@router.post(
    BASE,
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobView,
    summary="Queue a generation job: try an adapter version (or the base alone) on a prompt",
    responses={
        404: {"description": "the avatar has no trained adapter, or no such adapter version"},
        409: {"description": "a job of the avatar is already active"},
        422: {"description": "invalid body (both or neither of prompt/messages, max_new_tokens out of range, ...)"},
        429: {"description": "the user is at MAX_ACTIVE_JOBS_PER_USER"},
    },
)
async def create_generation(
    avatar: AuthorizedAvatar,
    body: GenerateParams,
    jobs: JobStoreDep,
    adapters: AdapterStoreDep,
    queue: TrainQueueDep,
    settings: SettingsDep,
    idempotency: IdempotencyDep,
) -> JobView:
    record = await queue_generation(avatar, body, adapters, jobs, queue, settings, idempotency)
    return JobView.of(record)
