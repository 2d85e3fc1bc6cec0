"""RAG jobs over an avatar's context documents: `index` (chunk, embed, write the user's vector
index) and `retrieve` (the best chunks for a query, in the job's `result`), created by the
common steps of `queue_job`; and AUTO_INDEX, the index job a document change queues.

AUTO_INDEX=true: a successful PUT or DELETE of a context document also queues an index job,
best effort: the change is already stored, so `auto_index` never raises. Its outcome:
`queued`; `pending` when a queued index job, which will see the change, already holds the
avatar's slot; `skipped` when another job holds it or the user is at the cap; `failed`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from contracts.context_documents import MetadataValue, validate_metadata_key
from contracts.jobs import JobRecord
from contracts.messages import IndexRequest, RetrieveRequest
from handlers.avatar_ref import AvatarRef
from handlers.context_store import ContextStore
from handlers.job_store import JobStore
from handlers.problems import Problem
from handlers.services.jobs import JobIntake, JobPlan, api_request, queue_job

log = logging.getLogger("avatune.api")

AutoIndexOutcome = Literal["queued", "pending", "skipped", "failed"]


class IndexJobBody(BaseModel):
    """The optional body of `POST {base}/context/index`; omitted fields take the trainer's defaults."""

    model_config = ConfigDict(extra="forbid")

    chunk_size: int | None = Field(default=None, ge=32, le=8192, description="characters per chunk")
    chunk_overlap: int | None = Field(default=None, ge=0, le=4096, description="characters shared by neighbours")
    full: StrictBool = Field(default=False, description="re-embed every document, not only changed ones")

    @model_validator(mode="after")
    def _overlap_below_size(self) -> IndexJobBody:
        if self.chunk_size is not None and self.chunk_overlap is not None and self.chunk_overlap >= self.chunk_size:
            raise ValueError("chunk_overlap must be smaller than chunk_size")
        return self


class RetrievalBody(BaseModel):
    """`POST {base}/retrievals`: the best `top_k` chunks of the avatar's index for `query`."""

    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, max_length=10_000)
    top_k: int = Field(default=5, ge=1, le=100)
    score_threshold: float | None = Field(
        default=None, ge=-1, le=1, description="drop chunks scoring below this (cosine similarity)"
    )
    # Strict scalars: a filter `true` must not match the string "true", nor `1` the string "1".
    filters: dict[str, MetadataValue] = Field(
        default_factory=dict, max_length=16, description="metadata equality filters, all must match"
    )

    @field_validator("query")
    @classmethod
    def _not_blank(cls, query: str) -> str:
        if not query.strip():
            raise ValueError("query must not be blank")
        return query

    @field_validator("filters")
    @classmethod
    def _filter_keys(cls, filters: dict[str, bool | int | float | str]) -> dict[str, bool | int | float | str]:
        for key, value in filters.items():
            validate_metadata_key(key)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"filters.{key}: must be a finite number")
        return filters


async def queue_index_job(
    avatar: AvatarRef,
    options: IndexJobBody,
    store: ContextStore,
    intake: JobIntake,
) -> JobRecord:
    """Create and queue an index job; 409 when there is nothing to index."""

    async def prepare() -> JobPlan:
        # With no documents an index job can still matter: it drops the chunks of deleted ones.
        # Only when there are neither documents nor any index of the user is there nothing to do.
        if not await store.has_documents(avatar) and not await store.has_vector_index(avatar.user_id):
            raise Problem(
                409,
                f"avatar {avatar.avatar_id!r} has no context documents to index; PUT one to .../context/{{name}} first",
            )
        return lambda job_id: api_request(IndexRequest, avatar, job_id, **options.model_dump())

    return await queue_job(avatar, intake, prepare)


async def queue_retrieval(
    avatar: AvatarRef,
    query: RetrievalBody,
    store: ContextStore,
    intake: JobIntake,
) -> JobRecord:
    """Create and queue a retrieve job; 409 while the user has no vector index."""

    async def prepare() -> JobPlan:
        if not await store.has_vector_index(avatar.user_id):
            raise Problem(
                409,
                f"no vector index for avatar {avatar.avatar_id!r} yet; "
                "POST .../context/index and wait for the job to succeed first",
            )
        return lambda job_id: api_request(RetrieveRequest, avatar, job_id, **query.model_dump())

    return await queue_job(avatar, intake, prepare)


@dataclass(frozen=True)
class AutoIndex:
    """What AUTO_INDEX did after a document change, and the job concerned (if any)."""

    outcome: AutoIndexOutcome
    job_id: str | None


async def auto_index(avatar: AvatarRef, intake: JobIntake) -> AutoIndex | None:
    """With AUTO_INDEX on, queue an index job after a document change (None when off). Never
    raises: the change is already stored."""
    if not intake.settings.auto_index:
        return None

    async def prepare() -> JobPlan:
        return lambda job_id: api_request(IndexRequest, avatar, job_id)

    try:
        record = await queue_job(avatar, intake.without_key(), prepare)
    except Problem as problem:
        return await _not_queued(avatar, intake.jobs, problem)
    except Exception:
        log.exception("auto-index for %s/%s failed", avatar.user_id, avatar.avatar_id)
        return AutoIndex("failed", None)
    return AutoIndex("queued", record.id)


async def _not_queued(avatar: AvatarRef, jobs: JobStore, problem: Problem) -> AutoIndex:
    """Why no index job was queued: another job holds the slot or the user is at the cap
    (`skipped`; `pending` when the holder is a queued index job, which lists the documents
    when it starts, this change included), or anything else (`failed`)."""
    if problem.status not in (409, 429):
        return AutoIndex("failed", None)
    active = problem.extensions.get("active_job_id") if problem.status == 409 else None
    if not active:
        return AutoIndex("skipped", None)
    try:
        record = await jobs.get(avatar, str(active))
    except Exception:
        log.exception("reading active job %s for auto-index failed", active)
        record = None
    if record is not None and record.type == "index" and record.status == "queued":
        return AutoIndex("pending", str(active))
    return AutoIndex("skipped", str(active))
