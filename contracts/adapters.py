"""JSON documents stored beside an adapter: the manifest, a version's metrics, the active-job
pointer and idempotency records."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from contracts.jobs import utcnow


class AdapterManifest(BaseModel):
    """`adapters/manifest.json`, written last: the current adapter files are complete once it names them."""

    schema_: Literal["avatune.adapter-manifest/v1"] = Field(default="avatune.adapter-manifest/v1", alias="schema")
    current_version: int = Field(ge=1)
    job_id: str | None = None
    base_model: str | None = None
    files: dict[str, str] = Field(default_factory=dict, description="file name -> sha256 hex")
    metrics: dict[str, Any] = Field(default_factory=dict)
    updated_at: datetime = Field(default_factory=utcnow)

    model_config = {"populate_by_name": True}


class VersionMetrics(BaseModel):
    """`adapters/versions/{n}/metrics.json`."""

    version: int = Field(ge=1)
    job_id: str | None = None
    base_model: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    metrics: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str] = Field(
        default_factory=dict, description="file name -> sha256 hex (copied into the manifest on promote)"
    )


class SampleCompletion(BaseModel):
    """One held-out prompt: what the base and the adapter answered (greedy) and the reference."""

    prompt: str = Field(
        description="the held-out conversation up to its first trained answer, as the model saw it "
        "(chat template applied)"
    )
    reference: str = Field(
        description="the held-out answer the job did not train on (preference jobs: the chosen reply; empty "
        "when the feedback only rejected one)"
    )
    rejected: str | None = Field(default=None, description="preference jobs: the reply the feedback rejected")
    base: str = Field(description="the base model's completion")
    previous: str | None = Field(
        default=None,
        description="preference jobs: the adapter the job started from (its reference); null when it started "
        "from the base",
    )
    adapter: str = Field(description="the new adapter's completion")
    prompt_tokens: int = Field(ge=0)


class VersionSamples(BaseModel):
    """`adapters/versions/{n}/samples.json`: the base's and the adapter's completions on a few
    held-out prompts (greedy, at most `max_new_tokens` each), so a person can read the difference."""

    schema_: Literal["avatune.samples/v1"] = Field(default="avatune.samples/v1", alias="schema")
    job_id: str | None = None
    decoding: Literal["greedy"] = "greedy"
    max_new_tokens: int = Field(ge=1)
    samples: list[SampleCompletion] = Field(default_factory=list)
    note: str | None = Field(default=None, description="why there are fewer samples than asked for, if so")
    created_at: datetime = Field(default_factory=utcnow)

    model_config = {"populate_by_name": True}


class MergedManifest(BaseModel):
    """`merged/{version}/manifest.json`, written last by a fuse job: the merged model's files
    (safetensors weights, config, tokenizer) are complete once it names them."""

    schema_: Literal["avatune.merged-manifest/v1"] = Field(default="avatune.merged-manifest/v1", alias="schema")
    adapter_version: int = Field(ge=1, description="the adapter version merged")
    job_id: str | None = None
    base_model: str | None = None
    dtype: str = Field(description="the dtype the base was loaded and merged in (16-bit, never 4-bit)")
    files: dict[str, str] = Field(
        default_factory=dict, description="file name -> sha256 hex of the merged model's files"
    )
    adapter_files: dict[str, str] = Field(
        default_factory=dict, description="adapter file name -> sha256 hex that was merged"
    )
    created_at: datetime = Field(default_factory=utcnow)

    model_config = {"populate_by_name": True}


class CurrentAdapterLock(BaseModel):
    """`adapters/current.lock`: held while the current adapter changes.

    Whoever changes the current adapter (the API's promote and delete, the trainer's publish and
    prune) creates this object with If-None-Match, copies the version's files over the current
    ones, writes `manifest.json` last, and deletes the lock (If-Match its ETag). Two changes never
    interleave, so the current files at rest are always one whole version and the manifest names
    it; a reader mid-change sees files that do not match the manifest's sha256 and reads again.
    A lock past `expires_at` belonged to a holder that died: the next one removes it and takes over.
    Each acquisition writes an `owner` of its own (`token`): a create that landed but whose answer
    was lost fails when it is sent again, and the holder then finds its own token and holds the lock.
    """

    owner: str
    expires_at: datetime

    @staticmethod
    def token(holder: str) -> str:
        """The `owner` of one acquisition by `holder` (a job id, `promote-3`, ...)."""
        return f"{holder}:{uuid.uuid4().hex}"

    @classmethod
    def verdict(cls, body: bytes, token: str) -> Literal["ours", "expired", "held"]:
        """What a would-be holder whose acquisition is `token` makes of the lock it found: its own
        (its create landed, the answer was lost), one whose holder died (expired, or unreadable
        debris), or someone else's."""
        try:
            lock = cls.model_validate_json(body)
        except ValidationError:
            return "expired"
        if lock.owner == token:
            return "ours"
        return "expired" if lock.expires_at <= utcnow() else "held"


# How long a current-adapter lock is good for (copying an adapter's files takes seconds) and how
# long a would-be holder waits for it before giving up.
CURRENT_LOCK_SECONDS = 300
CURRENT_LOCK_WAIT_SECONDS = 60


class ActiveJobPointer(BaseModel):
    """`adapters/active_job.json`: the avatar's one queued or running job."""

    job_id: str
    created_at: datetime = Field(default_factory=utcnow)


class IdempotencyRecord(BaseModel):
    """`adapters/idempotency/{sha256 of the key}.json`: the job an Idempotency-Key created."""

    job_id: str
    created_at: datetime = Field(default_factory=utcnow)
    # sha256 of the request's method, path and canonical body (handlers.idempotency); None in
    # records written before fingerprints, which then match any request.
    fingerprint: str | None = None


class FullModelManifest(BaseModel):
    """`full/{version}/manifest.json`, written last by a full fine-tuning job (`method: full`):
    the whole model's files (safetensors weights, config, tokenizer) are complete once it names them."""

    schema_: Literal["avatune.full-model-manifest/v1"] = Field(default="avatune.full-model-manifest/v1", alias="schema")
    version: int = Field(ge=1)
    job_id: str | None = None
    base_model: str | None = None
    precision: str = Field(description="the training precision; the weights are saved in its dtype")
    dtype: str
    trainable_layers: list[int] | None = Field(
        default=None, description="the decoder layers trained (null: all weights)"
    )
    files: dict[str, str] = Field(default_factory=dict, description="file name -> sha256 hex")
    metrics: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=utcnow)

    model_config = {"populate_by_name": True}


class ExportManifest(BaseModel):
    """`exports/{version}/{format}/manifest.json`, written last by an export job: the exported
    files are complete once it names them."""

    schema_: Literal["avatune.export-manifest/v1"] = Field(default="avatune.export-manifest/v1", alias="schema")
    adapter_version: int = Field(ge=1, description="the adapter version exported")
    format: str = Field(description="gguf or peft")
    job_id: str | None = None
    base_model: str | None = Field(
        default=None, description="the base the adapter was trained on (and, with include_base, converted to base.gguf)"
    )
    outtype: str | None = Field(default=None, description="gguf: f32 or f16")
    include_base: bool = False
    files: dict[str, str] = Field(default_factory=dict, description="file name -> sha256 hex")
    adapter_files: dict[str, str] = Field(
        default_factory=dict, description="the version's adapter file name -> sha256 hex that was exported"
    )
    serving: dict[str, str] = Field(
        default_factory=dict, description="each engine's verdict on the exported adapter (contracts.serving)"
    )
    created_at: datetime = Field(default_factory=utcnow)

    model_config = {"populate_by_name": True}
