"""Jobs that run one of the avatar's adapter versions: fuse (merge it into the base model),
generate (try it, or the base alone, on a prompt) and export (write it in a serving format).
Each resolves the version here, before the common steps of `queue_job`, and records it on the
job (`adapter_version`, and a generation's or export's `request`), so the job shows what it
ran whatever becomes current meanwhile.

- fuse: the body's version, or the avatar's current one; 404 when the avatar has no adapter
  or no such kept version.
- generate: `adapter_version` omitted = the current adapter (404 when the avatar has none yet:
  the caller asked for the adapter, so the base is never answered silently in its place);
  `0` = the base model alone; `N` = that kept version (404 otherwise).
- export: like fuse; a version whose recorded `serving` verdict says llama.cpp cannot load it
  is refused for `gguf` at once (422 with the engine's rule) rather than failing on the trainer.
"""

from __future__ import annotations

from contracts.jobs import JobRecord
from contracts.messages import ExportParams, ExportRequest, FuseRequest, GenerateParams, GenerateRequest
from handlers.adapter_store import AdapterStore
from handlers.avatar_ref import AvatarRef
from handlers.problems import Problem
from handlers.services.jobs import JobIntake, JobPlan, api_request, queue_job


async def kept_version(adapters: AdapterStore, avatar: AvatarRef, requested: int | None, no_adapter: str) -> int:
    """`requested`, or the avatar's current version when None, once it is a kept version;
    404 with `no_adapter` as the detail when the avatar has no trained adapter."""
    manifest = await adapters.manifest(avatar)
    if manifest is None:
        raise Problem(404, no_adapter)
    version = requested or manifest.current_version
    kept = [v.version for v in await adapters.versions(avatar)]
    if version not in kept:
        raise Problem(
            404,
            f"avatar {avatar.avatar_id!r} has no adapter version {version} "
            f"(kept versions: {', '.join(map(str, kept)) or 'none'})",
            adapter_version=version,
        )
    return version


async def queue_fuse_job(
    avatar: AvatarRef,
    requested: int | None,
    adapters: AdapterStore,
    intake: JobIntake,
) -> JobRecord:
    """Create and queue a fuse job merging version `requested` (None: the current one)."""

    async def prepare() -> JobPlan:
        no_adapter = f"avatar {avatar.avatar_id!r} has no trained adapter to merge; train one first"
        version = await kept_version(adapters, avatar, requested, no_adapter)
        return lambda job_id: api_request(FuseRequest, avatar, job_id, adapter_version=version)

    return await queue_job(avatar, intake, prepare)


async def queue_generation(
    avatar: AvatarRef,
    params: GenerateParams,
    adapters: AdapterStore,
    intake: JobIntake,
) -> JobRecord:
    """Create and queue a generation job with `params` (its adapter version resolved)."""

    async def prepare() -> JobPlan:
        version = params.adapter_version
        if version != 0:
            no_adapter = (
                f"avatar {avatar.avatar_id!r} has no trained adapter; train one first, or pass "
                "adapter_version 0 to try the base model alone"
            )
            version = await kept_version(adapters, avatar, version, no_adapter)
        resolved = params.model_copy(update={"adapter_version": version})
        return lambda job_id: api_request(GenerateRequest, avatar, job_id, **resolved.model_dump())

    return await queue_job(avatar, intake, prepare)


async def queue_export_job(
    avatar: AvatarRef,
    params: ExportParams,
    adapters: AdapterStore,
    intake: JobIntake,
) -> JobRecord:
    """Create and queue an export job writing `params.adapter_version` (None: the current one)."""

    async def prepare() -> JobPlan:
        no_adapter = f"avatar {avatar.avatar_id!r} has no trained adapter to export; train one first"
        version = await kept_version(adapters, avatar, params.adapter_version, no_adapter)
        if params.format == "gguf":
            await _refuse_unloadable(adapters, avatar, version)
        resolved = params.model_copy(update={"adapter_version": version})
        return lambda job_id: api_request(ExportRequest, avatar, job_id, **resolved.model_dump())

    return await queue_job(avatar, intake, prepare)


async def _refuse_unloadable(adapters: AdapterStore, avatar: AvatarRef, version: int) -> None:
    """422 when the version's recorded verdict says llama.cpp cannot load it (versions
    published before verdicts were recorded are judged by the trainer)."""
    verdict = next((v.metrics.get("serving") for v in await adapters.versions(avatar) if v.version == version), None)
    reason = (verdict or {}).get("llama_cpp", "ok")
    if reason != "ok":
        raise Problem(
            422,
            f"adapter version {version} cannot be exported as gguf: {reason}",
            field="format",
            adapter_version=version,
        )
