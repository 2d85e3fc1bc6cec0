"""The heartbeat of a running job: a thread that keeps the SQS message invisible, renews the
lease in the job record, persists the latest progress and notices cancel requests and a lost
lease. A missed beat is logged and retried on the next tick (S3 or SQS trouble must not kill a
job that is otherwise fine: the lease outlives several beats)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from contracts import logs
from contracts.conditional import RecordNotFound
from contracts.jobs import JobLease, JobProgress, JobRecord
from trainer.job_store import JobStore

log = logging.getLogger("avatune.trainer")


@dataclass(frozen=True)
class Delivery:
    """The SQS message a job arrived in."""

    queue_url: str
    receipt_handle: str


@dataclass(frozen=True)
class HeartbeatTiming:
    visibility_every: float  # seconds between ChangeMessageVisibility calls
    progress_every: float  # seconds between lease/progress writes
    visibility_timeout: int  # how far each visibility call pushes the message ahead


class Heartbeat(threading.Thread):
    """Keeps the message invisible and the lease fresh; persists progress; notices cancels."""

    def __init__(
        self,
        job: JobRecord,
        delivery: Delivery,
        *,
        sqs: object,
        jobs: JobStore,
        worker_id: str,
        new_lease: Callable[[], JobLease],
        timing: HeartbeatTiming,
    ) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{job.id}")
        self._job = job
        self._delivery = delivery
        self._sqs = sqs
        self._jobs = jobs
        self._worker_id = worker_id
        self._new_lease = new_lease
        self._timing = timing
        self._halt = threading.Event()
        self.progress: JobProgress | None = None
        self.cancelled = threading.Event()
        self.lost_lease = threading.Event()
        self._log_context = logs.current_context()  # threads do not inherit context variables

    def run(self) -> None:
        logs.bind(**self._log_context)
        timing = self._timing
        tick = min(timing.visibility_every, timing.progress_every)
        since_visibility = 0.0
        while not self._halt.wait(tick):
            since_visibility += tick
            try:
                if since_visibility >= timing.visibility_every:
                    since_visibility = 0.0
                    self._sqs.change_message_visibility(  # type: ignore[attr-defined]
                        QueueUrl=self._delivery.queue_url,
                        ReceiptHandle=self._delivery.receipt_handle,
                        VisibilityTimeout=timing.visibility_timeout,
                    )
                self.beat()
            except Exception:  # a missed beat is retried on the next tick
                log.exception("heartbeat failed for job %s", self._job.id)

    def beat(self) -> None:
        """Renew the lease (and write the latest progress) unless another worker owns the job."""
        progress = self.progress

        def renew(record: JobRecord) -> JobRecord | None:
            if record.lease is None or record.lease.owner != self._worker_id:
                self.lost_lease.set()
                return None
            if record.cancel_requested:
                self.cancelled.set()
            record.lease = self._new_lease()
            if progress is not None:
                record.progress = progress
            return record

        job = self._job
        try:
            self._jobs.update(job.user_id, job.avatar_id, job.id, renew)
        except RecordNotFound:  # deleted with its avatar: nobody may write for it any more
            self.lost_lease.set()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)
