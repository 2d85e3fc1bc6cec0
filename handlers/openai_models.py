"""The OpenAI-compatible surface's shapes (`/openai/v1`): what the official `openai` SDK sends
and reads for `files` and `fine_tuning.jobs`, field for field, and what the API stores of a
fine-tuning request (`FineTuningEntry`).

The wire objects mirror the SDK's types (`openai.types.FileObject`,
`openai.types.fine_tuning.FineTuningJob`, `...FineTuningJobEvent`,
`...jobs.FineTuningJobCheckpoint`, cursor pages with `has_more`); the request body is strict
(`extra="forbid"`), so a parameter avatune does not know is a 400 naming it rather than being
silently dropped. Plain pydantic: nothing here imports the `openai` package.
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

Auto = Literal["auto"]
FilePurpose = Literal["fine-tune", "fine-tune-results"]
FineTuningStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]

T = TypeVar("T")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- errors ----------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """Every error on `/openai/v1`: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorDetail


# -- pages -----------------------------------------------------------------------------------


class CursorPage(BaseModel, Generic[T]):
    """A list page; the next one starts `after` the last item's id while `has_more`."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


# -- files -----------------------------------------------------------------------------------


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: FilePurpose
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


# -- fine-tuning jobs: the request -----------------------------------------------------------


# avatune's own bounds (contracts.adapter.AdapterSettings); a multiplier keeps the rate <= 1.
Epochs = Annotated[int, Field(ge=1, le=100)]
BatchSize = Annotated[int, Field(ge=1, le=512)]
Multiplier = Annotated[float, Field(gt=0, le=1000)]


class Hyperparameters(_Request):
    n_epochs: Auto | Epochs | None = Field(default=None, description="avatune: tuning.num_epochs")
    batch_size: Auto | BatchSize | None = Field(default=None, description="avatune: tuning.batch_size")
    learning_rate_multiplier: Auto | Multiplier | None = Field(
        default=None, description="times avatune's documented default learning rate (2e-4): tuning.learning_rate"
    )


class DpoHyperparameters(Hyperparameters):
    beta: Auto | float | None = None


class SupervisedMethod(_Request):
    hyperparameters: Hyperparameters | None = None


class DpoMethod(_Request):
    hyperparameters: DpoHyperparameters | None = None


class Method(_Request):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: dict[str, Any] | None = None


class WandbSettings(_Request):
    project: str = Field(min_length=1, max_length=128)
    entity: str | None = Field(default=None, max_length=128)
    name: str | None = Field(default=None, max_length=128)
    tags: list[str] | None = Field(default=None, max_length=50)


class Integration(_Request):
    type: str = Field(max_length=64)
    wandb: WandbSettings | None = None


class FineTuningJobCreate(_Request):
    """`POST /openai/v1/fine_tuning/jobs` (`client.fine_tuning.jobs.create(...)`)."""

    model: str = Field(min_length=1, max_length=300)
    training_file: str = Field(min_length=1, max_length=200)
    validation_file: str | None = Field(default=None, min_length=1, max_length=200)
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = Field(default=None, min_length=1, max_length=64)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    integrations: list[Integration] | None = Field(default=None, max_length=5)


# -- fine-tuning jobs: what the API keeps and shows ------------------------------------------


class FineTuningEntry(BaseModel):
    """`users/{user_id}/fine_tuning_jobs/{job_id}.json`: what a fine-tuning request asked for,
    beside the avatune job record (which holds the job's state): how to find the record (the
    avatar) and what only the OpenAI view shows (files, the model name as asked, metadata)."""

    schema_: Literal["avatune.openai-fine-tuning-job/v1"] = Field(
        default="avatune.openai-fine-tuning-job/v1", alias="schema"
    )
    job_id: str
    avatar_id: str
    model: str
    training_file: str
    validation_file: str | None = None
    method: Literal["supervised"] = "supervised"
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    suffix: str | None = None
    seed: int | None = None
    metadata: dict[str, str] | None = None
    integrations: list[Integration] | None = None
    created_at: int

    model_config = ConfigDict(populate_by_name=True)

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class ShownHyperparameters(BaseModel):
    n_epochs: Auto | int | float = "auto"
    batch_size: Auto | int = "auto"
    learning_rate_multiplier: Auto | float = "auto"


class ShownSupervised(BaseModel):
    hyperparameters: ShownHyperparameters


class ShownMethod(BaseModel):
    type: Literal["supervised"] = "supervised"
    supervised: ShownSupervised


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: ShownHyperparameters
    model: str
    organization_id: str
    result_files: list[str] = Field(default_factory=list)
    seed: int
    status: FineTuningStatus
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[Integration] | None = None
    metadata: dict[str, str] | None = None
    method: ShownMethod
    user_provided_suffix: str | None = None


class FineTuningJobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"] = "info"
    message: str
    type: Literal["message", "metrics"] = "message"
    data: dict[str, Any] | None = None


class CheckpointMetrics(BaseModel):
    step: float | None = None
    train_loss: float | None = None
    valid_loss: float | None = None
    full_valid_loss: float | None = None


class FineTuningJobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int
