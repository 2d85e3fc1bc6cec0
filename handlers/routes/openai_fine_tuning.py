"""OpenAI-compatible fine-tuning jobs, `/openai/v1/fine_tuning/jobs` (`client.fine_tuning.jobs.*`
of the `openai` SDK): avatune training jobs created and shown the OpenAI way
(`handlers.services.openai_fine_tuning`). Part of the OpenAI application (`handlers.openai_app`,
mounted at `/openai/v1`), whose errors are OpenAI's body."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Query, Request

from handlers.dependencies import (
    FileStoreDep,
    FineTuningStoreDep,
    JobIntakeDep,
    JobStoreDep,
    OpenAIUser,
    SettingsDep,
    TrainingDataStoreDep,
    TrainQueueDep,
)
from handlers.openai_errors import OPENAI_ERROR_RESPONSES
from handlers.openai_models import (
    CursorPage,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobCreate,
    FineTuningJobEvent,
)
from handlers.problems import Problem
from handlers.services import openai_fine_tuning as service

router = APIRouter(prefix="/fine_tuning/jobs", tags=["fine-tuning"], responses=OPENAI_ERROR_RESPONSES)

JOB = "/{fine_tuning_job_id}"
_METADATA_PARAM = re.compile(r"^metadata\[(.{1,64})\]$")

After = Annotated[str | None, Query(max_length=200, description="the id the page starts after")]


@router.post("", response_model=FineTuningJob, summary="Create a fine-tuning job (an avatune training job)")
async def create_job(
    user_id: OpenAIUser,
    body: FineTuningJobCreate,
    files: FileStoreDep,
    entries: FineTuningStoreDep,
    documents: TrainingDataStoreDep,
    intake: JobIntakeDep,
) -> FineTuningJob:
    stores = service.JobStores(files=files, entries=entries, documents=documents)
    return await service.create_job(user_id, body, stores, intake)


@router.get("", response_model=CursorPage[FineTuningJob], summary="The user's fine-tuning jobs, newest first")
async def list_jobs(
    user_id: OpenAIUser,
    entries: FineTuningStoreDep,
    jobs: JobStoreDep,
    request: Request,
    after: After = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> CursorPage[FineTuningJob]:
    """`metadata[k]=v` query parameters keep the jobs whose metadata has every such pair."""
    metadata = {m.group(1): v for k, v in request.query_params.items() if (m := _METADATA_PARAM.match(k))}
    return await service.list_jobs(entries, jobs, user_id, after=after, limit=limit, metadata=metadata)


@router.get(JOB, response_model=FineTuningJob, summary="One fine-tuning job")
async def retrieve_job(
    user_id: OpenAIUser, entries: FineTuningStoreDep, jobs: JobStoreDep, fine_tuning_job_id: str
) -> FineTuningJob:
    return await service.get_job(entries, jobs, user_id, fine_tuning_job_id)


@router.post(JOB + "/cancel", response_model=FineTuningJob, summary="Cancel a job (queued: at once; running: soon)")
async def cancel_job(
    user_id: OpenAIUser,
    entries: FineTuningStoreDep,
    jobs: JobStoreDep,
    queue: TrainQueueDep,
    settings: SettingsDep,
    fine_tuning_job_id: str,
) -> FineTuningJob:
    return await service.cancel_job(entries, jobs, queue, settings, user_id, fine_tuning_job_id)


@router.get(JOB + "/events", response_model=CursorPage[FineTuningJobEvent], summary="The job's events, newest first")
async def list_events(
    user_id: OpenAIUser,
    entries: FineTuningStoreDep,
    jobs: JobStoreDep,
    fine_tuning_job_id: str,
    after: After = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> CursorPage[FineTuningJobEvent]:
    return await service.list_events(entries, jobs, user_id, fine_tuning_job_id, after=after, limit=limit)


@router.get(
    JOB + "/checkpoints",
    response_model=CursorPage[FineTuningJobCheckpoint],
    summary="The job's usable models: the adapter version it published",
)
async def list_checkpoints(
    user_id: OpenAIUser,
    entries: FineTuningStoreDep,
    jobs: JobStoreDep,
    fine_tuning_job_id: str,
    after: After = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> CursorPage[FineTuningJobCheckpoint]:
    return await service.list_checkpoints(entries, jobs, user_id, fine_tuning_job_id, after=after, limit=limit)


@router.post(JOB + "/pause", response_model=FineTuningJob, summary="Not available (400)")
@router.post(JOB + "/resume", response_model=FineTuningJob, summary="Not available (400)")
async def pause_or_resume(user_id: OpenAIUser, fine_tuning_job_id: str) -> FineTuningJob:
    raise Problem(400, service.NO_PAUSE, field="fine_tuning_job_id", code="unsupported")
