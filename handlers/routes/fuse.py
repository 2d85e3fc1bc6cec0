"""Fuse (merge) jobs: `POST /v1/users/{user_id}/avatars/{avatar_id}/fuse-jobs`.

A fuse job merges one adapter version into the base model (16-bit) on the trainer and stores
the merged model under `users/{user_id}/avatars/{avatar_id}/merged/{version}/` (`manifest.json`
last). It is a job like a training job (`type: "fuse"`): created by the same `queue_job` steps
(Idempotency-Key, the avatar's one active slot, the user's cap, rollback), queued on the same
train queue as a `FuseRequest`, and shown, listed and cancelled under `.../training-jobs`.
Its `adapter_version` is the version it merges, resolved here when the body names none.
"""

from __future__ import annotations

from fastapi import APIRouter, status
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from contracts.jobs import JobRecord
from contracts.messages import FUSE_REQUEST_SCHEMA, FuseRequest, QueueRequest
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

router = APIRouter(tags=["fuse jobs"])

BASE = "/v1/users/{user_id}/avatars/{avatar_id}/fuse-jobs"


class FuseJobBody(BaseModel):
    """The optional body of `POST {base}/fuse-jobs`."""

    model_config = ConfigDict(extra="forbid")

    adapter_version: int | None = Field(
        default=None,
        ge=1,
        # `version` is what `avatune fuse --version N` sends.
        validation_alias=AliasChoices("adapter_version", "version"),
        description="the adapter version to merge (one of GET {base}/adapter/versions); omitted: the current version",
    )


@router.post(
    BASE,
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobView,
    summary="Queue a fuse job: merge an adapter version into the base model",
    responses={
        404: {"description": "the avatar has no trained adapter, or no such adapter version"},
        409: {"description": "a job of the avatar is already active"},
        429: {"description": "the user is at MAX_ACTIVE_JOBS_PER_USER"},
    },
)
async def create_fuse_job(
    avatar: AuthorizedAvatar,
    jobs: JobStoreDep,
    adapters: AdapterStoreDep,
    queue: TrainQueueDep,
    settings: SettingsDep,
    idempotency: IdempotencyDep,
    body: FuseJobBody | None = None,
) -> JobView:
    requested = body.adapter_version if body else None

    async def prepare() -> JobPlan:
        manifest = await adapters.manifest(avatar)
        if manifest is None:
            raise Problem(404, f"avatar {avatar.avatar_id!r} has no trained adapter to merge; train one first")
        version = requested or manifest.current_version
        kept = [v.version for v in await adapters.versions(avatar)]
        if version not in kept:
            raise Problem(
                404,
                f"avatar {avatar.avatar_id!r} has no adapter version {version} "
                f"(kept versions: {', '.join(map(str, kept)) or 'none'})",
                adapter_version=version,
            )

        def plan(job_id: str) -> tuple[JobRecord, QueueRequest]:
            record = JobRecord(
                id=job_id,
                type="fuse",
                user_id=avatar.user_id,
                avatar_id=avatar.avatar_id,
                adapter_version=version,
                source="api",
            )
            return record, FuseRequest(
                schema_=FUSE_REQUEST_SCHEMA,
                job_id=job_id,
                user_id=avatar.user_id,
                avatar_id=avatar.avatar_id,
                adapter_version=version,
                requested_at=record.created_at,
                origin="api",
            )

        return plan

    return await queue_job(avatar, jobs, queue, settings, idempotency, prepare)
