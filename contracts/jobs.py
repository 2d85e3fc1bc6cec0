"""The job record stored in S3 at `adapters/jobs/{job_id}.json`: written by the API on
creation and by the trainer as the job runs. Conditional writes (ETag) guard every update."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from contracts.adapter import AdapterSettings
from contracts.spec import JobSpec

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
# "train" publishes a new adapter version; "fuse" merges one into its base (`merged/{version}/`);
# "generate" tries an adapter on a prompt; "index" (re)builds the avatar's vector index from its
# context documents; "retrieve" queries it. The last three put their answer in `result`.
# "export" writes an adapter version in a serving format (`exports/{version}/{format}/`).
JobType = Literal["train", "fuse", "generate", "index", "retrieve", "export"]
ACTIVE_STATUSES: frozenset[str] = frozenset({"queued", "running"})
FINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_job_id() -> str:
    """A job id that sorts by creation time (newest last), so key order is time order."""
    import secrets
    import time

    return f"job-{time.time_ns() // 1_000_000:013x}-{secrets.token_hex(4)}"


class JobProgress(BaseModel):
    step: int = 0
    total_steps: int | None = None
    epoch: float = 0.0
    train_loss: float | None = None
    eta_seconds: float | None = None


class TrainingDocumentRef(BaseModel):
    """A document a job trained on, pinned by its ETag."""

    name: str
    etag: str
    size: int | None = None


class JobLease(BaseModel):
    """Which worker owns a running job, until when; the worker's heartbeat renews it."""

    owner: str
    expires_at: datetime


class Redelivery(BaseModel):
    """A queue message of a job that another worker received while the job's owner was alive:
    the owner's heartbeat adopts it (keeps it invisible, deletes it at the end) instead of
    letting it come back again and again, so it never burns receives towards the DLQ."""

    receipt_handle: str
    received_at: datetime


class JobRecord(BaseModel):
    schema_: Literal["avatune.job/v1"] = Field(default="avatune.job/v1", alias="schema")
    id: str
    type: JobType = "train"
    user_id: str
    avatar_id: str
    status: JobStatus = "queued"
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    config: AdapterSettings = Field(default_factory=AdapterSettings)
    progress: JobProgress = Field(default_factory=JobProgress)
    metrics: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    adapter_version: int | None = Field(
        default=None,
        description="train: the adapter version the job published (null until then); fuse: the version it "
        "merges, stored at users/{user_id}/avatars/{avatar_id}/merged/{adapter_version}/; export: the version "
        "it writes to exports/{adapter_version}/{format}/",
    )
    data: list[TrainingDocumentRef] = Field(default_factory=list)
    spec: JobSpec = Field(default_factory=JobSpec, description="train: the full job spec beyond `config`")
    request: dict[str, Any] = Field(
        default_factory=dict,
        description="generate/index/retrieve/export: the request's parameters (prompt, query, format, ...)",
    )
    result: dict[str, Any] | None = Field(
        default=None,
        description="generate/index/retrieve/export: the answer (completion, passages, counts, exported files)",
    )
    cancel_requested: bool = False
    attempts: int = Field(default=0, description="deliveries that started the job (hand-backs included)")
    failures: int = Field(
        default=0,
        description="attempts that ended in an error, or whose worker vanished without handing the job back; "
        "the job fails once MAX_JOB_ATTEMPTS of them add up (a graceful hand-back on SIGTERM is not one)",
    )
    lease: JobLease | None = None
    redelivery: Redelivery | None = Field(default=None, description="a message for the owner to adopt")
    resolved_config: AdapterSettings | None = Field(
        default=None,
        description="train: the configuration resolved at the first claim (worker defaults <- the avatar's "
        "config.json <- the job's own); every retry trains with exactly this",
    )
    events_published: list[str] = Field(
        default_factory=list,
        description="ids of the events published for the job; a redelivery of a final job publishes what is missing",
    )
    source: Literal["api", "queue"] = "api"

    model_config = {"populate_by_name": True}

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()
