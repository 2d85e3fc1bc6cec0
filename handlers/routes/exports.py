"""Exports: an adapter version in a serving format.

    POST /v1/users/{user_id}/avatars/{avatar_id}/exports                    queue an export job
    GET  /v1/users/{user_id}/avatars/{avatar_id}/exports                    the complete exports
    GET  /v1/users/{user_id}/avatars/{avatar_id}/exports/{version}/{format} one: presigned URLs, sha256

An export job (`type: "export"`) writes version `n` under
`users/{user_id}/avatars/{avatar_id}/exports/{n}/{format}/`, `manifest.json` last: `gguf` is a
llama.cpp LoRA adapter (`adapter.gguf`, and the base as `base.gguf` with `include_base`), `peft`
the version's own files (vLLM, transformers). It is created by the same `queue_job` steps as
every job (Idempotency-Key, the avatar's one active slot, the user's cap, rollback) and shown,
listed and cancelled under `.../training-jobs`. An export is listed once its manifest is there.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, status
from pydantic import BaseModel, Field

from contracts.adapters import ExportManifest
from contracts.messages import ExportFormat, ExportParams
from handlers.adapter_store import AdapterFile
from handlers.dependencies import (
    AdapterStoreDep,
    AuthorizedAvatar,
    IdempotencyDep,
    JobStoreDep,
    SettingsDep,
    TrainQueueDep,
)
from handlers.job_views import JobView
from handlers.problems import Problem
from handlers.services.adapter_jobs import queue_export_job

router = APIRouter(tags=["exports"])

BASE = "/v1/users/{user_id}/avatars/{avatar_id}/exports"
VersionPath = Annotated[int, Path(ge=1, le=1_000_000, description="the adapter version")]
FormatPath = Annotated[ExportFormat, Path(description="gguf or peft")]


class ExportSummary(BaseModel):
    adapter_version: int
    format: str
    job_id: str | None
    base_model: str | None
    outtype: str | None
    include_base: bool
    serving: dict[str, str] = Field(description="each engine's verdict on the exported adapter: ok, or why not")
    created_at: datetime


class ExportList(BaseModel):
    items: list[ExportSummary]


class ExportView(ExportSummary):
    prefix: str = Field(description="the S3 prefix holding the files (for services reading the bucket)")
    files: list[AdapterFile] = Field(description="each file: a presigned GET URL and its sha256")


def _summary(manifest: ExportManifest) -> ExportSummary:
    return ExportSummary.model_validate(manifest.model_dump(include=set(ExportSummary.model_fields)))


@router.post(
    BASE,
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobView,
    summary="Queue an export job: an adapter version in a serving format (gguf, peft)",
    responses={
        404: {"description": "the avatar has no trained adapter, or no such adapter version"},
        409: {"description": "a job of the avatar is already active"},
        422: {"description": "invalid body, or a version llama.cpp cannot load asked for as gguf"},
        429: {"description": "the user is at MAX_ACTIVE_JOBS_PER_USER"},
    },
)
async def create_export(
    avatar: AuthorizedAvatar,
    body: ExportParams,
    jobs: JobStoreDep,
    adapters: AdapterStoreDep,
    queue: TrainQueueDep,
    settings: SettingsDep,
    idempotency: IdempotencyDep,
) -> JobView:
    record = await queue_export_job(avatar, body, adapters, jobs, queue, settings, idempotency)
    return JobView.of(record)


@router.get(BASE, response_model=ExportList, summary="The avatar's complete exports, by version and format")
async def list_exports(avatar: AuthorizedAvatar, store: AdapterStoreDep) -> ExportList:
    return ExportList(items=[_summary(m) for m in await store.exports(avatar)])


@router.get(
    BASE + "/{version}/{format}",
    response_model=ExportView,
    summary="One export: its manifest and presigned URLs of its files",
    responses={404: {"description": "no complete export of that version and format"}},
)
async def get_export(
    avatar: AuthorizedAvatar, store: AdapterStoreDep, settings: SettingsDep, version: VersionPath, format: FormatPath
) -> ExportView:
    manifest = await store.export(avatar, version, format)
    if manifest is None:
        raise Problem(404, f"avatar {avatar.avatar_id!r} has no {format} export of adapter version {version}")
    prefix = store.export_prefix(avatar, version, format)
    files = await store.presigned(prefix, dict(sorted(manifest.files.items())), settings.presign_expires_seconds)
    return ExportView(**_summary(manifest).model_dump(), prefix=prefix, files=files)
