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

from fastapi import APIRouter, Body, Path, status
from pydantic import BaseModel, Field

from contracts.adapters import ExportManifest
from contracts.messages import ExportFormat, ExportParams
from handlers.adapter_store import AdapterFile
from handlers.dependencies import (
    AdapterStoreDep,
    AuthorizedAvatar,
    JobIntakeDep,
    SettingsDep,
)
from handlers.job_views import JobView
from handlers.openapi import AUTHORIZED, JOB_CREATED, problems
from handlers.problems import Problem
from handlers.services.adapter_jobs import queue_export_job

router = APIRouter(tags=["exports"], responses=AUTHORIZED)

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
    responses=problems(
        404,
        *JOB_CREATED,
        _404="the avatar has no trained adapter, or no such adapter version",
        _409="a job of the avatar is already active",
        _422="invalid body, or a version llama.cpp cannot load asked for as gguf",
    ),
)
async def create_export(
    avatar: AuthorizedAvatar,
    body: Annotated[
        ExportParams,
        Body(
            openapi_examples={
                "gguf": {"summary": "the current version for llama.cpp", "value": {"format": "gguf"}},
                "with base": {
                    "summary": "version 1 and its base, for llama.cpp",
                    "value": {"format": "gguf", "adapter_version": 1, "include_base": True},
                },
                "peft": {"summary": "the current version's PEFT files (vLLM)", "value": {"format": "peft"}},
            }
        ),
    ],
    adapters: AdapterStoreDep,
    intake: JobIntakeDep,
) -> JobView:
    """Queue an export job writing an adapter version (the current one unless named) in a serving
    format under `exports/{version}/{format}/`, its manifest last: `gguf` for llama.cpp (and the
    base as GGUF with `include_base`), `peft` for vLLM and transformers. The job is shown, listed
    and cancelled under `.../training-jobs`."""
    record = await queue_export_job(avatar, body, adapters, intake)
    return JobView.of(record)


@router.get(BASE, response_model=ExportList, summary="The avatar's complete exports, by version and format")
async def list_exports(avatar: AuthorizedAvatar, store: AdapterStoreDep) -> ExportList:
    """Every complete export (its manifest written) of the avatar's adapter versions."""
    return ExportList(items=[_summary(m) for m in await store.exports(avatar)])


@router.get(
    BASE + "/{version}/{format}",
    response_model=ExportView,
    summary="One export: its manifest and presigned URLs of its files",
    responses=problems(404, _404="no complete export of that version and format"),
)
async def get_export(
    avatar: AuthorizedAvatar, store: AdapterStoreDep, settings: SettingsDep, version: VersionPath, format: FormatPath
) -> ExportView:
    """One export's manifest and its files as presigned GET URLs with their sha256."""
    manifest = await store.export(avatar, version, format)
    if manifest is None:
        raise Problem(404, f"avatar {avatar.avatar_id!r} has no {format} export of adapter version {version}")
    prefix = store.export_prefix(avatar, version, format)
    files = await store.presigned(prefix, dict(sorted(manifest.files.items())), settings.presign_expires_seconds)
    return ExportView(**_summary(manifest).model_dump(), prefix=prefix, files=files)
