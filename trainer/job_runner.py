"""Running one request from the train queue end to end: claim the job, heartbeat, do the job's
work, finish (record, active slot, event).

The runner owns everything every job type shares: the claim and its lease, duplicate and
rolled-back deliveries, attempts, the heartbeat (visibility, lease, progress, cancel), stops
(cancel, SIGTERM, lost lease), failures and the final record + event. What a job *does* is a
`JobWork` strategy handed to `run()`: `JobRunner.train` (the default) or `trainer.fuse.FuseWork`.

The job record in S3 is the truth about who owns a job (SQS caps a message's invisibility at
12 hours, so a long job's message may come back while its worker is alive): a worker owns a
job while its lease, renewed by the heartbeat, has not expired.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from contracts import logs
from contracts.adapter import AdapterSettings
from contracts.adapters import FullModelManifest
from contracts.job_kinds import kind_of, record_of
from contracts.jobs import FINAL_STATUSES, JobLease, JobProgress, JobRecord, JobType, utcnow
from contracts.keys import adapter_config_key, adapter_version_prefix, full_model_version_prefix, training_logs_prefix
from contracts.messages import QueueRequest
from contracts.s3uri import InvalidS3Uri, S3Uri, parse_s3_uri, within_user_prefix
from trainer import metrics as prom
from trainer.artifacts import ArtifactStore
from trainer.aws import is_not_found
from trainer.base_model import BaseModelCache, BaseRef, LoadedBase, QuantOptions, resolve_base
from trainer.checkpoint_schedule import CheckpointSchedule
from trainer.dataset import build_examples, split_train_eval
from trainer.distributed import available_devices, run_data_parallel
from trainer.documents import DocumentSource
from trainer.errors import JobFailure
from trainer.evaluation import CurrentAdapter, evaluate_version
from trainer.events import EventPublisher
from trainer.full_finetune import SampleOptions, train_full
from trainer.integrations import check_available as check_integrations
from trainer.integrations import upload_logs
from trainer.job_store import JobStore
from trainer.outputs import copy_prefix, output_target
from trainer.settings import TrainerSettings
from trainer.training import DURATION_EXCEEDED, train_adapter
from trainer.warm_start import WarmStart, plan_warm_start

log = logging.getLogger("avatune.trainer")


@dataclass
class Delivery:
    """The SQS message a job arrived in."""

    queue_url: str
    receipt_handle: str


class Outcome:
    DONE = "done"  # delete the message
    RETRY = "retry"  # leave it to come back
    RELEASED = "released"  # made visible again for another worker (preempted)


# A job's work once the runner has claimed it: (job, heartbeat, scratch dir, delivery) -> Outcome.
# It ends the job through `JobRunner.finish` / `JobRunner.stopped`; a JobFailure it raises fails
# the job with that reason, any other error is retried up to MAX_JOB_ATTEMPTS.
JobWork = Callable[[JobRecord, "_Heartbeat", Path, Delivery], str]


class _Heartbeat(threading.Thread):
    """Keeps the message invisible and the lease fresh; persists progress; notices cancels."""

    def __init__(self, runner: JobRunner, job: JobRecord, delivery: Delivery) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{job.id}")
        self._runner = runner
        self._job = job
        self._delivery = delivery
        self._halt = threading.Event()
        self.progress: JobProgress | None = None
        self._written_progress: JobProgress | None = None
        self.cancelled = threading.Event()
        self.lost_lease = threading.Event()
        self._log_context = logs.current_context()  # threads do not inherit context variables

    def run(self) -> None:
        logs.bind(**self._log_context)
        settings = self._runner.settings
        tick = min(settings.heartbeat_seconds, settings.progress_interval_seconds)
        since_visibility = 0.0
        while not self._halt.wait(tick):
            since_visibility += tick
            try:
                if since_visibility >= settings.heartbeat_seconds:
                    since_visibility = 0.0
                    self._runner.sqs.change_message_visibility(
                        QueueUrl=self._delivery.queue_url,
                        ReceiptHandle=self._delivery.receipt_handle,
                        VisibilityTimeout=settings.visibility_timeout_seconds,
                    )
                self.beat()
            except Exception:  # a missed beat is retried on the next tick
                log.exception("heartbeat failed for job %s", self._job.id)

    def beat(self) -> None:
        progress = self.progress
        worker = self._runner.settings.worker_id

        def renew(record: JobRecord) -> JobRecord | None:
            if record.lease is None or record.lease.owner != worker:
                self.lost_lease.set()
                return None
            if record.cancel_requested:
                self.cancelled.set()
            record.lease = self._runner.new_lease()
            if progress is not None:
                record.progress = progress
            return record

        self._runner.jobs.update(self._job.user_id, self._job.avatar_id, self._job.id, renew)
        self._written_progress = progress

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)


class _Control:
    """The TrainingControl a job hands to the training loop."""

    def __init__(self, runner: JobRunner, job: JobRecord, heartbeat: _Heartbeat, shutdown: threading.Event) -> None:
        self._runner = runner
        self._job = job
        self._heartbeat = heartbeat
        self._shutdown = shutdown
        settings = runner.settings
        self._schedule = CheckpointSchedule(settings.checkpoint_every_steps, settings.checkpoint_interval_seconds)
        # resources.max_duration_minutes counts from the job's first start (retries included).
        resources = job.spec.resources if job.spec else None
        self._limit = resources.max_duration_minutes if resources else None
        self._deadline = (job.started_at or utcnow()) + timedelta(minutes=self._limit) if self._limit else None

    def stop_reason(self) -> str | None:
        if self._heartbeat.cancelled.is_set():
            return "cancelled"
        if self._heartbeat.lost_lease.is_set():
            return "lost_lease"
        if self._shutdown.is_set():
            return "preempted"
        if self._deadline is not None and utcnow() >= self._deadline:
            return f"{DURATION_EXCEEDED}={self._limit:g}"
        return None

    def report(self, progress: JobProgress) -> None:
        self._heartbeat.progress = progress

    def checkpoint_due(self, step: int) -> bool:
        return self._schedule.due(step)

    def checkpoint_saved(self, local_dir: Path, step: int) -> None:
        self._schedule.saved()
        self._runner.artifacts.save_checkpoint(self._job.user_id, self._job.avatar_id, self._job.id, local_dir, step)


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
        self.s3 = s3
        self.sqs = sqs
        self.events = events
        self.models = models
        self.shutdown = shutdown
        self.jobs = JobStore(s3, settings.s3_bucket)
        self.artifacts = ArtifactStore(s3, settings.s3_bucket)
        self.documents = DocumentSource(s3, settings.s3_bucket, settings.download_concurrency)
        self._claimed_at = time.monotonic()
        self._current_base: BaseRef | None = None  # the running train job's base (one job at a time)

    def new_lease(self) -> JobLease:
        return JobLease(
            owner=self.settings.worker_id, expires_at=utcnow() + timedelta(seconds=self.settings.lease_seconds)
        )

    # -- claiming ---------------------------------------------------------------------------

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
        worker has it), "gone" (rolled back by the API), "mismatch" (the record is another type)."""
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
        if existing.type != _request_type(req):
            return None, "mismatch"
        record = self.jobs.update(req.user_id, req.avatar_id, req.job_id, claim)
        return (None if verdict["why"] else record), verdict["why"]

    # -- the job ----------------------------------------------------------------------------

    def run(self, req: QueueRequest, delivery: Delivery, work: JobWork | None = None) -> str:
        """Claim the request's job and run `work` on it (default: training); the Outcome says
        what to do with the message."""
        work = work or self.train
        job, why = self._claim(req)
        if job is None:
            if why == "final":
                log.info("job %s already finished: duplicate delivery ignored", req.job_id)
                return Outcome.DONE
            if why == "gone":
                log.warning("job %s has no record (rolled back by the API): message dropped", req.job_id)
                return Outcome.DONE
            if why == "mismatch":
                log.error(
                    "job %s is not a %s job: message (schema %s) dropped", req.job_id, _request_type(req), req.schema_
                )
                return Outcome.DONE
            log.info("job %s is owned by a live worker: leaving the message", req.job_id)
            return Outcome.RETRY
        if job.attempts > self.settings.max_attempts:
            self.finish(job, "failed", error=f"gave up after {job.attempts - 1} attempts")
            return Outcome.DONE
        log.info("%s job %s started (attempt %d)", job.type, job.id, job.attempts)
        prom.QUEUE_WAIT.observe(max(0.0, (utcnow() - job.created_at).total_seconds()))
        if job.attempts == 1:
            self.events.publish("job.started", job)
        prom.BUSY.set(1)
        self._claimed_at = time.monotonic()
        heartbeat = _Heartbeat(self, job, delivery)
        heartbeat.start()
        scratch = Path(tempfile.mkdtemp(prefix=f"avatune-{job.id}-", dir=self.settings.scratch_dir))
        try:
            return work(job, heartbeat, scratch, delivery)
        except JobFailure as exc:
            self.finish(job, "failed", error=str(exc))
            return Outcome.DONE
        except MemoryError:
            self.finish(job, "failed", error="out of memory: lower batch_size or max_seq_length")
            return Outcome.DONE
        except Exception as exc:
            if is_cuda_oom(exc):
                self.finish(job, "failed", error="out of GPU memory: lower batch_size or max_seq_length")
                return Outcome.DONE
            log.exception("job %s hit an unexpected error", job.id)
            if job.attempts >= self.settings.max_attempts:
                self.finish(job, "failed", error=f"internal error after {job.attempts} attempts: {type(exc).__name__}")
                return Outcome.DONE
            self._release(job)
            return Outcome.RETRY
        finally:
            prom.BUSY.set(0)
            heartbeat.stop()
            shutil.rmtree(scratch, ignore_errors=True)

    def _resolved_config(self, job: JobRecord) -> AdapterSettings:
        """Worker defaults <- the avatar's stored config <- the job's overrides."""
        stored = AdapterSettings()
        try:
            body = self.s3.get_object(
                Bucket=self.settings.s3_bucket, Key=adapter_config_key(job.user_id, job.avatar_id)
            )["Body"].read()
            stored = AdapterSettings.model_validate_json(body)
        except Exception as exc:
            if not is_not_found(exc):
                raise
        return job.config.merged_over(stored.merged_over(self.settings.default_adapter_settings()))

    def control(self, job: JobRecord, heartbeat: _Heartbeat) -> _Control:
        """What a job's work consults to stop (cancel, SIGTERM, lost lease) and report progress."""
        return _Control(self, job, heartbeat, self.shutdown)

    def train(self, job: JobRecord, heartbeat: _Heartbeat, scratch: Path, delivery: Delivery) -> str:
        """The work of a train job: data, dataset, training, publish."""
        cfg = self._resolved_config(job)
        ref, log_dest = self._spec_setup(job, cfg)  # base model, method vs qlora, report_to, log_uri
        warm, output = self._warm_start(job, cfg, ref.name, scratch), output_target(job, self.settings.s3_bucket)
        data = self.documents.fetch(
            job.user_id, job.avatar_id, scratch / "data", job.spec.datasets, skip=warm.skip if warm else None
        )
        resume_from = self._checkpoint_to_resume(job, data.documents, scratch)
        if not resume_from:
            self.jobs.update(job.user_id, job.avatar_id, job.id, lambda r: _with_data(r, data.documents))
        processes = cfg.gpus or 1
        if processes > 1 and processes > available_devices():
            raise JobFailure(f"the job asks for {processes} GPUs but this worker has {available_devices()}")
        loads_before = self.models.loads
        tokenizer = self.models.tokenizer(ref.path, revision=ref.revision, token=ref.token)
        examples, stats = build_examples(tokenizer, data.conversations, cfg.max_seq_length or 1024)
        if not examples or stats.trainable_tokens == 0:
            raise JobFailure("the documents hold no assistant tokens to train on (after truncation to max_seq_length)")
        eval_fraction = cfg.eval_fraction if cfg.eval_fraction is not None else self.settings.eval_fraction
        train_set, eval_set = split_train_eval(examples, eval_fraction, seed=cfg.seed or 0)
        control = self.control(job, heartbeat)
        report_to = list(job.spec.integrations.report_to) if job.spec.integrations else []
        log_dir = scratch / "logs"
        if processes > 1 and cfg.method == "full":
            raise JobFailure("method full runs on one GPU: leave resources.gpus at 1")
        try:
            if processes > 1:  # the ranks load the base themselves
                outcome = run_data_parallel(
                    processes=processes,
                    base_model=ref.path,
                    method=cfg.method or "qlora",
                    cfg=cfg,
                    train_examples=train_set,
                    eval_examples=eval_set,
                    work_dir=scratch / "work",
                    control=control,
                    resume_from=resume_from,
                    revision=ref.revision,
                    token_env=_token_env(job),
                    report_to=report_to,
                    log_dir=log_dir,
                )
            elif cfg.method == "full":
                outcome = train_full(
                    self.models,
                    ref,
                    cfg,
                    train_set,
                    eval_set,
                    scratch / "work",
                    control,
                    resume_from,
                    report_to,
                    log_dir,
                    SampleOptions(job.id, self.settings.sample_prompts, self.settings.sample_max_new_tokens),
                )
            else:
                outcome = train_adapter(
                    self._base(cfg),
                    cfg,
                    train_set,
                    eval_set,
                    scratch / "work",
                    control,
                    resume_from,
                    report_to,
                    log_dir,
                    init_adapter_dir=warm.adapter_dir if warm else None,
                )
        finally:
            if report_to:  # the logs of a stopped or failed run are worth having too
                upload_logs(self.s3, log_dir, log_dest)
        # A full fine-tune always loads a private copy: nothing cached was reused.
        base_model_reused = processes == 1 and self.models.loads == loads_before and cfg.method != "full"
        if not outcome.completed:
            return self.stopped(job, outcome.stop_reason, delivery)
        metrics = dict(
            outcome.metrics,
            assistant_tokens=stats.assistant_tokens,
            trainable_tokens=stats.trainable_tokens,
            dropped_examples=stats.dropped,
            split_conversations=stats.split,
            truncated_examples=stats.truncated,
            documents=len(data.documents),
            resumed_from_step=_checkpoint_step(resume_from),
            base_model_reused=base_model_reused,
        )
        if warm is not None:
            metrics.update(warm.metrics, documents_skipped=data.skipped)
        assert outcome.adapter_dir is not None
        metrics.update(base_model=ref.name, base_model_revision=ref.revision)
        if report_to:
            metrics["log_uri"] = str(log_dest)
        if cfg.method == "full":
            version, metrics = self._publish_full(job, ref, cfg, outcome.adapter_dir, metrics)
        else:
            version, metrics = self._publish_trained(
                job, cfg, ref.name, outcome.adapter_dir, eval_set, metrics, scratch
            )
        if output is not None:  # artifacts.output_uri: a copy of the published version's files
            source = (full_model_version_prefix if cfg.method == "full" else adapter_version_prefix)(
                job.user_id, job.avatar_id, version
            )
            metrics = dict(
                metrics,
                output_uri=str(output),
                output_files=copy_prefix(self.s3, self.settings.s3_bucket, source, output),
            )
        final_progress = heartbeat.progress
        if final_progress is not None:
            final_progress = final_progress.model_copy(
                update={"step": final_progress.total_steps or final_progress.step, "eta_seconds": 0}
            )
        self.finish(job, "succeeded", metrics=metrics, adapter_version=version, progress=final_progress)
        return Outcome.DONE

    # -- the job spec's base model, method and integrations (spec-trainer) -----------------------

    def _spec_setup(self, job: JobRecord, cfg: AdapterSettings) -> tuple[BaseRef, S3Uri]:
        """Check what the spec asks for before any work, and resolve the job's base model and
        log destination (the base's download from s3:// happens here, once per content)."""
        if cfg.method == "full":
            asked = [
                name
                for name in ("quant_type", "double_quant", "compute_dtype")
                if getattr(job.config, name) is not None
            ]
            if asked:
                raise JobFailure(
                    f"method full trains unquantised weights: qlora options ({', '.join(asked)}) need method qlora"
                )
            if job.spec.promote == "if_better":
                raise JobFailure(
                    "method full publishes a new full/{version}/ model and has no current one to "
                    "compare with: promote if_better needs a LoRA method"
                )
        report_to = list(job.spec.integrations.report_to) if job.spec.integrations else []
        check_integrations(report_to)
        log_dest = self._log_destination(job)
        settings = self.settings
        ref = resolve_base(
            job.spec.base_model,
            default=settings.base_model,
            user_id=job.user_id,
            bucket=settings.s3_bucket,
            allowed_prefixes=settings.allowed_base_prefixes(),
            s3=self.s3,
            cache_dir=settings.model_cache_dir,
        )
        self._current_base = ref
        return ref, log_dest

    def _log_destination(self, job: JobRecord) -> S3Uri:
        uri = job.spec.artifacts.log_uri if job.spec.artifacts else None
        if not uri:
            return S3Uri(self.settings.s3_bucket, training_logs_prefix(job.user_id, job.avatar_id, job.id))
        try:
            dest = parse_s3_uri(uri, prefix=True)
        except InvalidS3Uri as exc:
            raise JobFailure(f"artifacts.log_uri: {exc}") from None
        if not within_user_prefix(dest, self.settings.s3_bucket, job.user_id):
            raise JobFailure(f"artifacts.log_uri must lie inside s3://{self.settings.s3_bucket}/users/{job.user_id}/")
        return dest

    def _base(self, cfg: AdapterSettings) -> LoadedBase:
        """The worker's cached base for this job (its base model, revision, method, 4-bit config)."""
        ref = self._current_base or BaseRef(path=self.settings.base_model, label=self.settings.base_model)
        quant = QuantOptions(
            cfg.quant_type or "nf4", True if cfg.double_quant is None else cfg.double_quant, cfg.compute_dtype
        )
        return self.models.get(ref.path, cfg.method or "qlora", quant, revision=ref.revision, token=ref.token)

    def _publish_full(
        self, job: JobRecord, ref: BaseRef, cfg: AdapterSettings, model_dir: Path, metrics: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        """A full fine-tune's whole model to `full/{version}/` (a retried job's upload stands)."""
        user_id, avatar_id = job.user_id, job.avatar_id
        version = self.artifacts.full_version_of_job(user_id, avatar_id, job.id)
        if version is None:
            manifest = self.artifacts.publish_full(
                user_id,
                avatar_id,
                model_dir,
                FullModelManifest(
                    version=1,
                    job_id=job.id,
                    base_model=ref.name,
                    precision=metrics["precision"],
                    dtype=metrics["dtype"],
                    trainable_layers=cfg.trainable_layers,
                    metrics=metrics,
                ),
            )
            version = manifest.version
        return version, {**metrics, "full_model_prefix": full_model_version_prefix(user_id, avatar_id, version)}

    def _publish_trained(
        self,
        job: JobRecord,
        cfg: AdapterSettings,
        base_model: str,
        adapter_dir: Path,
        eval_set: list,
        metrics: dict[str, Any],
        scratch: Path,
    ) -> tuple[int, dict[str, Any]]:
        """Publish a trained adapter as the next version, samples.json and loss.png beside it, and
        make it current unless the job's `promote: if_better` finds it worse than the current
        adapter on this job's held-out split. A retried job's earlier version (and verdict) stands.
        Returns (version, the job's metrics)."""
        user_id, avatar_id = job.user_id, job.avatar_id
        published = self.artifacts.version_of_job(user_id, avatar_id, job.id)
        if published is not None:
            meta = self.artifacts.finish_promotion(user_id, avatar_id, published)
            return published, (meta.metrics if meta is not None else metrics)
        current = None
        if job.spec.promote == "if_better":
            manifest = self.artifacts.download_current(user_id, avatar_id, scratch / "current")
            # An adapter of another base is no yardstick: the base's own loss is, then.
            if manifest is not None and manifest.base_model in (None, base_model):
                current = CurrentAdapter(manifest.current_version, scratch / "current")
        evaluation = evaluate_version(
            self._base(cfg),
            adapter_dir,
            eval_set,
            scratch / "evaluation",
            job_id=job.id,
            policy=job.spec.promote,
            current=current,
            metrics=metrics,
            sample_prompts=self.settings.sample_prompts,
            max_new_tokens=self.settings.sample_max_new_tokens,
        )
        metrics = {**metrics, **evaluation.metrics}
        if not evaluation.promote:
            log.info("job %s: %s", job.id, evaluation.metrics["promote_reason"])
        version = self.artifacts.publish(
            user_id,
            avatar_id,
            adapter_dir,
            job_id=job.id,
            base_model=base_model,
            metrics=metrics,
            keep_versions=self.settings.adapter_keep_versions,
            extra_files=evaluation.files,
            promote=evaluation.promote,
        )
        return version, metrics

    def _warm_start(self, job: JobRecord, cfg: AdapterSettings, base_model: str, scratch: Path) -> WarmStart | None:
        """For `warm_start: true`: the adapter to continue from and the documents to skip (spec-api)."""
        if not job.spec.warm_start:
            return None
        if (cfg.gpus or 1) > 1 or cfg.method == "full":
            raise JobFailure(
                "warm_start continues a LoRA adapter on one GPU: it cannot be combined with method 'full' or gpus > 1"
            )
        return plan_warm_start(self.artifacts, self.jobs, job, base_model, scratch / "warm-start")

    def _checkpoint_to_resume(self, job: JobRecord, documents: list, scratch: Path) -> Path | None:
        step = self.artifacts.latest_checkpoint(job.user_id, job.avatar_id, job.id)
        if step is None:
            return None
        pinned = {(d.name, d.etag) for d in job.data}
        if pinned != {(d.name, d.etag) for d in documents}:
            log.warning("job %s: training data changed since the checkpoint; starting over", job.id)
            self.artifacts.delete_checkpoints(job.user_id, job.avatar_id, job.id)
            return None
        log.info("job %s resumes from its checkpoint at step %d", job.id, step)
        dest = scratch / "work" / "checkpoints" / f"checkpoint-{step}"
        return self.artifacts.download_checkpoint(job.user_id, job.avatar_id, job.id, step, dest)

    def stopped(self, job: JobRecord, reason: str | None, delivery: Delivery) -> str:
        """End a job whose work stopped early for `reason` (a `_Control.stop_reason()`)."""
        if reason == "cancelled":
            self.finish(job, "cancelled", error="cancelled by request")
            return Outcome.DONE
        if reason and reason.startswith(DURATION_EXCEEDED):
            # The checkpoint written at the stop stays in S3 (a new job may pick the work up).
            self.finish(
                job,
                "failed",
                error=f"{reason}: stopped at its limit; its last checkpoint is kept",
                keep_checkpoints=True,
            )
            return Outcome.DONE
        if reason == "preempted":
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
        status: str,
        *,
        error: str | None = None,
        metrics: dict[str, Any] | None = None,
        adapter_version: int | None = None,
        progress: JobProgress | None = None,
        keep_checkpoints: bool = False,
    ) -> None:
        def finish(record: JobRecord) -> JobRecord:
            record.status = status  # type: ignore[assignment]
            record.finished_at = utcnow()
            record.lease = None
            record.error = error
            if metrics is not None:
                record.metrics = metrics
            if adapter_version is not None:
                record.adapter_version = adapter_version
            if progress is not None:
                record.progress = progress
            return record

        final = self.jobs.update(job.user_id, job.avatar_id, job.id, finish)
        prom.JOBS.labels(status).inc()
        prom.JOB_DURATION.labels(status).observe(time.monotonic() - self._claimed_at)
        tokens = (final.metrics.get("train_tokens_per_epoch") or 0) * (final.metrics.get("epochs") or 0)
        if tokens and final.metrics.get("train_seconds"):
            prom.TRAINED_TOKENS.inc(tokens)
            prom.TOKENS_PER_SECOND.set(tokens / final.metrics["train_seconds"])
        self.jobs.clear_active_pointer(job.user_id, job.avatar_id, job.id)
        if not keep_checkpoints:
            self.artifacts.delete_checkpoints(job.user_id, job.avatar_id, job.id)
        self.events.publish(f"job.{status}", final)  # type: ignore[arg-type]
        log.info("job %s %s%s", job.id, status, f": {error}" if error else "")


def _with_data(record: JobRecord, documents: list) -> JobRecord:
    record.data = documents
    return record


def _token_env(job: JobRecord) -> str | None:
    """The NAME of the env var holding the job's hub token (ranks read it themselves: the token
    never goes into a file)."""
    return job.spec.base_model.token_env if job.spec.base_model else None


def _checkpoint_step(path: Path | None) -> int | None:
    return int(path.name.rsplit("-", 1)[-1]) if path is not None else None


def _request_type(req: QueueRequest) -> JobType:
    return kind_of(req).type


def report_progress(control: Any, step: int, total_steps: int) -> JobProgress:
    """Report `step` of `total_steps` through a job's control (its heartbeat writes it to the
    record) and return that progress, for `finish(..., progress=...)`."""
    progress = JobProgress(step=step, total_steps=total_steps)
    control.report(progress)
    return progress


def is_cuda_oom(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(exc)
