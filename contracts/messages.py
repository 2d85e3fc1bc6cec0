"""Queue message contracts: versioned, public. Other services send requests (`TrainRequest`,
`FuseRequest`, ...) straight to the train queue and consume `JobEvent`s from the events queue.
Which request creates which kind of job is `contracts.job_kinds`; JSON Schemas of every message
live in `schemas/` (regenerate with `python -m contracts.export_schemas`)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from contracts.adapter import AdapterSettings
from contracts.ids import validate_id
from contracts.jobs import JobStatus, JobType, utcnow
from contracts.spec import JobSpec

TRAIN_REQUEST_SCHEMA = "avatune.train-request/v1"
FUSE_REQUEST_SCHEMA = "avatune.fuse-request/v1"
GENERATE_REQUEST_SCHEMA = "avatune.generate-request/v1"
INDEX_REQUEST_SCHEMA = "avatune.index-request/v1"
RETRIEVE_REQUEST_SCHEMA = "avatune.retrieve-request/v1"
EXPORT_REQUEST_SCHEMA = "avatune.export-request/v1"
JOB_EVENT_SCHEMA = "avatune.job-event/v1"
ADAPTER_EVENT_SCHEMA = "avatune.adapter-event/v1"

EventType = Literal["job.started", "job.succeeded", "job.failed", "job.cancelled"]


class QueueRequest(BaseModel):
    """What every message on the train queue carries: the job, the avatar, who sent it.

    Send to the FIFO train queue with `MessageGroupId` = `message_group_id()` and
    `MessageDeduplicationId` = `job_id`: an avatar's jobs run one at a time whatever their type."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: str = Field(alias="schema")  # each request type pins its own literal
    job_id: str = Field(description="unique id chosen by the sender; retries reuse it")
    user_id: str
    avatar_id: str
    requested_at: datetime = Field(default_factory=utcnow)
    origin: Literal["api", "external"] = Field(
        default="external",
        description="'api' when the avatune API created the job record first; the trainer then "
        "drops a request whose record is gone (the API rolled the job back)",
    )

    @field_validator("job_id", "user_id", "avatar_id")
    @classmethod
    def _safe_id(cls, value: str, info: Any) -> str:
        return validate_id(value, info.field_name)

    def message_group_id(self) -> str:
        """`{user_id}/{avatar_id}`: one job per avatar at a time. SQS caps group ids at 128
        characters, so longer pairs are replaced by their SHA-256 (still one group per avatar)."""
        return message_group_id(self.user_id, self.avatar_id)

    def to_message_body(self) -> str:
        return self.model_dump_json(by_alias=True)


def message_group_id(user_id: str, avatar_id: str) -> str:
    """The train queue's `MessageGroupId` for an avatar (see `QueueRequest.message_group_id`)."""
    group = f"{user_id}/{avatar_id}"
    if len(group) <= 128:
        return group
    import hashlib

    return "sha256-" + hashlib.sha256(group.encode()).hexdigest()


class TrainRequest(QueueRequest, JobSpec):
    """Ask the trainer to train an avatar's adapter on its documents flagged for training (and
    any `datasets`), with the full job spec (`contracts.spec.JobSpec`) at the top level.

    Send to the FIFO train queue with `MessageGroupId` = `message_group_id()` and
    `MessageDeduplicationId` = `job_id`.
    """

    schema_: Literal["avatune.train-request/v1"] = Field(alias="schema")
    config: AdapterSettings = Field(default_factory=AdapterSettings, description="per-job overrides (flat form)")

    def job_spec(self) -> JobSpec:
        """The spec part of this request."""
        return JobSpec.model_validate({name: getattr(self, name) for name in JobSpec.model_fields})

    def effective_config(self) -> AdapterSettings:
        """`config` with the spec's structured sections (`tuning`, `qlora`, ...) laid over it."""
        return self.job_spec().settings_overrides().merged_over(self.config)


class FuseRequest(QueueRequest):
    """Ask the trainer to merge an adapter version into its base model (16-bit) and store the
    merged model under `users/{user_id}/avatars/{avatar_id}/merged/{version}/`.

    Sent on the same FIFO train queue as `TrainRequest`, with the same `MessageGroupId`
    (`message_group_id()`) and `MessageDeduplicationId` (`job_id`).
    """

    schema_: Literal["avatune.fuse-request/v1"] = Field(alias="schema")
    adapter_version: int | None = Field(
        default=None, ge=1, description="the adapter version to merge; null = the avatar's current version"
    )


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=100_000)


class RagOptions(BaseModel):
    """Retrieval for a generation: passages from the avatar's vector index go into the prompt."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(default=5, ge=1, le=50)
    score_threshold: float | None = Field(default=None, ge=-1, le=1)


MAX_NEW_TOKENS_LIMIT = 2048
# The text of a generation (prompt or all messages' contents), UTF-8: the request travels on
# SQS (256 KiB a message), and JSON escaping may double it.
MAX_GENERATION_TEXT_BYTES = 96 * 1024


class GenerateParams(BaseModel):
    """What a generation job does: the body of `POST {base}/generations` and the job's `request`."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(
        default=None, min_length=1, max_length=100_000, description="a single user message (give this or messages)"
    )
    messages: list[ChatMessage] | None = Field(
        default=None, min_length=1, max_length=200, description="a chat, rendered with the base model's chat template"
    )
    max_new_tokens: int = Field(
        default=128,
        ge=1,
        le=MAX_NEW_TOKENS_LIMIT,
        description="at most this many new tokens (the worker's MAX_GENERATION_TOKENS caps it too)",
    )
    adapter_version: int | None = Field(
        default=None, ge=0, description="null = the avatar's current adapter; 0 = the base model alone"
    )
    rag: RagOptions | None = Field(
        default=None, description="retrieve passages from the avatar's vector index and put them into the prompt"
    )

    @model_validator(mode="after")
    def _one_input(self) -> GenerateParams:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.messages is not None and self.messages[-1].role == "assistant":
            raise ValueError("messages must not end with an assistant message: the model writes the next one")
        size = sum(len(m["content"].encode()) for m in self.chat())
        if size > MAX_GENERATION_TEXT_BYTES:
            raise ValueError(
                f"the prompt or messages hold {size} bytes of text; at most {MAX_GENERATION_TEXT_BYTES} "
                "(generations are for trying an adapter)"
            )
        return self

    def chat(self) -> list[dict[str, str]]:
        """The conversation to complete: `messages`, or `prompt` as one user message."""
        if self.messages is not None:
            return [m.model_dump() for m in self.messages]
        assert self.prompt is not None
        return [{"role": "user", "content": self.prompt}]


class GenerateRequest(QueueRequest, GenerateParams):
    """Try an adapter on a prompt: a small generation job (greedy, bounded tokens); the
    completion lands in the job's `result`. For trying an adapter, not for serving traffic."""

    schema_: Literal["avatune.generate-request/v1"] = Field(alias="schema")


MetadataValue = str | int | float | bool


class IndexRequest(QueueRequest):
    """(Re)build the avatar's part of the user's vector index from its context documents:
    only documents whose ETag changed are embedded again; chunks of deleted ones are dropped."""

    schema_: Literal["avatune.index-request/v1"] = Field(alias="schema")
    chunk_size: int | None = Field(default=None, ge=32, le=8192, description="characters per chunk")
    chunk_overlap: int | None = Field(default=None, ge=0, le=4096, description="characters shared by neighbours")
    full: bool = Field(default=False, description="re-embed every document")


class RetrieveRequest(QueueRequest):
    """Query the avatar's vector index: the best `top_k` chunks with scores and sources."""

    schema_: Literal["avatune.retrieve-request/v1"] = Field(alias="schema")
    query: str = Field(min_length=1, max_length=10_000)
    top_k: int = Field(default=5, ge=1, le=100)
    score_threshold: float | None = Field(default=None, ge=-1, le=1)
    filters: dict[str, MetadataValue] = Field(
        default_factory=dict, max_length=16, description="metadata equality filters, applied inside the store"
    )


ExportFormat = Literal["gguf", "peft"]


class ExportParams(BaseModel):
    """What an export job does: the body of `POST {base}/exports` and the job's `request`."""

    model_config = ConfigDict(extra="forbid")

    format: ExportFormat = Field(
        description="gguf: a llama.cpp LoRA adapter (adapter.gguf); peft: the version's own files "
        "(adapter_config.json, adapter_model.safetensors), for vLLM and transformers"
    )
    adapter_version: int | None = Field(default=None, ge=1, description="null = the avatar's current version")
    include_base: bool = Field(
        default=False, description="gguf: also the base model as GGUF (base.gguf), converted with the same rules"
    )
    outtype: Literal["f32", "f16"] = Field(default="f16", description="gguf: the type of the matrices (norms stay f32)")

    @model_validator(mode="after")
    def _gguf_options(self) -> ExportParams:
        if self.format != "gguf" and self.include_base:
            raise ValueError("include_base applies to format gguf only (a peft adapter loads on the base itself)")
        return self


class ExportRequest(QueueRequest, ExportParams):
    """Write an adapter version in a serving format under
    `users/{user_id}/avatars/{avatar_id}/exports/{version}/{format}/` (`manifest.json` last)."""

    schema_: Literal["avatune.export-request/v1"] = Field(alias="schema")


def event_id(job_id: str, event: str) -> str:
    """An event's stable id: the same event published again (at-least-once) keeps it."""
    return f"{job_id}:{event}"


class JobEvent(BaseModel):
    """Published on the events queue whenever a job starts or ends. Delivery is at-least-once:
    an event may come twice, always with the same `event_id`; consumers de-duplicate on it."""

    model_config = ConfigDict(populate_by_name=True)

    schema_: Literal["avatune.job-event/v1"] = Field(default=JOB_EVENT_SCHEMA, alias="schema")
    event: EventType
    event_id: str = Field(default="", description="`{job_id}:{event}`: stable across redeliveries")
    job_id: str
    user_id: str
    avatar_id: str
    status: JobStatus
    job_type: JobType = Field(
        default="train",
        description="the job's `type`: 'train' publishes an adapter version, 'fuse' merges one, 'export' "
        "writes one in a serving format, 'generate'/'index'/'retrieve' leave their answer in the job's `result`",
    )
    adapter_version: int | None = Field(
        default=None, description="train: the version the job published; fuse: the version it merged"
    )
    metrics: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    occurred_at: datetime = Field(default_factory=utcnow)

    @model_validator(mode="after")
    def _stable_id(self) -> JobEvent:
        if not self.event_id:
            self.event_id = event_id(self.job_id, self.event)
        return self

    def to_message_body(self) -> str:
        return self.model_dump_json(by_alias=True)


class AdapterEvent(BaseModel):
    """Published on the events queue when `POST {base}/adapter/versions/{n}/promote` makes a kept
    version current (a rollback is a promote of an older version). A train job that makes its own
    version current says so with its `job.succeeded` (job_type `train`, `metrics.promoted` not
    false); together they are every "this version became current" a serving endpoint must follow
    (docs/serving.md). At-least-once like job events: consumers de-duplicate on `event_id`."""

    model_config = ConfigDict(populate_by_name=True)

    schema_: Literal["avatune.adapter-event/v1"] = Field(default=ADAPTER_EVENT_SCHEMA, alias="schema")
    event: Literal["adapter.promoted"] = "adapter.promoted"
    event_id: str = Field(default="", description="stable for one promotion (the manifest's updated_at)")
    user_id: str
    avatar_id: str
    adapter_version: int = Field(ge=1, description="the version that is current now")
    previous_version: int | None = Field(default=None, description="the version that was current before")
    base_model: str | None = None
    files: dict[str, str] = Field(default_factory=dict, description="the current adapter files' sha256")
    serving: dict[str, str] = Field(default_factory=dict, description="each engine's verdict on the version")
    occurred_at: datetime = Field(default_factory=utcnow)

    @model_validator(mode="after")
    def _stable_id(self) -> AdapterEvent:
        if not self.event_id:
            when = self.occurred_at.isoformat()
            self.event_id = f"{self.user_id}/{self.avatar_id}:{self.event}:{self.adapter_version}:{when}"
        return self

    def to_message_body(self) -> str:
        return self.model_dump_json(by_alias=True)


class InvalidMessage(ValueError):
    """A queue message that can never be processed as it is (poison); the text says why."""


def message_payload(body: object) -> dict[str, Any]:
    if not isinstance(body, str):
        raise InvalidMessage("message has no string body")
    try:
        payload = json.loads(body)
    except json.JSONDecodeError as exc:
        raise InvalidMessage(f"not JSON: {exc.msg}") from None
    if not isinstance(payload, dict):
        raise InvalidMessage("not a JSON object")
    return payload


def validated_message(payload: dict[str, Any], model: type[BaseModel], schema: str) -> Any:
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"])) or "<root>"
        raise InvalidMessage(f"invalid {schema}: {where}: {first['msg']}") from None


def parse_message(body: object, model: type[BaseModel], schema: str) -> Any:
    """Parse one SQS body as `model`, which must carry `schema`; raise InvalidMessage saying why.

    `schema` must be on the wire even where the model has a default, so a foreign message that
    happens to have the same fields is not taken for ours."""
    payload = message_payload(body)
    if payload.get("schema") != schema:
        raise InvalidMessage(f"unknown schema {payload.get('schema')!r}; expected {schema!r}")
    return validated_message(payload, model, schema)
