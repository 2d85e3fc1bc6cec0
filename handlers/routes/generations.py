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

from typing import Annotated

from fastapi import APIRouter, Body, status

from contracts.messages import GenerateParams
from handlers.dependencies import (
    AdapterStoreDep,
    AuthorizedAvatar,
    JobIntakeDep,
)
from handlers.job_views import JobView
from handlers.openapi import AUTHORIZED, GENERATION_EXAMPLES, JOB_CREATED, problems
from handlers.services.adapter_jobs import queue_generation

router = APIRouter(tags=["generations"], responses=AUTHORIZED)

BASE = "/v1/users/{user_id}/avatars/{avatar_id}/generations"


@router.post(
    BASE,
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobView,
    summary="Queue a generation job: try an adapter version (or the base alone) on a prompt",
    responses=problems(
        404,
        *JOB_CREATED,
        _404="the avatar has no trained adapter, or no such adapter version",
        _409="a job of the avatar is already active",
        _422="invalid body (both or neither of prompt/messages, max_new_tokens out of range, ...)",
    ),
)
async def create_generation(
    avatar: AuthorizedAvatar,
    body: Annotated[GenerateParams, Body(openapi_examples=GENERATION_EXAMPLES)],
    adapters: AdapterStoreDep,
    intake: JobIntakeDep,
) -> JobView:
    """One greedy completion by an adapter version (omitted: the current one; `0`: the base
    alone) on the trainer, optionally with passages from the avatar's index (`rag`). Answers
    202 with the job; its `result` holds the completion once it succeeded. For trying an
    adapter, not for serving traffic."""
    record = await queue_generation(avatar, body, adapters, intake)
    return JobView.of(record)
