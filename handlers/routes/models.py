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
from handlers.adapter_store import AdapterFile, WholeModelKind, WholeModelManifest
from handlers.dependencies import AdapterStoreDep, AuthorizedAvatar, SettingsDep
from handlers.openapi import AUTHORIZED, problems
from handlers.problems import Problem

router = APIRouter(tags=["merged and full models"], responses=AUTHORIZED)

BASE = "/v1/users/{user_id}/avatars/{avatar_id}"
VersionPath = Annotated[int, Path(ge=1, le=1_000_000, description="the model's version")]
KindPath = Annotated[WholeModelKind, Path(description="merged: fuse jobs' merged/{n}/; full: method full's full/{n}/")]


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


def _summary(version: int, manifest: WholeModelManifest) -> WholeModelSummary:
    metrics = manifest.metrics if isinstance(manifest, FullModelManifest) else {}
    return WholeModelSummary(
        version=version,
        job_id=manifest.job_id,
        base_model=manifest.base_model,
        dtype=manifest.dtype,
        created_at=manifest.created_at,
        metrics=metrics,
    )


@router.get(
    BASE + "/{kind}-models",
    response_model=WholeModelList,
    summary="The avatar's merged models (fuse jobs) or fully fine-tuned models (method full), by version",
    responses=problems(422),
)
async def list_models(avatar: AuthorizedAvatar, store: AdapterStoreDep, kind: KindPath) -> WholeModelList:
    """The complete models of the kind (their manifest, written last, is there)."""
    return WholeModelList(items=[_summary(v, m) for v, m in await store.whole_models(avatar, kind)])


@router.get(
    BASE + "/{kind}-models/{version}",
    response_model=WholeModelView,
    summary="One merged or fully fine-tuned model: its manifest and presigned URLs of its files",
    responses=problems(404, 422, _404="no complete model of that kind and version"),
)
async def get_model(
    avatar: AuthorizedAvatar, store: AdapterStoreDep, settings: SettingsDep, kind: KindPath, version: VersionPath
) -> WholeModelView:
    """The model's manifest and each file as a presigned GET URL with its sha256; it loads with
    `AutoModelForCausalLM.from_pretrained(dir)` alone."""
    manifest = await store.whole_model(avatar, kind, version)
    if manifest is None:
        raise Problem(404, f"avatar {avatar.avatar_id!r} has no {kind} model {version}")
    prefix = store.whole_model_prefix(avatar, kind, version)
    files = await store.presigned(prefix, dict(sorted(manifest.files.items())), settings.presign_expires_seconds)
    return WholeModelView(**_summary(version, manifest).model_dump(), prefix=prefix, files=files)
