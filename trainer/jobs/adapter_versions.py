"""A kept adapter version, fetched for a job that uses one (fuse, generate, export): its files
downloaded and checked against the sha256 its metrics.json records, and the base it was trained on."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from contracts.adapters import VersionMetrics
from contracts.jobs import JobRecord
from contracts.keys import ADAPTER_FILES
from trainer.artifacts import sha256_file
from trainer.base_model import BaseRef, resolve_base
from trainer.errors import JobFailure
from trainer.runtime.context import JobContext


def current_version(ctx: JobContext, missing: str) -> int:
    """The avatar's current adapter version; JobFailure(`missing`) when it has none."""
    manifest = ctx.stores.artifacts.current_manifest(ctx.user_id, ctx.avatar_id)
    if manifest is None:
        raise JobFailure(missing)
    return manifest.current_version


def record_version(ctx: JobContext, version: int) -> None:
    """Record on the job the version it works on (resolved from "the current one")."""

    def with_version(record: JobRecord) -> JobRecord:
        record.adapter_version = version
        return record

    ctx.update(with_version)


def fetch_version(ctx: JobContext, version: int, dest: Path) -> tuple[VersionMetrics, dict[str, str]]:
    """Download version `version`'s adapter files into `dest`; its metrics and the files' sha256.

    A version that does not exist (or was pruned meanwhile) fails the job; a file that does not
    match its recorded hash is an error worth a retry (a torn download)."""
    artifacts = ctx.stores.artifacts
    meta = artifacts.download_version(ctx.user_id, ctx.avatar_id, version, dest)
    if meta is None:
        kept = artifacts.versions(ctx.user_id, ctx.avatar_id)
        raise JobFailure(
            f"adapter version {version} does not exist for avatar {ctx.avatar_id!r} "
            f"(kept versions: {', '.join(map(str, kept)) or 'none'})"
        )
    hashes = {name: sha256_file(dest / name) for name in ADAPTER_FILES}
    for name, expected in meta.files.items():
        if name in hashes and hashes[name] != expected:
            raise RuntimeError(f"adapter version {version}: {name} does not match its sha256 (retrying)")
    return meta, hashes


def version_base(ctx: JobContext, meta: VersionMetrics | None) -> BaseRef:
    """The base a version was trained on (its recorded name and revision, resolved as a train job
    resolves its spec's base: an s3:// base is downloaded), or BASE_MODEL without a version."""
    settings = ctx.settings
    asked = None
    if meta is not None and meta.base_model:
        revision = meta.metrics.get("base_model_revision")
        asked = SimpleNamespace(name=meta.base_model, revision=revision, token_env=None)
    return resolve_base(
        asked,
        default=settings.base_model,
        user_id=ctx.user_id,
        bucket=settings.s3_bucket,
        allowed_prefixes=settings.allowed_base_prefixes(),
        s3=ctx.stores.s3,
        cache_dir=settings.model_cache_dir,
    )
