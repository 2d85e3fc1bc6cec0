"""Fuse (merge) jobs: `POST /v1/users/{user_id}/avatars/{avatar_id}/fuse-jobs`.

A fuse job merges one adapter version into the base model (16-bit) on the trainer and stores
the merged model under `users/{user_id}/avatars/{avatar_id}/merged/{version}/` (`manifest.json`
last). It is a job like a training job (`type: "fuse"`): created by the same `queue_job` steps
(Idempotency-Key, the avatar's one active slot, the user's cap, rollback), queued on the same
train queue as a `FuseRequest`, and shown, listed and cancelled under `.../training-jobs`.
Its `adapter_version` is the version it merges, resolved when the body names none
(`handlers.services.adapter_jobs`).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, status
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from handlers.dependencies import (
    AdapterStoreDep,
    AuthorizedAvatar,
    JobIntakeDep,
)
from handlers.job_views import JobView
from handlers.openapi import AUTHORIZED, JOB_CREATED, problems
from handlers.services.adapter_jobs import queue_fuse_job

router = APIRouter(tags=["fuse jobs"], responses=AUTHORIZED)

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
    responses=problems(
        404,
        *JOB_CREATED,
        _404="the avatar has no trained adapter, or no such adapter version",
        _409="a job of the avatar is already active",
    ),
)
async def create_fuse_job(
    avatar: AuthorizedAvatar,
    adapters: AdapterStoreDep,
    intake: JobIntakeDep,
    body: Annotated[
        FuseJobBody | None,
        Body(
            openapi_examples={
                "current": {"summary": "the current version", "value": {}},
                "version": {"summary": "version 1", "value": {"adapter_version": 1}},
            }
        ),
    ] = None,
) -> JobView:
    """Merge an adapter version into the base model (16-bit) on the trainer, into
    `merged/{version}/`; `GET {base}/merged-models/{version}` hands the files out once the job
    succeeded. Answers 202 with the job."""
    requested = body.adapter_version if body else None
    record = await queue_fuse_job(avatar, requested, adapters, intake)
    return JobView.of(record)
