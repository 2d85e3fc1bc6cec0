"""An avatar's adapter: configuration, current files, versions
(`/v1/users/{user_id}/avatars/{avatar_id}/adapter`), and the user's adapters (`/v1/users/{user_id}/adapters`)."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Response, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from contracts.adapter import DOCUMENTED_DEFAULTS, AdapterSettings
from contracts.adapters import AdapterManifest
from contracts.conditional import StoreBusy
from handlers.adapter_store import VERSION_FILES, AdapterFile, AdapterStore, CurrentAdapterBusy, VersionFileNotFound
from handlers.avatar_ref import AvatarRef
from handlers.dependencies import (
    AdapterStoreDep,
    AuthorizedAvatar,
    AuthorizedUser,
    JobStoreDep,
    SettingsDep,
    TrainQueueDep,
)
from handlers.job_spec import check_servable
from handlers.openapi import ADAPTER_CONFIG_EXAMPLES, AUTHORIZED, problems
from handlers.problems import Problem
from handlers.services.promotion import current_adapter_busy
from handlers.services.promotion import promote_version as promote

router = APIRouter(tags=["adapters"], responses=AUTHORIZED)

BASE = "/v1/users/{user_id}/avatars/{avatar_id}/adapter"


class AdapterView(BaseModel):
    config: AdapterSettings = Field(description="the stored configuration over the documented defaults")
    current_version: int | None = Field(description="null until a version has been trained or promoted")
    metrics: dict[str, Any] = Field(description="the current version's metrics")
    updated_at: datetime | None = Field(description="when the current adapter files were last replaced")
    files: list[AdapterFile] = Field(description="the current adapter files: presigned GET URLs and sha256")


class VersionView(BaseModel):
    version: int
    created_at: datetime
    job_id: str | None
    metrics: dict[str, Any]


class VersionList(BaseModel):
    items: list[VersionView]


class AvatarAdapter(BaseModel):
    avatar_id: str
    current_version: int
    updated_at: datetime


class AdapterList(BaseModel):
    items: list[AvatarAdapter]


async def _view(
    store: AdapterStore,
    avatar: AvatarRef,
    expires_in: int,
    config: AdapterSettings | None,
    manifest: AdapterManifest | None,
) -> AdapterView:
    return AdapterView(
        config=(config or AdapterSettings()).merged_over(DOCUMENTED_DEFAULTS),
        current_version=manifest.current_version if manifest else None,
        metrics=manifest.metrics if manifest else {},
        updated_at=manifest.updated_at if manifest else None,
        files=await store.files(avatar, manifest, expires_in) if manifest else [],
    )


def _busy(exc: StoreBusy) -> Problem:
    return Problem(503, f"{exc}; retry", headers={"Retry-After": "1"})


@router.get(
    BASE,
    response_model=AdapterView,
    summary="The adapter: configuration, current version, files",
    responses=problems(404, _404="the avatar has neither a configuration nor a trained adapter"),
)
async def get_adapter(avatar: AuthorizedAvatar, store: AdapterStoreDep, settings: SettingsDep) -> AdapterView:
    """The stored configuration over the documented defaults, the current version (null before
    the first), its metrics, and each current file as a presigned GET URL with its sha256
    (`adapter_config.json` + `adapter_model.safetensors` load with `PeftModel.from_pretrained`)."""
    config, manifest = await asyncio.gather(store.config(avatar), store.manifest(avatar))
    if config is None and manifest is None:
        raise Problem(404, f"avatar {avatar.avatar_id!r} has no adapter configuration and no trained adapter")
    return await _view(store, avatar, settings.presign_expires_seconds, config, manifest)


@router.put(
    BASE,
    response_model=AdapterView,
    summary="Set configuration fields (omitted fields keep their value, null resets one to its default)",
    responses=problems(422, 503, _422="invalid fields, or settings the SERVING_TARGETS cannot load (`field` names it)"),
)
async def put_adapter(
    avatar: AuthorizedAvatar,
    store: AdapterStoreDep,
    settings: SettingsDep,
    body: Annotated[AdapterSettings, Body(openapi_examples=ADAPTER_CONFIG_EXAMPLES)],
) -> AdapterView:
    """Merge-patch the avatar's configuration: the fields given are set, omitted ones keep
    their value, `null` resets a field to its default; unknown fields, values out of range or
    settings that would give an adapter the SERVING_TARGETS cannot load: 422. Jobs use it under
    their own overrides. Answers like `GET`."""
    profile = settings.serving_profile()
    try:
        config = await store.update_config(avatar, body, check=lambda merged: check_servable(merged, profile))
    except StoreBusy as exc:
        raise _busy(exc) from None
    return await _view(store, avatar, settings.presign_expires_seconds, config, await store.manifest(avatar))


@router.delete(
    BASE,
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete the adapter, its versions, checkpoints and merged models",
    responses=problems(404, 409, _409="a job of the avatar is queued or running"),
)
async def delete_adapter(avatar: AuthorizedAvatar, store: AdapterStoreDep, jobs: JobStoreDep) -> Response:
    """Delete the configuration, the current adapter, every version (with its samples and loss
    curve), checkpoint and merged model; training data, job and idempotency records stay."""
    active = await jobs.active_job(avatar)
    if active is not None:
        raise Problem(
            409,
            f"avatar {avatar.avatar_id!r} has an active job {active.job_id}; cancel it or wait for it to end",
            active_job_id=active.job_id,
        )
    try:
        deleted = await store.delete(avatar)
    except CurrentAdapterBusy:
        raise current_adapter_busy(avatar) from None
    if deleted == 0:
        raise Problem(404, f"avatar {avatar.avatar_id!r} has no adapter")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(f"{BASE}/versions", response_model=VersionList, summary="Kept adapter versions")
async def list_versions(avatar: AuthorizedAvatar, store: AdapterStoreDep) -> VersionList:
    """Every kept version, oldest first (the trainer keeps the newest ADAPTER_KEEP_VERSIONS)."""
    return VersionList(
        items=[
            VersionView(version=v.version, created_at=v.created_at, job_id=v.job_id, metrics=v.metrics)
            for v in await store.versions(avatar)
        ]
    )


@router.get(
    f"{BASE}/versions/{{version}}/files/{{name}}",
    response_class=StreamingResponse,
    summary="A version's metrics.json, samples.json or loss.png",
    responses={200: {"content": {t: {} for t in sorted(set(VERSION_FILES.values()))}}}
    | problems(404, 422, _404="no such version, or no such file of it"),
)
async def get_version_file(
    avatar: AuthorizedAvatar,
    store: AdapterStoreDep,
    version: Annotated[int, Path(ge=1, description="the version number (from 1)")],
    name: Annotated[str, Path(description=f"one of {', '.join(VERSION_FILES)}")],
) -> StreamingResponse:
    """A kept version's `metrics.json`, `samples.json` (the base's and the adapter's completions
    of held-out prompts) or `loss.png` (the train and eval loss curve)."""
    if name not in VERSION_FILES:
        raise Problem(404, f"a version has no file {name!r}; its files are {', '.join(VERSION_FILES)}")
    try:
        resp, chunks = await store.open_version_file(avatar, version, name)
    except VersionFileNotFound:
        raise Problem(
            404, f"avatar {avatar.avatar_id!r} has no adapter version {version} with a {name}", version=version
        ) from None
    headers = {"ETag": resp["ETag"], "Content-Length": str(resp["ContentLength"]), "X-Content-Type-Options": "nosniff"}
    return StreamingResponse(chunks, media_type=VERSION_FILES[name], headers=headers)


@router.post(
    f"{BASE}/versions/{{version}}/promote",
    response_model=AdapterView,
    summary="Make a kept version current (a rollback too); announced with an adapter.promoted event",
    responses=problems(
        404,
        409,
        503,
        _404="no complete version of that number",
        _409="a serving target (SERVING_TARGETS) cannot load that version, or another change of the current "
        "adapter is under way",
        _503="the version is current but the event could not be published: retry",
    ),
)
async def promote_version(
    avatar: AuthorizedAvatar,
    store: AdapterStoreDep,
    queue: TrainQueueDep,
    settings: SettingsDep,
    version: Annotated[int, Path(ge=1, description="the version number (from 1)")],
) -> AdapterView:
    """Make version `version` current again (a server-side copy under the current-adapter lock,
    the manifest last: a rollback, or a version an `if_better` job did not promote), then announce
    it (`adapter.promoted`). Answers like `GET {base}/adapter`."""
    manifest = await promote(avatar, version, store, queue, settings)
    return await _view(store, avatar, settings.presign_expires_seconds, await store.config(avatar), manifest)


@router.get(
    "/v1/users/{user_id}/adapters", response_model=AdapterList, summary="The user's avatars that have an adapter"
)
async def list_user_adapters(user_id: AuthorizedUser, store: AdapterStoreDep) -> AdapterList:
    """The avatars of the user that have a current adapter, with its version."""
    return AdapterList(
        items=[
            AvatarAdapter(avatar_id=a, current_version=m.current_version, updated_at=m.updated_at)
            for a, m in await store.adapters_of(user_id)
        ]
    )
