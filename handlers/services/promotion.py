"""Making a kept adapter version current: `POST {base}/adapter/versions/{n}/promote`, which is
also how a rollback is done.

1. a version one of the SERVING_TARGETS cannot load (its recorded `serving` verdict) is refused
   with a 409: the endpoint keeps the version it can load;
2. the version's files are copied over the current ones, the manifest last (`AdapterStore.promote`);
3. an `adapter.promoted` event (`contracts.messages.AdapterEvent`) tells serving endpoints to load
   it (docs/serving.md). It is published after the manifest: when publishing fails the version is
   current but unannounced, so the answer is a 503 and the caller retries the promote, which is
   idempotent and announces it again.
"""

from __future__ import annotations

import logging

from contracts.adapters import AdapterManifest
from contracts.messages import AdapterEvent
from handlers.adapter_store import AdapterStore, CurrentAdapterBusy, VersionNotFound
from handlers.avatar_ref import AvatarRef
from handlers.problems import Problem
from handlers.settings import Settings
from handlers.train_queue import TrainQueue

log = logging.getLogger("avatune.api")


async def promote_version(
    avatar: AvatarRef, version: int, store: AdapterStore, queue: TrainQueue, settings: Settings
) -> AdapterManifest:
    """Steps 1-3 of the module docstring; the new manifest. 404 for a missing or incomplete version."""
    meta = await store.version(avatar, version)
    if meta is None:
        raise _missing(avatar, version)
    verdict: dict[str, str] = meta.metrics.get("serving") or {}
    broken = [verdict[t] for t in settings.serving_profile().targets if verdict.get(t, "ok") != "ok"]
    if broken:
        raise Problem(
            409,
            f"adapter version {version} cannot be made current: a serving target cannot load it ({'; '.join(broken)})",
            adapter_version=version,
        )
    before = await store.manifest(avatar)
    try:
        manifest = await store.promote(avatar, version)
    except VersionNotFound:
        raise _missing(avatar, version) from None
    except CurrentAdapterBusy:
        raise current_adapter_busy(avatar) from None
    event = AdapterEvent(
        user_id=avatar.user_id,
        avatar_id=avatar.avatar_id,
        adapter_version=version,
        previous_version=before.current_version if before else None,
        base_model=manifest.base_model,
        files=manifest.files,
        serving=verdict,
        occurred_at=manifest.updated_at,
    )
    try:
        await queue.publish(event)
    except Exception:
        log.exception("publishing adapter.promoted for version %d failed", version)
        raise Problem(
            503,
            f"adapter version {version} is current, but announcing it to serving endpoints failed; retry the promote",
            headers={"Retry-After": "1"},
        ) from None
    return manifest


def current_adapter_busy(avatar: AvatarRef) -> Problem:
    """409: another change of the current adapter (a promote, a publish, a delete) holds its lock."""
    return Problem(
        409,
        f"the current adapter of avatar {avatar.avatar_id!r} is being changed (a promote or a publish); retry",
        headers={"Retry-After": "5"},
    )


def _missing(avatar: AvatarRef, version: int) -> Problem:
    return Problem(404, f"avatar {avatar.avatar_id!r} has no complete adapter version {version}")
