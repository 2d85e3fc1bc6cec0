"""The fault soak's checks (`bench.soak_checks`) catch what they are there to catch, on synthetic
events and on real objects in moto, and its report lands as section 9 of BENCHMARKS.md. The soak
itself runs for minutes (`make soak`) and is not part of the suite."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

from bench.soak_checks import adapter_findings, document_violations, event_findings, job_findings
from bench.soak_ledger import DeleteRound, DocWrite, Ledger
from contracts.keys import (
    ADAPTER_FILES,
    METRICS_FILE,
    adapter_manifest_key,
    adapter_prefix,
    adapter_version_prefix,
    training_document_key,
)
from tests.conftest import TEST_BUCKET


def _event(job_id: str, event: str, event_id: str | None = None, version: int | None = None) -> dict[str, Any]:
    return {
        "schema": "avatune.job-event/v1",
        "event": event,
        "event_id": f"{job_id}:{event}" if event_id is None else event_id,
        "job_id": job_id,
        "status": "running" if event == "job.started" else event.removeprefix("job."),
        "job_type": "train",
        "adapter_version": version,
    }


def _view(status: str) -> dict[str, Any]:
    return {"type": "train", "status": status, "attempts": 1, "metrics": {}, "error": None}


def test_exact_redeliveries_of_events_are_allowed() -> None:
    views = {"j1": _view("succeeded"), "j2": _view("failed")}
    events = [
        _event("j1", "job.started"),
        _event("j1", "job.succeeded", version=1),
        _event("j1", "job.succeeded", version=1),
        _event("j2", "job.failed"),
        # The events queue carries adapter events too: counted, not read as a job's.
        {"schema": "avatune.adapter-event/v1", "event": "adapter.promoted", "adapter_version": 1},
    ]
    stats, violations = event_findings(events, views)
    assert violations == []
    assert stats["adapter.promoted events"] == 1
    assert stats["redelivered (same event_id again)"] == 1
    assert stats["by type"] == {"job.failed": 1, "job.started": 1, "job.succeeded": 2}


def test_lost_conflicting_and_misnamed_events_are_violations() -> None:
    views = {"lost": _view("succeeded"), "two": _view("failed"), "named": _view("cancelled")}
    events = [
        _event("two", "job.failed"),
        _event("two", "job.succeeded"),
        _event("named", "job.cancelled", event_id="named:cancelled"),
        _event("named", "job.cancelled", event_id="named:cancelled"),
        _event("named", "job.started", version=1),
        _event("named", "job.started", version=2),
    ]
    _, violations = event_findings(events, views)
    text = "\n".join(violations)
    assert "job lost is succeeded but job.succeeded was never published" in text
    assert "job two has different final events: ['job.failed', 'job.succeeded']" in text
    assert "event 'named:cancelled' of job named is not 'named:job.cancelled'" in text
    assert "named:job.started was published 2 times with different content" in text
    assert "job named is cancelled but job.cancelled was never published" not in text


def test_jobs_left_active_are_violations() -> None:
    views = {"done": _view("succeeded"), "stuck": _view("running"), "gave-up": _view("failed")}
    views["gave-up"]["error"] = "gave up after 3 failed attempts: its worker stopped at 2026-01-02 03:04:05Z"
    stats, violations = job_findings(views)
    assert violations == ["job stuck (train) is still running after the settle timeout"]
    assert stats["by status"] == {"train failed": 1, "train running": 1, "train succeeded": 1}
    assert stats["failure reasons"] == {"gave up after 3 failed attempts: its worker stopped at <time>": 1}


def _write(avatar: str, name: str, flag: bool, status: int | None = 200) -> DocWrite:
    return DocWrite(avatar, name, "patch", flag, sent=1.0, acked=2.0, status=status)


def _put_document(s3, avatar: str, name: str, flag: bool) -> None:
    user_id, avatar_id = avatar.split("/")
    key = training_document_key(user_id, avatar_id, name)
    s3.put_object(Bucket=TEST_BUCKET, Key=key, Body=b"{}\n", Tagging=f"use_for_training={str(flag).lower()}")


def test_a_document_last_flagged_true_must_exist_flagged_true(s3) -> None:
    avatar = f"u-{uuid.uuid4().hex[:10]}/a1"
    _put_document(s3, avatar, "kept.jsonl", True)
    _put_document(s3, avatar, "flipped.jsonl", False)
    last = {
        "kept.jsonl": _write(avatar, "kept.jsonl", True),
        "flipped.jsonl": _write(avatar, "flipped.jsonl", True),
        "gone.jsonl": _write(avatar, "gone.jsonl", True),
        "unused.jsonl": _write(avatar, "unused.jsonl", False),  # set back to false: may go
        "unanswered.jsonl": _write(avatar, "unanswered.jsonl", True, status=None),  # unknown: no claim
    }
    checked, violations = document_violations(s3, TEST_BUCKET, last, "after round 3")
    assert checked == 3
    assert violations == [
        f"{avatar}/flipped.jsonl: flagged true by a patch acknowledged at 2.0 s (sent 1.0 s), is flagged false "
        "after round 3",
        f"{avatar}/gone.jsonl: flagged true by a patch acknowledged at 2.0 s (sent 1.0 s), is gone after round 3",
    ]


def test_only_true_flags_in_flight_during_a_delete_count_as_raced() -> None:
    ledger = Ledger()
    ledger.write(DocWrite("u/a", "raced.jsonl", "put", True, sent=1.0, acked=2.5, status=200))
    ledger.write(DocWrite("u/a", "before.jsonl", "put", True, sent=0.1, acked=0.5, status=200))
    ledger.write(DocWrite("u/b", "other-avatar.jsonl", "put", True, sent=1.0, acked=2.5, status=200))
    ledger.write(DocWrite("u/a", "false.jsonl", "patch", False, sent=1.0, acked=2.5, status=200))
    ledger.delete_round(DeleteRound("u/a", started=2.0, ended=3.0, deleted=1))
    assert [w.name for w in ledger.raced_true()] == ["raced.jsonl"]
    assert len(ledger.flags_true()) == 3


def _version_files(version: int) -> dict[str, bytes]:
    return {name: f"{name} {version}".encode() for name in ADAPTER_FILES}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _adapter(s3, user_id: str, avatar_id: str, current: dict[str, bytes], manifest_version: int) -> None:
    for version in (1, 2):
        prefix = adapter_version_prefix(user_id, avatar_id, version)
        files = _version_files(version)
        for name, data in files.items():
            s3.put_object(Bucket=TEST_BUCKET, Key=prefix + name, Body=data)
        meta = {"version": version, "files": {n: _sha(d) for n, d in files.items()}}
        s3.put_object(Bucket=TEST_BUCKET, Key=prefix + METRICS_FILE, Body=json.dumps(meta).encode())
    for name, data in current.items():
        s3.put_object(Bucket=TEST_BUCKET, Key=adapter_prefix(user_id, avatar_id) + name, Body=data)
    manifest = {
        "current_version": manifest_version,
        "files": {n: _sha(d) for n, d in _version_files(manifest_version).items()},
    }
    s3.put_object(Bucket=TEST_BUCKET, Key=adapter_manifest_key(user_id, avatar_id), Body=json.dumps(manifest).encode())


def test_the_current_adapter_must_be_one_whole_kept_version(s3) -> None:
    user_id = f"u-{uuid.uuid4().hex[:10]}"
    whole, mixed, pruned = "whole", "mixed", "pruned"
    _adapter(s3, user_id, whole, _version_files(2), 2)
    _adapter(s3, user_id, mixed, {**_version_files(2), ADAPTER_FILES[1]: _version_files(1)[ADAPTER_FILES[1]]}, 2)
    _adapter(s3, user_id, pruned, _version_files(2), 2)
    s3.delete_object(Bucket=TEST_BUCKET, Key=adapter_version_prefix(user_id, pruned, 2) + METRICS_FILE)
    never = "never-trained"
    avatars = [f"{user_id}/{a}" for a in (whole, mixed, pruned, never)]
    stats, violations = adapter_findings(s3, TEST_BUCKET, avatars, trained={f"{user_id}/{never}"})
    assert stats["current versions"] == {f"{user_id}/{a}": 2 for a in (whole, mixed, pruned)}
    assert len(violations) == 3, violations
    assert violations[0].startswith(f"{user_id}/{mixed}: current {ADAPTER_FILES[1]} ")
    assert violations[1] == f"{user_id}/{pruned}: the manifest names version 2, which is not under versions/"
    assert violations[2] == f"{user_id}/{never}: a training job succeeded but the avatar has no manifest.json"


def test_the_report_is_section_9_of_benchmarks(tmp_path: Path) -> None:
    from bench.__main__ import HEADER, write_section
    from bench.soak import SECTION, markdown

    result = {
        "minutes": 6,
        "workers": 2,
        "users": 3,
        "avatars": 2,
        "faults": {"connections reset": 10, "workers SIGKILLed": 3},
        "jobs": {"jobs": 4, "by status": {"train succeeded": 4}},
        "events": {"events received": 8},
        "documents": {"delete-unused rounds": 5},
        "promotes": {"200": 7, "409": 1},
        "adapters": {"current versions": {"u/a": 2}},
        "violations": {"events": [], "documents flagged true kept": ["u/a/doc-1.jsonl: ... is gone at the end"]},
        "settle_seconds": 50.0,
        "total_seconds": 420.0,
        "machine": "test machine",
        "date": "2026-01-01",
    }
    text = markdown(result, "python -m bench.soak --minutes 6 --workers 2")
    out = tmp_path / "BENCHMARKS.md"
    out.write_text(HEADER)
    write_section(SECTION, text, out)
    written = out.read_text()
    assert "<!-- bench:9 -->\n## 9. Fault soak" in written
    assert "| events | held |" in written
    assert "| documents flagged true kept | **1 violations** |" in written
    assert "- documents flagged true kept: u/a/doc-1.jsonl: ... is gone at the end" in written
    assert "Reproduce: `python -m bench.soak --minutes 6 --workers 2`" in written
