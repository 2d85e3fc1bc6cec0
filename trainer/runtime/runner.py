"""`JobRunner`: one request from the train queue, end to end, for any kind of job.

    claim (or say why not) -> attempts -> job.started -> heartbeat + scratch directory
    -> work(JobContext) -> Succeeded / Stopped / JobFailure / an error
    -> the final record (one conditional write), the active slot, checkpoints, the event

The runner knows nothing of what a job does: the work is the kind's recipe, looked up by the
worker in `contracts.job_kinds`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from contracts.job_kinds import kind_of, record_of
from contracts.jobs import FINAL_STATUSES, JobLease, JobProgress, JobRecord, JobStatus, utcnow
from contracts.messages import QueueRequest
from trainer import metrics as prom
from trainer.artifacts import ArtifactStore
from trainer.base_model import BaseModelCache
from trainer.checkpoint_schedule import CheckpointSchedule
from trainer.control import CANCELLED, DURATION_EXCEEDED, PREEMPTED
from trainer.documents import DocumentSource
from trainer.errors import JobFailure, is_cuda_oom
from trainer.events import EventPublisher
from trainer.job_store import JobStore
from trainer.runtime.context import JobContext, JobResult, JobWork, Stopped, Stores, Succeeded
from trainer.runtime.control import JobControl
from trainer.runtime.heartbeat import Delivery, Heartbeat, HeartbeatTiming
from trainer.s3_objects import S3Objects
from trainer.settings import TrainerSettings

log = logging.getLogger("avatune.trainer")


class Outcome:
    """What to do with the message once the runner is done with it."""

    DONE = "done"  # delete the message
    RETRY = "retry"  # leave it to come back
    RELEASED = "released"  # made visible again for another worker (preempted)


class JobRunner:
    def __init__(
        self,
        settings: TrainerSettings,
        s3: Any,
        sqs: Any,
        events: EventPublisher,
        models: BaseModelCache,
        shutdown: threading.Event,
    ) -> None:
        self.settings = settings
        self.sqs = sqs
        self.events = events
        self.shutdown = shutdown
        bucket = settings.s3_bucket
        self.stores = Stores(
            s3=s3,
            objects=S3Objects(s3, bucket),
            jobs=JobStore(s3, bucket),
            artifacts=ArtifactStore(s3, bucket),
            documents=DocumentSource(s3, bucket, settings.download_concurrency),
            models=models,
        )
        self._claimed_at = time.monotonic()

    @property
    def jobs(self) -> JobStore:
        return self.stores.jobs

    def new_lease(self) -> JobLease:
        expires = utcnow() + timedelta(seconds=self.settings.lease_seconds)
        return JobLease(owner=self.settings.worker_id, expires_at=expires)

    # -- claiming -----------------------------------------------------------------------------

    def _record_for(self, req: QueueRequest) -> JobRecord | None:
        loaded = self.jobs.load(req.user_id, req.avatar_id, req.job_id)
        if loaded is None and req.origin == "api":
            return None  # the API rolled this job back after its message went out
        if loaded is None:  # sent straight to the queue by another service
            record = record_of(req, self.settings.sealer())
            self.jobs.create(record)
            if record.is_active:  # not one refused at once (an auth_header it cannot seal)
                self.jobs.ensure_active_pointer(req.user_id, req.avatar_id, req.job_id)
            loaded = self.jobs.load(req.user_id, req.avatar_id, req.job_id)
            assert loaded is not None
        return loaded[0]

    def _claim(self, req: QueueRequest) -> tuple[JobRecord | None, str]:
        """Take ownership of the job, or say why not: "final" (a duplicate), "owned" (a live
        worker has it), "gone" (rolled back by the API), "mismatch" (the record is another kind)."""
        verdict = {"why": ""}
        worker = self.settings.worker_id

        def claim(record: JobRecord) -> JobRecord | None:
            if record.status in FINAL_STATUSES:
                verdict["why"] = "final"
                return None
            lease = record.lease
            if record.status == "running" and lease and lease.owner != worker and lease.expires_at > utcnow():
                verdict["why"] = "owned"
                return None
            verdict["why"] = ""
            record.status = "running"
            record.lease = self.new_lease()
            record.attempts += 1
            record.started_at = record.started_at or utcnow()
            record.error = None
            return record

        existing = self._record_for(req)
        if existing is None:
            return None, "gone"
        if existing.type != kind_of(req).type:
            return None, "mismatch"
        record = self.jobs.update(req.user_id, req.avatar_id, req.job_id, claim)
        return (None if verdict["why"] else record), verdict["why"]

    def _not_claimed(self, req: QueueRequest, why: str) -> str:
        if why == "final":
            log.info("job %s already finished: duplicate delivery ignored", req.job_id)
        elif why == "gone":
            log.warning("job %s has no record (rolled back by the API): message dropped", req.job_id)
        elif why == "mismatch":
            log.error("job %s is not a %s job: message (schema %s) dropped", req.job_id, kind_of(req).type, req.schema_)
        else:
            log.info("job %s is owned by a live worker: leaving the message", req.job_id)
            return Outcome.RETRY
        return Outcome.DONE

    # -- the job ------------------------------------------------------------------------------

    def run(self, req: QueueRequest, delivery: Delivery, work: JobWork) -> str:
        """Claim the request's job and run `work` on it; the Outcome says what to do with the message."""
        job, why = self._claim(req)
        if job is None:
            return self._not_claimed(req, why)
        if job.attempts > self.settings.max_attempts:
            self.finish(job, "failed", error=f"gave up after {job.attempts - 1} attempts")
            return Outcome.DONE
        log.info("%s job %s started (attempt %d)", job.type, job.id, job.attempts)
        prom.QUEUE_WAIT.observe(max(0.0, (utcnow() - job.created_at).total_seconds()))
        if job.attempts == 1:
            self.events.publish("job.started", job)
        prom.BUSY.set(1)
        self._claimed_at = time.monotonic()
        heartbeat = self._heartbeat(job, delivery)
        heartbeat.start()
        scratch = Path(tempfile.mkdtemp(prefix=f"avatune-{job.id}-", dir=self.settings.scratch_dir))
        try:
            ctx = JobContext(job, self._control(job, heartbeat), scratch, self.settings, self.stores)
            return self._ended(job, work(ctx), delivery)
        except JobFailure as exc:
            return self._fail(job, str(exc))
        except MemoryError:
            return self._fail(job, "out of memory: lower batch_size or max_seq_length")
        except Exception as exc:
            if is_cuda_oom(exc):
                return self._fail(job, "out of GPU memory: lower batch_size or max_seq_length")
            log.exception("job %s hit an unexpected error", job.id)
            if job.attempts >= self.settings.max_attempts:
                return self._fail(job, f"internal error after {job.attempts} attempts: {type(exc).__name__}")
            self._release(job)
            return Outcome.RETRY
        finally:
            prom.BUSY.set(0)
            heartbeat.stop()
            shutil.rmtree(scratch, ignore_errors=True)

    def _heartbeat(self, job: JobRecord, delivery: Delivery) -> Heartbeat:
        settings = self.settings
        timing = HeartbeatTiming(
            visibility_every=settings.heartbeat_seconds,
            progress_every=settings.progress_interval_seconds,
            visibility_timeout=settings.visibility_timeout_seconds,
        )
        return Heartbeat(
            job,
            delivery,
            sqs=self.sqs,
            jobs=self.jobs,
            worker_id=settings.worker_id,
            new_lease=self.new_lease,
            timing=timing,
        )

    def _control(self, job: JobRecord, heartbeat: Heartbeat) -> JobControl:
        settings = self.settings
        schedule = CheckpointSchedule(settings.checkpoint_every_steps, settings.checkpoint_interval_seconds)

        def upload(local_dir: Path, step: int) -> None:
            self.stores.artifacts.save_checkpoint(job.user_id, job.avatar_id, job.id, local_dir, step)

        return JobControl(job, heartbeat, self.shutdown, schedule, upload)

    def _ended(self, job: JobRecord, result: JobResult, delivery: Delivery) -> str:
        if isinstance(result, Succeeded):
            self.finish(
                job,
                "succeeded",
                metrics=result.metrics_dict(),
                adapter_version=result.adapter_version,
                progress=result.progress,
                result=result.result,
            )
            return Outcome.DONE
        assert isinstance(result, Stopped)
        return self._stopped(job, result.reason, delivery)

    def _fail(self, job: JobRecord, error: str) -> str:
        self.finish(job, "failed", error=error)
        return Outcome.DONE

    def _stopped(self, job: JobRecord, reason: str | None, delivery: Delivery) -> str:
        """End a job whose work stopped early for `reason` (a `JobControl.stop_reason()`)."""
        if reason == CANCELLED:
            self.finish(job, "cancelled", error="cancelled by request")
            return Outcome.DONE
        if reason and reason.startswith(DURATION_EXCEEDED):
            # The checkpoint written at the stop stays in S3 (a new job may pick the work up).
            error = f"{reason}: stopped at its limit; its last checkpoint is kept"
            self.finish(job, "failed", error=error, keep_checkpoints=True)
            return Outcome.DONE
        if reason == PREEMPTED:
            self._release(job)
            self.sqs.change_message_visibility(
                QueueUrl=delivery.queue_url, ReceiptHandle=delivery.receipt_handle, VisibilityTimeout=0
            )
            return Outcome.RELEASED
        log.warning("job %s: lease lost to another worker; stopping without writing", job.id)
        return Outcome.RETRY

    def _release(self, job: JobRecord) -> None:
        """Hand the job back to the queue: another worker (or this one) resumes it."""
        worker = self.settings.worker_id

        def release(record: JobRecord) -> JobRecord | None:
            if record.lease is None or record.lease.owner != worker:
                return None
            record.status = "queued"
            record.lease = None
            return record

        self.jobs.update(job.user_id, job.avatar_id, job.id, release)

    def finish(
        self,
        job: JobRecord,
        status: JobStatus,
        *,
        error: str | None = None,
        metrics: dict[str, Any] | None = None,
        adapter_version: int | None = None,
        progress: JobProgress | None = None,
        result: dict[str, Any] | None = None,
        keep_checkpoints: bool = False,
    ) -> None:
        """Write the final record, free the avatar's slot, drop checkpoints, publish the event."""

        def finish(record: JobRecord) -> JobRecord:
            record.status = status
            record.finished_at = utcnow()
            record.lease = None
            record.error = error
            if metrics is not None:
                record.metrics = metrics
            if adapter_version is not None:
                record.adapter_version = adapter_version
            if progress is not None:
                record.progress = progress
            if result is not None:
                record.result = result
            return record

        final = self.jobs.update(job.user_id, job.avatar_id, job.id, finish)
        _observe(final, time.monotonic() - self._claimed_at)
        self.jobs.clear_active_pointer(job.user_id, job.avatar_id, job.id)
        if not keep_checkpoints:
            self.stores.artifacts.delete_checkpoints(job.user_id, job.avatar_id, job.id)
        self.events.publish(f"job.{status}", final)  # type: ignore[arg-type]
        log.info("job %s %s%s", job.id, status, f": {error}" if error else "")


def _observe(final: JobRecord, seconds: float) -> None:
    """Prometheus: jobs by status, their duration, trained tokens."""
    prom.JOBS.labels(final.status).inc()
    prom.JOB_DURATION.labels(final.status).observe(seconds)
    tokens = (final.metrics.get("train_tokens_per_epoch") or 0) * (final.metrics.get("epochs") or 0)
    if tokens and final.metrics.get("train_seconds"):
        prom.TRAINED_TOKENS.inc(tokens)
        prom.TOKENS_PER_SECOND.set(tokens / final.metrics["train_seconds"])
