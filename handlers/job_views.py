"""How the API shows a job (`JobView`) and a page of jobs (`JobList`): what every job-creating,
-listing and -cancelling route answers, whatever the job's kind.

A view is the stored `JobRecord` less what is the API's or the trainer's business (the lease,
the source, the owner), with `config` and `spec` as the caller sent them (no defaults, never
the webhook's Authorization) and `links` to the job's outputs, which the job-kind registry
(`contracts.job_kinds.links_of`) names. `metrics` and `result` are typed for the OpenAPI
document (`contracts.metrics`, `contracts.results`) and shown exactly as stored.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, Field, field_serializer

from contracts.adapter import AdapterSettings
from contracts.job_kinds import links_of
from contracts.jobs import JobProgress, JobRecord, JobStatus, JobType, TrainingDocumentRef
from contracts.metrics import TrainingMetrics
from contracts.results import AsReported, GenerationResult, IndexResult, RetrievalResult
from contracts.spec import JobSpec


class JobMetrics(TrainingMetrics, AsReported):
    """A job's metrics: a training job's are these fields (more may come); the other kinds
    report their own (fuse: `merged_prefix`, `merge_seconds`, ...; generate: `prompt_tokens`,
    `completion_tokens`, `generate_seconds`; index and retrieve: their counts and timings)."""


# The first that fits, in this order: each result has a field the others lack (`completion`,
# `passages`, `chunks`); anything else stays a plain object.
Metrics = Annotated[JobMetrics | dict[str, Any], Field(union_mode="left_to_right")]
Result = Annotated[
    GenerationResult | RetrievalResult | IndexResult | dict[str, Any] | None,
    Field(
        union_mode="left_to_right",
        description="a generate, retrieve or index job's answer once it succeeded; null for other kinds",
    ),
]


class JobView(BaseModel):
    """A job as the API shows it."""

    id: str
    type: JobType
    status: JobStatus
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    avatar_id: str
    config: AdapterSettings
    progress: JobProgress
    metrics: Metrics
    error: str | None
    adapter_version: int | None
    data: list[TrainingDocumentRef]
    spec: JobSpec
    request: dict[str, Any]
    result: Result
    cancel_requested: bool
    attempts: int
    failures: int = Field(
        default=0, description="failed attempts (an error, or a worker that vanished); MAX_JOB_ATTEMPTS fail the job"
    )
    links: dict[str, str] = Field(
        default_factory=dict,
        description="train jobs with a published version: API paths of that version's metrics.json, "
        "samples.json (base vs adapter completions) and loss.png (loss curve); a succeeded fuse or "
        "full fine-tuning job: `model`, the API path of the model it wrote",
    )

    @field_serializer("config")
    def _overrides_only(self, config: AdapterSettings) -> dict[str, Any]:
        """The job's overrides: only the fields it set."""
        return config.model_dump(exclude_none=True)

    @field_serializer("spec")
    def _spec_without_secrets(self, spec: JobSpec) -> dict[str, Any]:
        """The spec as sent, less defaults and the webhook's Authorization (never returned)."""
        return spec.model_dump(
            mode="json", exclude_defaults=True, exclude={"callbacks": {"auth_header", "auth_header_sealed"}}
        )

    @classmethod
    def of(cls, record: JobRecord) -> JobView:
        shown = record.model_dump(exclude={"lease", "user_id", "source", "schema_"})
        return cls.model_validate({**shown, "links": links_of(record)})


class JobList(BaseModel):
    items: list[JobView]
    next_cursor: str | None
