"""`artifacts.output_uri`: a copy of what a job published, at a place inside the caller's prefix.

The version stays the source of truth under `adapters/versions/{n}/`; after publishing, its
files (adapter, metrics.json and whatever the job wrote beside them) are copied server-side
to `{output_uri}{file}`. The URI is checked before training starts (a queue-sent request may
name any place: only `s3://{bucket}/users/{user_id}/...` is written).
"""

from __future__ import annotations

from typing import Any

from contracts.jobs import JobRecord
from contracts.s3uri import InvalidS3Uri, S3Uri, parse_s3_uri, within_user_prefix
from trainer.errors import JobFailure

# Bookkeeping objects of a version folder that are not the version's files.
_INTERNAL = (".claim",)


def output_target(job: JobRecord, bucket: str) -> S3Uri | None:
    """The job's `artifacts.output_uri` as a folder URI, or JobFailure when it is not inside
    the caller's prefix; None when the job names none."""
    artifacts = job.spec.artifacts
    if artifacts is None or artifacts.output_uri is None:
        return None
    try:
        target = parse_s3_uri(artifacts.output_uri, prefix=True)
    except InvalidS3Uri as exc:
        raise JobFailure(f"artifacts.output_uri is invalid: {exc}") from None
    if not within_user_prefix(target, bucket, job.user_id):
        raise JobFailure(
            f"artifacts.output_uri {artifacts.output_uri!r} is outside the caller's prefix "
            f"s3://{bucket}/users/{job.user_id}/"
        )
    return target


def copy_prefix(s3: Any, bucket: str, source_prefix: str, target: S3Uri) -> list[str]:
    """Copy every object under `source_prefix` to the same relative name under `target`
    (server-side); the names copied."""
    names: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=source_prefix):
        for obj in page.get("Contents", []):
            name = obj["Key"][len(source_prefix) :]
            if not name or name in _INTERNAL:
                continue
            s3.copy_object(
                Bucket=target.bucket, Key=target.child(name).key, CopySource={"Bucket": bucket, "Key": obj["Key"]}
            )
            names.append(name)
    return sorted(names)
