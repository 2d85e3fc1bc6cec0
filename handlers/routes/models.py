"""An avatar's whole models: merged adapters (`merged/{n}/`, written by fuse jobs) and full
fine-tunes (`full/{n}/`, written by `method: full` training jobs), listed and handed out as
presigned GET URLs, like the current adapter's files:

    GET /v1/users/{user_id}/avatars/{avatar_id}/merged-models[/{version}]
    GET /v1/users/{user_id}/avatars/{avatar_id}/full-models[/{version}]

A model is listed once its manifest (written last) is there; a half-uploaded one is not."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path
from pydantic import BaseModel, Field

from contracts.adapters import FullModelManifest
from handlers.adapter_store import AdapterFile, AdapterStore, AdapterStoreDep, WholeModelKind, WholeModelManifest
from handlers.auth import AuthorizedAvatar, AvatarRef
from handlers.dependencies import SettingsDep
from handlers.problems import Problem

router = APIRouter(tags=["merged and full models"])

BASE = "/v1/users/{user_id}/avatars/{avatar_id}"
VersionPath = Annotated[int, Path(ge=1, le=1_000_000, description="the model's version")]


class WholeModelSummary(BaseModel):
    version: int = Field(description="merged: the adapter version merged; full: the full model's version")
    job_id: str | None
    base_model: str | None
    dtype: str
    created_at: datetime
    metrics: dict[str, Any] = Field(default_factory=dict, description="full models: the training job's metrics")


class WholeModelList(BaseModel):
    items: list[WholeModelSummary]


class WholeModelView(WholeModelSummary):
    prefix: str = Field(description="the S3 prefix holding the files (for services reading the bucket)")
    files: list[AdapterFile] = Field(description="each file: a presigned GET URL and its sha256")


def whole_model_path(user_id: str, avatar_id: str, kind: WholeModelKind, version: int) -> str:
    """The API path of one merged or full model (a finished job's `links.model`)."""
    return f"/v1/users/{user_id}/avatars/{avatar_id}/{kind}-models/{version}"


def _summary(version: int, manifest: WholeModelManifest) -> WholeModelSummary:
    metrics = manifest.metrics if isinstance(manifest, FullModelManifest) else {}
    return WholeModelSummary(version=version, job_id=manifest.job_id, base_model=manifest.base_model,
                             dtype=manifest.dtype, created_at=manifest.created_at, metrics=metrics)


async def _list(store: AdapterStore, avatar: AvatarRef, kind: WholeModelKind) -> WholeModelList:
    return WholeModelList(items=[_summary(v, m) for v, m in await store.whole_models(avatar, kind)])


async def _one(store: AdapterStore, avatar: AvatarRef, kind: WholeModelKind, version: int,
               expires_in: int) -> WholeModelView:
    manifest = await store.whole_model(avatar, kind, version)
    if manifest is None:
        what = "merged model" if kind == "merged" else "full model"
        raise Problem(404, f"avatar {avatar.avatar_id!r} has no {what} {version}")
    prefix = store.whole_model_prefix(avatar, kind, version)
    files = await store.presigned(prefix, dict(sorted(manifest.files.items())), expires_in)
    return WholeModelView(**_summary(version, manifest).model_dump(), prefix=prefix, files=files)


@router.get(BASE + "/merged-models", response_model=WholeModelList,
            summary="The avatar's merged models (fuse jobs), by version")
async def list_merged_models(avatar: AuthorizedAvatar, store: AdapterStoreDep) -> WholeModelList:
    return await _list(store, avatar, "merged")


@router.get(BASE + "/merged-models/{version}", response_model=WholeModelView,
            summary="One merged model: its manifest and presigned URLs of its files",
            responses={404: {"description": "no complete merged model of that adapter version"}})
async def get_merged_model(avatar: AuthorizedAvatar, store: AdapterStoreDep, settings: SettingsDep,
                           version: VersionPath) -> WholeModelView:
    return await _one(store, avatar, "merged", version, settings.presign_expires_seconds)


@router.get(BASE + "/full-models", response_model=WholeModelList,
            summary="The avatar's fully fine-tuned models (method full), by version")
async def list_full_models(avatar: AuthorizedAvatar, store: AdapterStoreDep) -> WholeModelList:
    return await _list(store, avatar, "full")


@router.get(BASE + "/full-models/{version}", response_model=WholeModelView,
            summary="One fully fine-tuned model: its manifest and presigned URLs of its files",
            responses={404: {"description": "no complete full model of that version"}})
async def get_full_model(avatar: AuthorizedAvatar, store: AdapterStoreDep, settings: SettingsDep,
                         version: VersionPath) -> WholeModelView:
    return await _one(store, avatar, "full", version, settings.presign_expires_seconds)

