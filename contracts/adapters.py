"""JSON documents stored beside an adapter: the manifest, a version's metrics, the active-job
pointer and idempotency records."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

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
    files: dict[str, str] = Field(default_factory=dict, description="file name -> sha256 hex (copied into the manifest on promote)")


class MergedManifest(BaseModel):
    """`merged/{version}/manifest.json`, written last by a fuse job: the merged model's files
    (safetensors weights, config, tokenizer) are complete once it names them."""

    schema_: Literal["avatune.merged-manifest/v1"] = Field(default="avatune.merged-manifest/v1", alias="schema")
    adapter_version: int = Field(ge=1, description="the adapter version merged")
    job_id: str | None = None
    base_model: str | None = None
    dtype: str = Field(description="the dtype the base was loaded and merged in (16-bit, never 4-bit)")
    files: dict[str, str] = Field(default_factory=dict, description="file name -> sha256 hex of the merged model's files")
    adapter_files: dict[str, str] = Field(default_factory=dict, description="adapter file name -> sha256 hex that was merged")
    created_at: datetime = Field(default_factory=utcnow)

    model_config = {"populate_by_name": True}


class ActiveJobPointer(BaseModel):
    """`adapters/active_job.json`: the avatar's one queued or running job."""

    job_id: str
    created_at: datetime = Field(default_factory=utcnow)


class IdempotencyRecord(BaseModel):
    job_id: str
    created_at: datetime = Field(default_factory=utcnow)
