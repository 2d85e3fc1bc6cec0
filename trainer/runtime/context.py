"""What a job's work gets from the runtime (`JobContext`) and gives back (`JobResult`).

A work is any callable `(JobContext) -> JobResult` (`JobWork`): the recipes in `trainer/jobs/`.
It never writes the job's final record, frees the avatar's slot or publishes events: it returns

- `Succeeded(metrics, adapter_version, result, progress)`: the runtime writes all of it in the
  final record with one conditional write, then frees the slot and publishes `job.succeeded`;
- `Stopped(reason)`: it stopped early between steps for one of `trainer.control`'s reasons
  (cancelled, preempted, lost lease, duration limit); the runtime ends or hands back the job;

or raises `JobFailure` (the job fails with that reason). Any other error is retried up to
MAX_JOB_ATTEMPTS times.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError

from contracts.conditional import RecordNotFound
from contracts.job_kinds import request_of
from contracts.jobs import JobProgress, JobRecord
from contracts.messages import QueueRequest
from trainer.artifacts import ArtifactStore
from trainer.base_model import BaseModelCache
from trainer.control import report_progress
from trainer.documents import DocumentSource
from trainer.errors import JobFailure
from trainer.job_store import JobStore, Mutation
from trainer.runtime.control import JobControl
from trainer.s3_objects import S3Objects
from trainer.settings import TrainerSettings


class LeaseLost(Exception):
    """The job is no longer this worker's: stop without writing anything."""


@dataclass
class Succeeded:
    """The work is done: what goes into the final record."""

    metrics: dict[str, Any] | BaseModel = field(default_factory=dict)
    adapter_version: int | None = None
    result: dict[str, Any] | None = None
    progress: JobProgress | None = None

    def metrics_dict(self) -> dict[str, Any]:
        """The metrics as the record stores them (a model: the fields it set, by their names)."""
        if isinstance(self.metrics, BaseModel):
            return self.metrics.model_dump(mode="json", exclude_unset=True)
        return dict(self.metrics)


@dataclass
class Stopped:
    """The work stopped early; `reason` is a `trainer.control` stop reason."""

    reason: str


JobResult = Succeeded | Stopped


@dataclass(frozen=True)
class Stores:
    """The worker's S3 stores and its cached base models: what a job may use."""

    s3: Any  # the boto3 client, for what the stores do not cover (copying prefixes, model files)
    objects: S3Objects
    jobs: JobStore
    artifacts: ArtifactStore
    documents: DocumentSource
    models: BaseModelCache


@dataclass
class JobContext:
    """One claimed job, as its work sees it."""

    job: JobRecord
    control: JobControl
    scratch: Path  # a private directory, removed when the work returns
    settings: TrainerSettings
    stores: Stores

    @property
    def user_id(self) -> str:
        return self.job.user_id

    @property
    def avatar_id(self) -> str:
        return self.job.avatar_id

    def update(self, mutate: Mutation) -> JobRecord:
        """Change this job's record (a conditional read-modify-write); keeps `job` current."""
        self.job = self.stores.jobs.update(self.job.user_id, self.job.avatar_id, self.job.id, mutate)
        return self.job

    def progress(self, step: int, total_steps: int) -> JobProgress:
        """Report `step` of `total_steps` (the heartbeat persists it); the progress reported."""
        return report_progress(self.control, step, total_steps)

    def stop_reason(self) -> str | None:
        return self.control.stop_reason()

    def confirm_lease(self) -> None:
        """Before writing anything lasting (a version, a merged model): make sure the job is still
        this worker's. Raises LeaseLost when another worker took it over, or its record is gone
        (deleted with its avatar): then nothing may be written for it."""
        worker = self.settings.worker_id

        def check(record: JobRecord) -> None:
            if record.status != "running" or record.lease is None or record.lease.owner != worker:
                raise LeaseLost(f"job {record.id} is no longer this worker's ({record.status})")
            return None

        try:
            self.stores.jobs.update(self.job.user_id, self.job.avatar_id, self.job.id, check)
        except RecordNotFound:
            raise LeaseLost(f"job {self.job.id} has no record any more") from None

    def request(self) -> QueueRequest:
        """The job's parameters (generate, index, retrieve) as its queue request; an invalid
        one fails the job naming the field."""
        try:
            return request_of(self.job)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"])) or "<root>"
            raise JobFailure(f"invalid {self.job.type} request: {where}: {first['msg']}") from None


class JobWork(Protocol):
    """A job kind's recipe (`contracts.job_kinds.JobKind.work`), built once per worker."""

    def __call__(self, ctx: JobContext) -> JobResult: ...


WorkFactory = Callable[[], JobWork]
