"""How the OpenAI-compatible surface shows an avatune training job: the `fine_tuning.job`
object, its events and its checkpoints, each derived from the job record (its state, progress
and metrics) and the job's `FineTuningEntry` (what the request asked for). Nothing here is
stored: the views follow the record as the trainer updates it.

- `fine_tuned_model`: `ft:{model}:{user_id}:{avatar_id}:{adapter_version}` once the job has
  published its version (`model` as the request named it; ids never hold a colon, so the last
  three fields parse back from the right).
- hyperparameters: the configuration the trainer resolved at its first claim
  (`resolved_config`: worker defaults <- the avatar's config.json <- the job), else what the
  request sent; `learning_rate_multiplier` is the learning rate over avatune's documented
  default, 2e-4.
- events, newest first, each id `ftevent-{job_id}-{key}` with a key that orders them: the job's
  creation, its start, one `metrics` event per step of the loss curve (the record's
  `metrics.loss_curve` once training ended; while it runs, the current step of its `progress`),
  the published model and the end. A step's time is interpolated between the job's start and end
  (the trainer records steps, not their times).
- checkpoints: the one usable model a job leaves, the adapter version it published (avatune's
  resumable checkpoints are for resuming a job, not for use, and are not listed).
- `result_files`: a succeeded job's `file-results-{job_id}`, its step metrics as CSV
  (`step,train_loss,valid_loss`, from the loss curve), served by the Files API.
"""

from __future__ import annotations

import csv
import io
import math
from datetime import datetime
from typing import Any

from contracts.adapter import DOCUMENTED_DEFAULTS, AdapterSettings
from contracts.jobs import JobRecord
from handlers.openai_models import (
    CheckpointMetrics,
    FineTuningEntry,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobEvent,
    Hyperparameters,
    JobError,
    ShownHyperparameters,
    ShownMethod,
    ShownSupervised,
)

DEFAULT_LEARNING_RATE = DOCUMENTED_DEFAULTS.learning_rate or 2e-4
DEFAULT_SEED = DOCUMENTED_DEFAULTS.seed or 42

# Event keys: the job's phases around its steps (a step's key is STEP_KEY + step).
CREATED_KEY, STARTED_KEY, STEP_KEY = 0, 1, 100
CANCEL_KEY, MODEL_KEY, END_KEY = 10**12 - 3, 10**12 - 2, 10**12 - 1
RESULTS_FILE_PREFIX = "file-results-"


def _ts(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp())


def fine_tuned_model(entry: FineTuningEntry, record: JobRecord) -> str | None:
    if record.status != "succeeded" or record.adapter_version is None:
        return None
    return f"ft:{entry.model}:{record.user_id}:{record.avatar_id}:{record.adapter_version}"


def result_file_id(job_id: str) -> str:
    return f"{RESULTS_FILE_PREFIX}{job_id}"


def results_csv(record: JobRecord) -> bytes:
    """The job's step metrics, one row per step of its loss curve (an empty cell: not measured)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["step", "train_loss", "valid_loss"])
    for step, values in sorted(_curve_points(record).items()):
        writer.writerow([step, values.get("train_loss", ""), values.get("valid_loss", "")])
    return out.getvalue().encode()


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def shown_hyperparameters(entry: FineTuningEntry, resolved: AdapterSettings | None) -> ShownHyperparameters:
    """The resolved values once the trainer has them, else the request's ("auto" where unset)."""
    if resolved is not None:
        rate = resolved.learning_rate
        return ShownHyperparameters(
            n_epochs=_number(resolved.num_epochs) if resolved.num_epochs is not None else "auto",
            batch_size=resolved.batch_size if resolved.batch_size is not None else "auto",
            learning_rate_multiplier=round(rate / DEFAULT_LEARNING_RATE, 6) if rate is not None else "auto",
        )
    sent: Hyperparameters = entry.hyperparameters
    return ShownHyperparameters(
        n_epochs=sent.n_epochs if sent.n_epochs is not None else "auto",
        batch_size=sent.batch_size if sent.batch_size is not None else "auto",
        learning_rate_multiplier=sent.learning_rate_multiplier if sent.learning_rate_multiplier is not None else "auto",
    )


def _job_error(entry: FineTuningEntry, record: JobRecord) -> JobError | None:
    if record.status != "failed":
        return None
    message = record.error or "the job failed"
    if entry.training_file in message:
        return JobError(code="invalid_training_file", message=message, param="training_file")
    if entry.validation_file and entry.validation_file in message:
        return JobError(code="invalid_validation_file", message=message, param="validation_file")
    return JobError(code="training_failed", message=message)


def _trained_tokens(record: JobRecord) -> int | None:
    per_epoch, epochs = record.metrics.get("train_tokens_per_epoch"), record.metrics.get("epochs")
    if record.status != "succeeded" or not isinstance(per_epoch, int) or not isinstance(epochs, int | float):
        return None
    return round(per_epoch * epochs)


def _estimated_finish(record: JobRecord) -> int | None:
    eta = record.progress.eta_seconds
    if record.status != "running" or eta is None or not math.isfinite(eta):
        return None
    return int(record.updated_at.timestamp() + eta)


def job_object(entry: FineTuningEntry, record: JobRecord) -> FineTuningJob:
    """The `fine_tuning.job` of an avatune training job."""
    resolved = record.resolved_config
    hyperparameters = shown_hyperparameters(entry, resolved)
    seed = resolved.seed if resolved is not None and resolved.seed is not None else entry.seed
    return FineTuningJob(
        id=record.id,
        created_at=_ts(record.created_at) or entry.created_at,
        error=_job_error(entry, record),
        fine_tuned_model=fine_tuned_model(entry, record),
        finished_at=_ts(record.finished_at),
        hyperparameters=hyperparameters,
        model=entry.model,
        organization_id=record.user_id,
        result_files=[result_file_id(record.id)] if record.status == "succeeded" else [],
        seed=seed if seed is not None else DEFAULT_SEED,
        status=record.status,
        trained_tokens=_trained_tokens(record),
        training_file=entry.training_file,
        validation_file=entry.validation_file,
        estimated_finish=_estimated_finish(record),
        integrations=entry.integrations,
        metadata=entry.metadata,
        method=ShownMethod(supervised=ShownSupervised(hyperparameters=hyperparameters)),
        user_provided_suffix=entry.suffix,
    )


# -- events ----------------------------------------------------------------------------------


def event_id(job_id: str, key: int) -> str:
    return f"ftevent-{job_id}-{key:013d}"


def event_key(job_id: str, identifier: str) -> int | None:
    """The ordering key of one of the job's event ids; None for an id that is not one."""
    head, _, key = identifier.rpartition("-")
    return int(key) if head == f"ftevent-{job_id}" and key.isdigit() else None


def _event(record: JobRecord, key: int, at: int, message: str, **extra: Any) -> FineTuningJobEvent:
    return FineTuningJobEvent(id=event_id(record.id, key), created_at=at, message=message, **extra)


def _curve_points(record: JobRecord) -> dict[int, dict[str, float]]:
    """step -> {"train_loss", "valid_loss"} from the loss curve, or the running job's progress."""
    points: dict[int, dict[str, float]] = {}
    curve = record.metrics.get("loss_curve")
    if isinstance(curve, dict):
        for name, field in (("train", "train_loss"), ("eval", "valid_loss")):
            for point in curve.get(name) or []:
                if len(point) == 2 and point[1] is not None:
                    points.setdefault(int(point[0]), {})[field] = float(point[1])
    elif record.progress.step > 0 and record.progress.train_loss is not None:
        points[record.progress.step] = {"train_loss": record.progress.train_loss}
    return points


def _step_events(record: JobRecord, started: int) -> list[FineTuningJobEvent]:
    points = _curve_points(record)
    total = record.progress.total_steps or max(points, default=0) or 1
    end = _ts(record.finished_at) or _ts(record.updated_at) or started
    events = []
    for step, values in sorted(points.items()):
        at = started + round((end - started) * min(step, total) / total)
        shown = ", ".join(
            f"{label}={values[field]:.4f}"
            for field, label in (("train_loss", "training loss"), ("valid_loss", "validation loss"))
            if field in values
        )
        data = {"step": step, "total_steps": total, **values}
        events.append(_event(record, STEP_KEY + step, at, f"Step {step}/{total}: {shown}", type="metrics", data=data))
    return events


def _end_events(entry: FineTuningEntry, record: JobRecord) -> list[FineTuningJobEvent]:
    finished = _ts(record.finished_at) or _ts(record.updated_at) or entry.created_at
    if record.status == "running" and record.cancel_requested:
        return [_event(record, CANCEL_KEY, _ts(record.updated_at) or finished, "Cancellation requested")]
    if record.status == "succeeded":
        model = fine_tuned_model(entry, record)
        return [
            _event(record, MODEL_KEY, finished, f"New fine-tuned model created: {model}"),
            _event(record, END_KEY, finished, "The job has successfully completed"),
        ]
    if record.status == "failed":
        return [_event(record, END_KEY, finished, f"The job failed: {record.error or 'unknown error'}", level="error")]
    if record.status == "cancelled":
        return [_event(record, END_KEY, finished, "The job was cancelled")]
    return []


def job_events(entry: FineTuningEntry, record: JobRecord) -> list[FineTuningJobEvent]:
    """Every event of the job so far, newest first."""
    files = entry.training_file + (f" and {entry.validation_file}" if entry.validation_file else "")
    events = [
        _event(
            record,
            CREATED_KEY,
            _ts(record.created_at) or entry.created_at,
            f"Created fine-tuning job {record.id} on avatar {record.avatar_id!r}: {files} validated, job queued",
        )
    ]
    if record.started_at is not None:
        started = _ts(record.started_at) or entry.created_at
        events.append(_event(record, STARTED_KEY, started, "Fine-tuning job started"))
        events.extend(_step_events(record, started))
    events.extend(_end_events(entry, record))
    return sorted(events, key=lambda e: event_key(record.id, e.id) or 0, reverse=True)


# -- checkpoints -----------------------------------------------------------------------------


def job_checkpoints(entry: FineTuningEntry, record: JobRecord) -> list[FineTuningJobCheckpoint]:
    """The adapter version a succeeded job published, as its one checkpoint."""
    model = fine_tuned_model(entry, record)
    if model is None:
        return []
    metrics = record.metrics
    step = metrics.get("steps") if isinstance(metrics.get("steps"), int) else record.progress.step
    points = _curve_points(record)
    train_loss = next((v["train_loss"] for _, v in sorted(points.items(), reverse=True) if "train_loss" in v), None)
    valid = metrics.get("eval_loss_after")
    valid_loss = float(valid) if isinstance(valid, int | float) else None
    return [
        FineTuningJobCheckpoint(
            id=f"ftckpt-{record.id}-{step}",
            created_at=_ts(record.finished_at) or entry.created_at,
            fine_tuned_model_checkpoint=model,
            fine_tuning_job_id=record.id,
            metrics=CheckpointMetrics(
                step=step, train_loss=train_loss, valid_loss=valid_loss, full_valid_loss=valid_loss
            ),
            step_number=step,
        )
    ]
