"""Generation jobs: `POST /v1/users/{user_id}/avatars/{avatar_id}/generations`.

Try an adapter version (or the base alone) on a prompt: the trainer generates one greedy
completion (bounded by `max_new_tokens` and the worker's MAX_GENERATION_TOKENS) and leaves it
in the job's `result`, read with `GET {base}/training-jobs/{job_id}`. A generation is a job
(`type: "generate"`) created by the same `queue_job` steps as every other (Idempotency-Key, the
avatar's one active slot, the user's cap, rollback) and queued as a `GenerateRequest`. For
trying an adapter, not for serving traffic.

`adapter_version`: omitted = the avatar's current adapter, resolved here and recorded in the
job's request (404 when the avatar has none yet: the caller asked for the adapter, so the
base is never answered silently in its place); `0` = the base model alone; `N` = that kept
version (404 otherwise).
"""

from __future__ import annotations

from fastapi import APIRouter, status

from contracts.jobs import JobRecord
from contracts.messages import GENERATE_REQUEST_SCHEMA, GenerateParams, GenerateRequest, QueueRequest
from handlers.dependencies import (
    AdapterStoreDep,
    AuthorizedAvatar,
    IdempotencyDep,
    JobStoreDep,
    SettingsDep,
    TrainQueueDep,
)
from handlers.problems import Problem
from handlers.routes.jobs import JobPlan, JobView, queue_job

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
    async def prepare() -> JobPlan:
        version = body.adapter_version
        if version != 0:
            manifest = await adapters.manifest(avatar)
            if manifest is None:
                raise Problem(
                    404,
                    f"avatar {avatar.avatar_id!r} has no trained adapter; train one first, or pass "
                    "adapter_version 0 to try the base model alone",
                )
            version = version or manifest.current_version
            kept = [v.version for v in await adapters.versions(avatar)]
            if version not in kept:
                raise Problem(
                    404,
                    f"avatar {avatar.avatar_id!r} has no adapter version {version} "
                    f"(kept versions: {', '.join(map(str, kept)) or 'none'})",
                    adapter_version=version,
                )
        params = body.model_copy(update={"adapter_version": version})

        def plan(job_id: str) -> tuple[JobRecord, QueueRequest]:
            record = JobRecord(
                id=job_id,
                type="generate",
                user_id=avatar.user_id,
                avatar_id=avatar.avatar_id,
                adapter_version=version,
                request=params.model_dump(mode="json"),
                source="api",
            )
            return record, GenerateRequest(
                schema_=GENERATE_REQUEST_SCHEMA,
                job_id=job_id,
                user_id=avatar.user_id,
                avatar_id=avatar.avatar_id,
                requested_at=record.created_at,
                origin="api",
                **params.model_dump(),
            )

        return plan

    return await queue_job(avatar, jobs, queue, settings, idempotency, prepare)
