"""The fault soak's invariants (`bench.soak`), each checked against what S3 and the events queue
hold (read straight from moto, not through the API) and the driver's ledger. Each check returns
its numbers and its violations (sentences naming the job, document or avatar).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from bench.soak_ledger import FINAL, DocWrite
from contracts.conditional import is_not_found
from contracts.keys import (
    ADAPTER_FILES,
    METRICS_FILE,
    active_job_key,
    adapter_manifest_key,
    adapter_prefix,
    adapter_version_prefix,
    current_adapter_lock_key,
    training_document_key,
)
from contracts.messages import JOB_EVENT_SCHEMA, event_id
from contracts.tags import flag_from_tagset

Findings = tuple[dict[str, Any], list[str]]

# Lines of the workers' and the API's logs that say a fault path was taken.
WORKER_MARKERS = {
    "handovers": "handed over to a fresh one",
    "adoptions": "adopted a redelivered message",
    "messages left for a live owner": "left for the owner to adopt",
    "duplicate deliveries ignored": "duplicate delivery ignored",
    "leases lost": "lease lost",
    "jobs stopped: record deleted": "its record was deleted",
    "checkpoints dropped: training data changed": "training data changed since the checkpoint",
    "current-adapter locks taken over": "expired: taking it over",
    "missed heartbeats": "heartbeat failed",
    "polls failed": "poll failed",
    "dead-lettered jobs failed": "reached the train queue's dead-letter queue",
}
API_MARKERS = {
    "abandoned jobs queued again by the API": "had no worker for its lease; queued again",
    "abandoned jobs failed by the API": "had no worker for its lease; failed",
}


def _read(s3: Any, bucket: str, key: str) -> bytes | None:
    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if is_not_found(exc):
            return None
        raise


def _split(avatar: str) -> tuple[str, str]:
    user_id, avatar_id = avatar.split("/")
    return user_id, avatar_id


# -- training documents ---------------------------------------------------------------------


def document_flag(s3: Any, bucket: str, avatar: str, name: str) -> bool | None:
    """The document's flag in S3, or None when it does not exist."""
    try:
        tags = s3.get_object_tagging(Bucket=bucket, Key=training_document_key(*_split(avatar), name))
    except ClientError as exc:
        if is_not_found(exc):
            return None
        raise
    return flag_from_tagset(tags.get("TagSet", []))


def document_violations(s3: Any, bucket: str, last: Mapping[str, DocWrite], when: str) -> tuple[int, list[str]]:
    """Every document whose last acknowledged write flagged it `true` still exists, flagged
    `true` (a delete-unused never takes a document that is flagged true when it reaches it; one
    the driver set back to `false` later may go). How many were checked, and the violations."""
    checked, violations = 0, []
    for write in last.values():
        if not write.flagged_true:
            continue
        checked += 1
        flag = document_flag(s3, bucket, write.avatar, write.name)
        if flag is not True:
            state = "is gone" if flag is None else "is flagged false"
            violations.append(
                f"{write.avatar}/{write.name}: flagged true by a {write.op} acknowledged at {write.acked:.1f} s "
                f"(sent {write.sent:.1f} s), {state} {when}"
            )
    return checked, violations


# -- jobs -----------------------------------------------------------------------------------


def _reason(error: str | None) -> str:
    """A failure's reason with its times and ids blurred, so equal reasons count together."""
    text = re.sub(r"\d{4}-\d\d-\d\d[ T][\d:.]+Z?", "<time>", error or "(none)")
    return re.sub(r"\b[0-9a-f]{12,}\b", "<id>", text)[:160]


def job_findings(views: Mapping[str, dict[str, Any]]) -> Findings:
    """Every job final; jobs by type and status, attempts, resumes, failure reasons."""
    by_status: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    violations = []
    attempts: Counter[int] = Counter()
    resumed = 0
    for job_id, view in views.items():
        by_status[f"{view['type']} {view['status']}"] += 1
        attempts[view.get("attempts", 0)] += 1
        resumed += bool((view.get("metrics") or {}).get("resumed_from_step"))
        if view["status"] not in FINAL:
            violations.append(f"job {job_id} ({view['type']}) is still {view['status']} after the settle timeout")
        elif view["status"] == "failed":
            reasons[_reason(view.get("error"))] += 1
    stats = {
        "jobs": len(views),
        "by status": dict(sorted(by_status.items())),
        "attempts": dict(sorted(attempts.items())),
        "resumed from a checkpoint": resumed,
        "failure reasons": dict(reasons.most_common()) or "none",
    }
    return stats, violations


# -- events ---------------------------------------------------------------------------------


def _duplicate_violations(events: list[dict[str, Any]], counts: Counter[str]) -> list[str]:
    """A repeated event_id must be the same event again (an at-least-once redelivery)."""
    violations = []
    for eid in (eid for eid, n in counts.items() if n > 1):
        shapes = {
            (e["event"], e["status"], e.get("job_type"), e.get("adapter_version"))
            for e in events
            if e.get("event_id") == eid
        }
        if len(shapes) > 1:
            violations.append(
                f"event_id {eid} was published {counts[eid]} times with different content: {sorted(shapes)}"
            )
    return violations


def _final_event_violations(events: list[dict[str, Any]], views: Mapping[str, dict[str, Any]]) -> list[str]:
    """Each final job has exactly its own final event (redeliveries aside), no other."""
    finals: defaultdict[str, set[str]] = defaultdict(set)
    for e in events:
        if e["event"] != "job.started":
            finals[e["job_id"]].add(e["event"])
    violations = []
    for job_id, view in views.items():
        if view["status"] not in FINAL:
            continue
        expected, got = f"job.{view['status']}", finals.get(job_id, set())
        if expected not in got:
            violations.append(
                f"job {job_id} is {view['status']} but {expected} was never published (got {sorted(got)})"
            )
        if len(got) > 1:
            violations.append(f"job {job_id} has different final events: {sorted(got)}")
    return violations


def job_events(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The job events among everything the events queue carried (it carries `adapter.promoted`
    adapter events too)."""
    return [e for e in events if e.get("schema") == JOB_EVENT_SCHEMA]


def event_findings(all_events: list[dict[str, Any]], views: Mapping[str, dict[str, Any]]) -> Findings:
    """Event ids stable (`{job_id}:{event}`), duplicates only as exact redeliveries, every final
    job's final event published, never two different final events for one job."""
    events = job_events(all_events)
    violations = [
        f"event {e.get('event_id')!r} of job {e['job_id']} is not {event_id(e['job_id'], e['event'])!r}"
        for e in events
        if e.get("event_id") != event_id(e["job_id"], e["event"])
    ]
    counts = Counter(e.get("event_id", "") for e in events)
    violations += _duplicate_violations(events, counts)
    violations += _final_event_violations(events, views)
    stats = {
        "events received": len(all_events),
        "adapter.promoted events": len(all_events) - len(events),
        "by type": dict(sorted(Counter(e["event"] for e in events).items())),
        "redelivered (same event_id again)": sum(n - 1 for n in counts.values() if n > 1),
        "events of jobs the driver never saw": sum(1 for e in events if e["job_id"] not in views),
    }
    return stats, violations


# -- avatars --------------------------------------------------------------------------------


def pointer_violations(s3: Any, bucket: str, avatars: Iterable[str], views: Mapping[str, dict[str, Any]]) -> list[str]:
    """Each avatar's `adapters/active_job.json` is absent or names an active job."""
    violations = []
    for avatar in avatars:
        body = _read(s3, bucket, active_job_key(*_split(avatar)))
        if body is None:
            continue
        job_id = json.loads(body)["job_id"]
        status = views.get(job_id, {}).get("status", "unknown to the driver")
        if status in FINAL or job_id not in views:
            violations.append(f"{avatar}: active_job.json names job {job_id}, which is {status}")
    return violations


def _sha256(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def _adapter_violations(s3: Any, bucket: str, avatar: str, manifest: dict[str, Any]) -> list[str]:
    user_id, avatar_id = _split(avatar)
    version = manifest["current_version"]
    meta_body = _read(s3, bucket, adapter_version_prefix(user_id, avatar_id, version) + METRICS_FILE)
    if meta_body is None:
        return [f"{avatar}: the manifest names version {version}, which is not under versions/"]
    kept = json.loads(meta_body).get("files", {})
    violations = []
    for name in ADAPTER_FILES:
        current = _sha256(_read(s3, bucket, adapter_prefix(user_id, avatar_id) + name))
        if current != manifest["files"].get(name) or current != kept.get(name):
            violations.append(
                f"{avatar}: current {name} (sha256 {str(current)[:12]}) is not version {version}'s "
                f"(manifest {str(manifest['files'].get(name))[:12]}, metrics.json {str(kept.get(name))[:12]})"
            )
    return violations


def adapter_findings(s3: Any, bucket: str, avatars: Iterable[str], trained: set[str]) -> Findings:
    """Each avatar's current adapter is one whole version: the manifest's version is kept, and
    each current file's sha256 equals the manifest's and that version's metrics.json's.
    `trained`: avatars with a succeeded training job (they must have an adapter)."""
    violations: list[str] = []
    versions: dict[str, int] = {}
    locks = 0
    for avatar in avatars:
        body = _read(s3, bucket, adapter_manifest_key(*_split(avatar)))
        locks += _read(s3, bucket, current_adapter_lock_key(*_split(avatar))) is not None
        if body is None:
            if avatar in trained:
                violations.append(f"{avatar}: a training job succeeded but the avatar has no manifest.json")
            continue
        manifest = json.loads(body)
        versions[avatar] = manifest["current_version"]
        violations += _adapter_violations(s3, bucket, avatar, manifest)
    return {"current versions": versions, "current-adapter locks left behind": locks}, violations


# -- logs -----------------------------------------------------------------------------------


def log_counts(logs: Path) -> dict[str, int]:
    """How often each fault path shows in the workers' and the API's logs."""
    worker_text = "\n".join(p.read_text(errors="replace") for p in sorted(logs.glob("worker-*.log")))
    api_path = logs / "api.log"
    api_text = api_path.read_text(errors="replace") if api_path.exists() else ""
    counts = {name: worker_text.count(marker) for name, marker in WORKER_MARKERS.items()}
    counts.update({name: api_text.count(marker) for name, marker in API_MARKERS.items()})
    return counts
