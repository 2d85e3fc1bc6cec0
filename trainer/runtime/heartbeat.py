"""The heartbeat of a running job: a thread that keeps the job's queue message invisible, renews
the lease in the job record, persists the latest progress and notices cancel requests and a
lost lease. A missed beat is logged and retried on the next tick (S3 or SQS trouble must not
kill a job that is otherwise fine: the lease outlives several beats).

Jobs longer than SQS allows a message to stay invisible (12 hours from its first receive,
SQS_MAX_VISIBILITY_SECONDS) keep a live message all the same:

- **handover**: before the cap, the heartbeat sends a fresh copy of the message (same body,
  same FIFO group) and deletes the old one; until someone receives the copy, the job holds no
  message, which is fine while its owner lives (a dead owner's copy is received by the next
  worker, which finds the lease expired and resumes the job);
- **adoption**: a worker that receives a message of a job whose owner is alive writes the
  message's receipt handle into the record (`Redelivery`) and leaves it; the owner's next beat
  takes it over (keeps it invisible, deletes it when the job ends). A redelivery is received
  once, never again and again, so it never climbs towards the dead-letter queue.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from contracts import logs
from contracts.conditional import RecordNotFound
from contracts.jobs import JobLease, JobProgress, JobRecord, utcnow
from trainer.job_store import JobStore

log = logging.getLogger("avatune.trainer")


@dataclass
class Delivery:
    """The queue message a job holds. The heartbeat swaps it on handover and adoption, so the
    runner deletes (or releases) the message the job holds at the end, not the one it came in."""

    queue_url: str
    receipt_handle: str | None  # None: handed over, not adopted back yet (nothing to keep or delete)
    body: str = ""
    group_id: str | None = None
    first_received_at: datetime | None = None  # SQS's 12-hour cap counts from here

    def age_seconds(self) -> float:
        return (utcnow() - self.first_received_at).total_seconds() if self.first_received_at else 0.0


@dataclass(frozen=True)
class HeartbeatTiming:
    visibility_every: float  # seconds between ChangeMessageVisibility calls
    progress_every: float  # seconds between lease/progress writes
    visibility_timeout: int  # how far each visibility call pushes the message ahead
    visibility_cap: int  # SQS's cap on a message's invisibility, from its first receive

    @property
    def handover_at(self) -> float:
        """The message's age at which it is handed over to a fresh one (well before the cap)."""
        margin = max(3 * self.visibility_every, 0.05 * self.visibility_cap)
        return self.visibility_cap - margin


class Heartbeat(threading.Thread):
    """Keeps the message invisible and the lease fresh; persists progress; notices cancels."""

    def __init__(
        self,
        job: JobRecord,
        delivery: Delivery,
        *,
        sqs: Any,
        jobs: JobStore,
        worker_id: str,
        new_lease: Callable[[], JobLease],
        timing: HeartbeatTiming,
    ) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{job.id}")
        self._job = job
        self.delivery = delivery
        self._sqs = sqs
        self._jobs = jobs
        self._worker_id = worker_id
        self._new_lease = new_lease
        self._timing = timing
        self._halt = threading.Event()
        self._lock = threading.Lock()  # the delivery is swapped here and read by the runner
        self.progress: JobProgress | None = None
        self.cancelled = threading.Event()
        self.lost_lease = threading.Event()
        self.handovers = 0
        self._log_context = logs.current_context()  # threads do not inherit context variables

    def run(self) -> None:
        logs.bind(**self._log_context)
        timing = self._timing
        tick = min(timing.visibility_every, timing.progress_every)
        since_visibility = 0.0
        while not self._halt.wait(tick):
            since_visibility += tick
            try:
                self.beat()
                if since_visibility >= timing.visibility_every:
                    since_visibility = 0.0
                    self.keep_message()
            except Exception:  # a missed beat is retried on the next tick
                log.exception("heartbeat failed for job %s", self._job.id)

    def beat(self) -> None:
        """Renew the lease (and write the latest progress) unless another worker owns the job;
        adopt a redelivered message waiting in the record."""
        progress = self.progress
        adopted: list[Any] = []

        def renew(record: JobRecord) -> JobRecord | None:
            adopted.clear()
            if record.lease is None or record.lease.owner != self._worker_id:
                self.lost_lease.set()
                return None
            if record.cancel_requested:
                self.cancelled.set()
            record.lease = self._new_lease()
            if progress is not None:
                record.progress = progress
            if record.redelivery is not None:
                adopted.append(record.redelivery)
                record.redelivery = None
            return record

        job = self._job
        try:
            self._jobs.update(job.user_id, job.avatar_id, job.id, renew)
        except RecordNotFound:  # deleted with its avatar: nobody may write for it any more
            self.lost_lease.set()
            return
        if adopted:
            with self._lock:
                self.delivery.receipt_handle = adopted[0].receipt_handle
                self.delivery.first_received_at = adopted[0].received_at
            log.info("job %s: adopted a redelivered message", job.id)
            self.keep_message()

    def keep_message(self) -> None:
        """Push the held message's visibility ahead, never past SQS's cap; hand it over to a
        fresh message when the cap comes near."""
        with self._lock:
            delivery = self.delivery
            if delivery.receipt_handle is None:
                return
            age = delivery.age_seconds()
            if age >= self._timing.handover_at:
                self._hand_over(delivery)
                return
            timeout = int(min(self._timing.visibility_timeout, self._timing.visibility_cap - age))
            self._sqs.change_message_visibility(
                QueueUrl=delivery.queue_url, ReceiptHandle=delivery.receipt_handle, VisibilityTimeout=max(timeout, 0)
            )

    def _hand_over(self, delivery: Delivery) -> None:
        """Send a fresh copy of the job's message, then delete the old one (in this order: the
        job is never without a message in the queue)."""
        extra: dict[str, Any] = {}
        if delivery.group_id is not None:  # FIFO: same group, a new deduplication id
            extra = {
                "MessageGroupId": delivery.group_id,
                "MessageDeduplicationId": f"{self._job.id}.{uuid.uuid4().hex}",
            }
        self._sqs.send_message(QueueUrl=delivery.queue_url, MessageBody=delivery.body, **extra)
        self._sqs.delete_message(QueueUrl=delivery.queue_url, ReceiptHandle=delivery.receipt_handle)
        delivery.receipt_handle = None
        delivery.first_received_at = None
        self.handovers += 1
        log.info("job %s: message handed over to a fresh one (SQS visibility cap)", self._job.id)

    def held(self) -> Delivery:
        """The message the job holds now (a copy: the heartbeat may swap it meanwhile)."""
        with self._lock:
            d = self.delivery
            return Delivery(d.queue_url, d.receipt_handle, d.body, d.group_id, d.first_received_at)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)
