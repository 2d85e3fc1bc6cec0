"""The `fuse` job kind: an adapter version merged into its base model, stored as a plain model.

    the version to merge (the request's, else the current one, recorded on the job)
    -> already merged by an earlier attempt of this job? done
    -> versions/{n}/ downloaded, sha256 checked -> `trainer.merge.merge_adapter` (a fresh
       16-bit base) -> merged/{n}/ uploaded, manifest.json last -> Succeeded

The record's `adapter_version` is the version merged.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from contracts.adapters import MergedManifest
from contracts.keys import merged_version_prefix
from trainer.errors import JobFailure, is_cuda_oom
from trainer.jobs.adapter_versions import current_version, fetch_version, record_version
from trainer.merge import merge_adapter
from trainer.runtime.context import JobContext, JobResult, Stopped, Succeeded

log = logging.getLogger("avatune.trainer")

# Progress steps: adapter downloaded, merged and saved locally, uploaded.
FUSE_STEPS = 3


class FuseWork:
    """The recipe of `fuse` jobs (see the module docstring)."""

    def __call__(self, ctx: JobContext) -> JobResult:
        job, artifacts, settings = ctx.job, ctx.stores.artifacts, ctx.settings
        user_id, avatar_id = job.user_id, job.avatar_id
        ctx.progress(0, FUSE_STEPS)
        version = job.adapter_version
        if version is None:  # "the current version", resolved now and recorded
            version = current_version(ctx, f"avatar {avatar_id!r} has no trained adapter to merge")
            record_version(ctx, version)

        done = artifacts.merged_manifest(user_id, avatar_id, version)
        if done is not None and done.job_id == job.id:  # a retry of a job that already uploaded
            log.info("fuse job %s: merged/%d/ already written by this job", job.id, version)
            return Succeeded(
                _metrics(ctx, done, {}), adapter_version=version, progress=ctx.progress(FUSE_STEPS, FUSE_STEPS)
            )

        adapter_dir = ctx.scratch / "adapter"
        meta, adapter_hashes = fetch_version(ctx, version, adapter_dir)
        if meta.base_model and meta.base_model != settings.base_model:
            raise JobFailure(
                f"adapter version {version} was trained on {meta.base_model!r}, but this trainer's "
                f"BASE_MODEL is {settings.base_model!r}: an adapter merges only into its own base"
            )
        ctx.progress(1, FUSE_STEPS)
        if reason := ctx.stop_reason():
            return Stopped(reason)

        out_dir = ctx.scratch / "merged"
        try:
            facts = merge_adapter(ctx.stores.models, settings.base_model, adapter_dir, out_dir)
        except Exception as exc:
            if is_cuda_oom(exc):
                raise JobFailure(
                    "out of GPU memory while merging: the 16-bit base model does not fit beside "
                    "the worker's cached training base"
                ) from None
            raise
        ctx.progress(2, FUSE_STEPS)
        if reason := ctx.stop_reason():
            return Stopped(reason)

        ctx.confirm_lease()
        started = time.monotonic()
        manifest = artifacts.publish_merged(
            user_id,
            avatar_id,
            out_dir,
            MergedManifest(
                adapter_version=version,
                job_id=job.id,
                base_model=settings.base_model,
                dtype=facts["dtype"],
                adapter_files=adapter_hashes,
            ),
        )
        facts["upload_seconds"] = round(time.monotonic() - started, 3)
        log.info("fuse job %s: adapter version %d merged into %s", job.id, version, settings.base_model)
        return Succeeded(
            _metrics(ctx, manifest, facts), adapter_version=version, progress=ctx.progress(FUSE_STEPS, FUSE_STEPS)
        )


def _metrics(ctx: JobContext, manifest: MergedManifest, facts: dict[str, Any]) -> dict[str, Any]:
    return {
        "merged_prefix": merged_version_prefix(ctx.user_id, ctx.avatar_id, manifest.adapter_version),
        "merged_version": manifest.adapter_version,
        "base_model": manifest.base_model,
        "dtype": manifest.dtype,
        "files": len(manifest.files),
        **facts,
    }
