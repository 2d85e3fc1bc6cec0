"""`warm_start: true`: continue from the avatar's current adapter and train only on the
documents added or changed since that version.

The version's `metrics.json` names the job that produced it; that job's record lists the
documents it trained on (`data`: name + ETag). A warm-started job trained only on what was new,
so its metrics name the job it continued (`warm_start_from_job`) and the chain is followed back
to the last full run: a flagged document (or dataset) whose name and ETag occur anywhere on it
is already in the adapter and left out. Without a current adapter (or with one
of another base) the job is a normal full run, and its metrics say why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contracts.jobs import JobRecord
from trainer.artifacts import ArtifactStore
from trainer.job_store import JobStore

log = logging.getLogger("avatune.trainer")

# Warm starts followed back at most (each link is one small GET of a job record).
MAX_CHAIN = 1000


@dataclass
class WarmStart:
    """What a warm-started job starts from: the adapter files (None: a fresh adapter), the
    (name, etag) pairs to leave out, and what its metrics say about it."""

    adapter_dir: Path | None
    skip: set[tuple[str, str]] = field(default_factory=set)
    metrics: dict[str, Any] = field(default_factory=dict)


def _cold(reason: str) -> WarmStart:
    return WarmStart(None, metrics={"warm_start": False, "warm_start_reason": reason})


def _base_version(artifacts: ArtifactStore, job: JobRecord) -> int | None:
    """The version to continue from: the current one, unless this job produced it (a retry
    after publishing), in which case the newest kept version before it."""
    manifest = artifacts.current_manifest(job.user_id, job.avatar_id)
    if manifest is None:
        return None
    if manifest.job_id != job.id:
        return manifest.current_version
    for version in reversed(artifacts.versions(job.user_id, job.avatar_id)):
        meta = artifacts.version_metrics(job.user_id, job.avatar_id, version)
        if version < manifest.current_version and meta is not None and meta.job_id != job.id:
            return version
    return None


def plan_warm_start(artifacts: ArtifactStore, jobs: JobStore, job: JobRecord, base_model: str, dest: Path) -> WarmStart:
    """Download the adapter to continue from into `dest` and work out which documents to skip."""
    version = _base_version(artifacts, job)
    if version is None:
        return _cold("no current adapter: trained a new one on every document")
    meta = artifacts.download_version(job.user_id, job.avatar_id, version, dest)
    if meta is None:
        return _cold(f"adapter version {version} is no longer complete: trained a new one on every document")
    if meta.base_model not in (None, base_model):
        return _cold(
            f"adapter version {version} belongs to base {meta.base_model}: trained a new one on every document"
        )
    skip = _trained_documents(jobs, job, meta.job_id)
    return WarmStart(
        dest, skip, {"warm_start": True, "warm_start_from_version": version, "warm_start_from_job": meta.job_id}
    )


def _trained_documents(jobs: JobStore, job: JobRecord, job_id: str | None) -> set[tuple[str, str]]:
    """(name, etag) of every document the adapter made by `job_id` has seen: that job's data,
    and its predecessors' when it was itself a warm start."""
    seen: set[str] = set()
    documents: set[tuple[str, str]] = set()
    while job_id and job_id not in seen and len(seen) < MAX_CHAIN:
        seen.add(job_id)
        loaded = jobs.load(job.user_id, job.avatar_id, job_id)
        if loaded is None:  # a deleted record: what it trained on is unknown, so it is trained on again
            log.warning("job %s: job %s behind the current adapter is gone; its documents count as new", job.id, job_id)
            break
        record = loaded[0]
        documents |= {(d.name, d.etag) for d in record.data}
        job_id = record.metrics.get("warm_start_from_job") if record.metrics.get("warm_start") else None
    return documents
