"""What a delivery of a job's message means, decided on the job record in one conditional write.

    final record            -> FINAL: a duplicate; the runner publishes what is still missing
    running, this lease     -> REPEATED: this very claim went in already (its answer was lost
                               and the write was retried): claimed, nothing written again
    running, live lease     -> OWNED: another worker has it; the message is adopted by the owner
    cancel requested        -> CANCELLED: ends now (a cancelled job never starts again)
    too many failures       -> GAVE_UP: fails with the reason
    otherwise               -> CLAIMED: running, under this worker's lease

Failures, not deliveries, count towards MAX_JOB_ATTEMPTS: a graceful hand-back (SIGTERM,
spot reclaim, scale-in, a rollout) is free; an attempt that raised, or whose worker vanished
without handing the job back (its lease expired while `running`: SIGKILL, OOM kill, a lost
node), is one failure. Without counting the vanished ones a job that kills its worker every
time would loop for ever.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from contracts.jobs import FINAL_STATUSES, JobLease, JobRecord


class Claim(StrEnum):
    CLAIMED = "claimed"
    FINAL = "final"
    OWNED = "owned"
    CANCELLED = "cancelled"
    GAVE_UP = "gave_up"
    REPEATED = "repeated"


CANCELLED_ERROR = "cancelled by request"


def vanished(record: JobRecord, now: datetime) -> bool:
    """The job was running under a lease nobody renews any more (its worker died)."""
    return record.status == "running" and record.lease is not None and record.lease.expires_at <= now


def claim(record: JobRecord, worker_id: str, lease: JobLease, now: datetime, max_failures: int) -> Claim:
    """Decide what this delivery means and change `record` accordingly (in place)."""
    if record.status in FINAL_STATUSES:
        return Claim.FINAL
    if record.status == "running" and record.lease == lease:
        # `lease` is made once per claim: finding it means our own write landed (a retried
        # If-Match met it). Claiming again would count the attempt twice.
        return Claim.REPEATED
    current = record.lease
    if record.status == "running" and current and current.owner != worker_id and current.expires_at > now:
        return Claim.OWNED
    if vanished(record, now):
        record.failures += 1
    record.lease = None
    record.redelivery = None
    if record.cancel_requested:
        _end(record, "cancelled", CANCELLED_ERROR, now)
        return Claim.CANCELLED
    if record.failures >= max_failures:
        _end(record, "failed", give_up_reason(record), now)
        return Claim.GAVE_UP
    record.status = "running"
    record.lease = lease
    record.attempts += 1
    record.started_at = record.started_at or now
    record.error = None
    return Claim.CLAIMED


def give_up_reason(record: JobRecord) -> str:
    last = f"; the last: {record.error}" if record.error else " (its worker stopped without handing it back)"
    return f"gave up after {record.failures} failed attempts{last}"


def _end(record: JobRecord, status: str, error: str, now: datetime) -> None:
    record.status = status  # type: ignore[assignment]
    record.error = error
    record.finished_at = now
