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

from contracts.conditional import RecordNotFound
from contracts.job_kinds import kind_of, record_of
from contracts.jobs import FINAL_STATUSES, JobLease, JobProgress, JobRecord, JobStatus, Redelivery, utcnow
from contracts.messages import EventType, QueueRequest, event_id
from trainer import metrics as prom
from trainer.artifacts import ArtifactStore
from trainer.base_model import BaseModelCache
from trainer.checkpoint_schedule import CheckpointSchedule
from trainer.control import CANCELLED, DURATION_EXCEEDED, PREEMPTED
from trainer.documents import DocumentSource
from trainer.errors import JobFailure, RetryLater, is_cuda_oom
from trainer.events import EventPublisher
from trainer.job_store import JobStore
from trainer.runtime import claims
from trainer.runtime.claims import CANCELLED_ERROR, Claim
from trainer.runtime.context import JobContext, JobResult, JobWork, LeaseLost, Stopped, Stores, Succeeded
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
    ADOPTED = "adopted"  # left to the job's live owner, which keeps it (trainer.runtime.heartbeat)


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
            documents=DocumentSource(s3, bucket, settings.download_concurrency, settings.max_document_bytes),
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
        """Decide what this delivery means (`trainer.runtime.claims`) in one conditional write;
        the record as written and the verdict, or (None, "gone" | "mismatch") when the record
        is missing (rolled back by the API) or is another kind of job."""
        existing = self._record_for(req)
        if existing is None:
            return None, "gone"
        if existing.type != kind_of(req).type:
            return None, "mismatch"
        verdict: list[Claim] = []
        lease = self.new_lease()  # one per claim: a retried write must recognise its own lease

        def decide(record: JobRecord) -> JobRecord | None:
            verdict[:] = [claims.claim(record, self.settings.worker_id, lease, utcnow(), self.max_failures)]
            return None if verdict[0] in (Claim.FINAL, Claim.OWNED, Claim.REPEATED) else record

        record = self.jobs.update(req.user_id, req.avatar_id, req.job_id, decide)
        return record, Claim.CLAIMED if verdict[0] == Claim.REPEATED else verdict[0]

    @property
    def max_failures(self) -> int:
        return self.settings.max_attempts

    def _adopt(self, job: JobRecord, delivery: Delivery) -> str:
        """Hand this delivery's message to the job's live owner (see trainer.runtime.heartbeat)."""
        received = delivery.first_received_at or utcnow()

        def offer(record: JobRecord) -> JobRecord | None:
            lease = record.lease
            if record.status != "running" or lease is None or lease.expires_at <= utcnow():
                return None  # the owner is gone meanwhile: the message comes back and resumes the job
            record.redelivery = Redelivery(receipt_handle=delivery.receipt_handle or "", received_at=received)
            return record

        self.jobs.update(job.user_id, job.avatar_id, job.id, offer)
        log.info("job %s is owned by a live worker: its message is left for the owner to adopt", job.id)
        return Outcome.ADOPTED

    # -- the job ------------------------------------------------------------------------------

    def run(self, req: QueueRequest, delivery: Delivery, work: JobWork) -> str:
        """Claim the request's job and run `work` on it; the Outcome says what to do with the
        message `delivery` holds once this returns (the heartbeat may have swapped it)."""
        try:
            job, verdict = self._claim(req)
        except RecordNotFound:
            verdict, job = "gone", None
        if job is None:
            return self._not_claimed(req, verdict)
        if verdict == Claim.FINAL:
            self.complete_tail(job)
            log.info("job %s already finished: duplicate delivery ignored", job.id)
            return Outcome.DONE
        if verdict == Claim.OWNED:
            return self._adopt(job, delivery)
        if verdict in (Claim.CANCELLED, Claim.GAVE_UP):
            log.info("job %s %s without starting: %s", job.id, job.status, job.error)
            self.complete_tail(job)
            return Outcome.DONE
        log.info("%s job %s started (attempt %d)", job.type, job.id, job.attempts)
        prom.QUEUE_WAIT.observe(max(0.0, (utcnow() - job.created_at).total_seconds()))
        self._publish(job, "job.started")  # once per job: the record says whether it went out
        prom.BUSY.set(1)
        self._claimed_at = time.monotonic()
        heartbeat = self._heartbeat(job, delivery)
        heartbeat.start()
        scratch = Path(tempfile.mkdtemp(prefix=f"avatune-{job.id}-", dir=self.settings.scratch_dir))
        try:
            ctx = JobContext(job, self._control(job, heartbeat), scratch, self.settings, self.stores)
            return self._ended(job, work(ctx), heartbeat)
        except JobFailure as exc:
            return self._fail(job, str(exc))
        except MemoryError:
            return self._fail(job, "out of memory: lower batch_size or max_seq_length")
        except RecordNotFound:
            log.warning("job %s: its record was deleted (the avatar with it); stopping without writing", job.id)
            return Outcome.DONE
        except LeaseLost as exc:
            log.warning("%s; stopping without writing", exc)
            return Outcome.RETRY
        except RetryLater as exc:
            log.warning("job %s: %s; handed back to be retried later", job.id, exc)
            self._release(job)
            return Outcome.RETRY
        except Exception as exc:
            if is_cuda_oom(exc):
                return self._fail(job, "out of GPU memory: lower batch_size or max_seq_length")
            log.exception("job %s hit an unexpected error", job.id)
            return self._failed_attempt(job, exc)
        finally:
            prom.BUSY.set(0)
            heartbeat.stop()
            shutil.rmtree(scratch, ignore_errors=True)

    def _not_claimed(self, req: QueueRequest, why: str) -> str:
        if why == "gone":
            log.warning("job %s has no record (rolled back by the API, or deleted): message dropped", req.job_id)
        else:
            log.error("job %s is not a %s job: message (schema %s) dropped", req.job_id, kind_of(req).type, req.schema_)
        return Outcome.DONE

    def _heartbeat(self, job: JobRecord, delivery: Delivery) -> Heartbeat:
        settings = self.settings
        timing = HeartbeatTiming(
            visibility_every=settings.heartbeat_seconds,
            progress_every=settings.progress_interval_seconds,
            visibility_timeout=settings.visibility_timeout_seconds,
            visibility_cap=settings.sqs_max_visibility_seconds,
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

    def _ended(self, job: JobRecord, result: JobResult, heartbeat: Heartbeat) -> str:
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
        return self._stopped(job, result.reason, heartbeat)

    def _fail(self, job: JobRecord, error: str) -> str:
        self.finish(job, "failed", error=error)
        return Outcome.DONE

    def _failed_attempt(self, job: JobRecord, exc: Exception) -> str:
        """An attempt that raised: one failure, in the same conditional write either handed
        back for a retry or, at MAX_JOB_ATTEMPTS failures, failed."""
        worker = self.settings.worker_id
        kind = type(exc).__name__
        ended: list[bool] = []

        def fail_once(record: JobRecord) -> JobRecord | None:
            ended.clear()
            if record.lease is None or record.lease.owner != worker:
                return None  # not ours any more: whoever has it decides
            record.failures += 1
            record.lease = None
            if record.failures >= self.max_failures:
                record.status = "failed"
                record.finished_at = utcnow()
                record.error = f"internal error after {record.failures} failed attempts: {kind}"
                ended.append(True)
            else:
                record.status = "queued"
                record.error = f"internal error: {kind} (attempt failed; retrying)"
            return record

        final = self.jobs.update(job.user_id, job.avatar_id, job.id, fail_once)
        if not ended:
            return Outcome.RETRY
        _observe(final, time.monotonic() - self._claimed_at)
        log.info("job %s failed: %s", job.id, final.error)
        self.complete_tail(final)
        return Outcome.DONE

    def _stopped(self, job: JobRecord, reason: str | None, heartbeat: Heartbeat) -> str:
        """End a job whose work stopped early for `reason` (a `JobControl.stop_reason()`)."""
        if reason == CANCELLED:
            self.finish(job, "cancelled", error=CANCELLED_ERROR)
            return Outcome.DONE
        if reason and reason.startswith(DURATION_EXCEEDED):
            # The checkpoint written at the stop stays in S3 (a new job may pick the work up).
            error = f"{reason}: stopped at its limit; its last checkpoint is kept"
            self.finish(job, "failed", error=error)
            return Outcome.DONE
        if reason == PREEMPTED:
            self._release(job)
            held = heartbeat.held()
            if held.receipt_handle is not None:
                self.sqs.change_message_visibility(
                    QueueUrl=held.queue_url, ReceiptHandle=held.receipt_handle, VisibilityTimeout=0
                )
            return Outcome.RELEASED
        log.warning("job %s: lease lost to another worker; stopping without writing", job.id)
        return Outcome.RETRY

    def _release(self, job: JobRecord) -> JobRecord | None:
        """Hand the job back to the queue: another worker (or this one) resumes it (a graceful
        hand-back: not a failed attempt). None when the job is no longer ours."""
        worker = self.settings.worker_id
        mine: list[bool] = []

        def release(record: JobRecord) -> JobRecord | None:
            mine[:] = [record.lease is not None and record.lease.owner == worker]
            if not mine[0]:
                return None
            record.status = "queued"
            record.lease = None
            return record

        released = self.jobs.update(job.user_id, job.avatar_id, job.id, release)
        return released if mine[0] else None

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
    ) -> None:
        """Write the final record (unless another worker owns the job by now), then its tail:
        free the avatar's slot, drop checkpoints, publish the event. A job found final already
        gets its tail all the same (its end may be this write, whose answer was lost)."""
        worker = self.settings.worker_id
        mine: list[bool] = []

        def finish(record: JobRecord) -> JobRecord | None:
            mine[:] = [record.status not in FINAL_STATUSES and (record.lease is None or record.lease.owner == worker)]
            if not mine[0]:
                return None
            record.status = status
            record.finished_at = utcnow()
            record.lease = None
            record.redelivery = None
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
        if not mine[0]:
            if final.status in FINAL_STATUSES:
                # Ended by someone else, or by this very write when its answer was lost (the
                # retried If-Match then fails on our own ETag): the tail is due either way, and
                # each of its steps is idempotent (the message is deleted after this).
                log.info("job %s is %s already: completing its tail", job.id, final.status)
                self.complete_tail(final)
            else:
                log.warning("job %s is owned by another worker: its end is not written", job.id)
            return
        _observe(final, time.monotonic() - self._claimed_at)
        log.info("job %s %s%s", job.id, status, f": {error}" if error else "")
        self.complete_tail(final)

    def complete_tail(self, final: JobRecord) -> None:
        """What follows a final record, each step idempotent, so a redelivery of the job's
        message can finish what a crash interrupted: the avatar's slot freed, checkpoints
        dropped (unless a duration limit keeps them), the final event published once per id
        (at-least-once: a crash between publishing and marking publishes it again, same id)."""
        self.jobs.clear_active_pointer(final.user_id, final.avatar_id, final.id)
        if not keeps_checkpoints(final):
            self.stores.artifacts.delete_checkpoints(final.user_id, final.avatar_id, final.id)
        self._publish(final, f"job.{final.status}")  # type: ignore[arg-type]

    def _publish(self, job: JobRecord, event: EventType) -> None:
        """Publish `event` unless the record says it went out already, then mark it."""
        if event_id(job.id, event) in job.events_published:
            return
        published = self.events.publish(event, job)

        def mark(record: JobRecord) -> JobRecord | None:
            if published in record.events_published:
                return None
            record.events_published.append(published)
            return record

        self.jobs.update(job.user_id, job.avatar_id, job.id, mark)


def keeps_checkpoints(final: JobRecord) -> bool:
    """A job stopped at its duration limit keeps its last checkpoint (a new job may pick the
    work up); every other final job's checkpoints go."""
    return final.status == "failed" and (final.error or "").startswith(DURATION_EXCEEDED)


def _observe(final: JobRecord, seconds: float) -> None:
    """Prometheus: jobs by status, their duration, trained tokens."""
    prom.JOBS.labels(final.status).inc()
    prom.JOB_DURATION.labels(final.status).observe(seconds)
    tokens = (final.metrics.get("train_tokens_per_epoch") or 0) * (final.metrics.get("epochs") or 0)
    if tokens and final.metrics.get("train_seconds"):
        prom.TRAINED_TOKENS.inc(tokens)
        prom.TOKENS_PER_SECOND.set(tokens / final.metrics["train_seconds"])
