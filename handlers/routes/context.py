"""Context documents and retrieval (RAG) of one avatar, under
`/v1/users/{user_id}/avatars/{avatar_id}`:

- `{base}/context[/{name}]`: the avatar's context documents (`.txt`, `.md`, `.jsonl`; see
  contracts/context_documents.py) in `vectorstore_data/`, validated like training data;
- `POST {base}/context/index`: queue an `index` job (chunk, embed, write the user's vector index);
- `POST {base}/retrievals`: queue a `retrieve` job; its chunks land in the job's `result`.

Index and retrieve jobs are jobs like any other (`queue_job`: Idempotency-Key, the avatar's one
active slot, the user's cap), shown, listed and cancelled under `{base}/training-jobs`.

AUTO_INDEX=true: a successful PUT or DELETE of a document also queues an index job, best
effort: the upload never fails for it. The `Avatune-Auto-Index` response header says what
happened (`queued`; `pending` when a queued index job, which will see the change, already holds
the avatar's slot; `skipped` when another job holds it or the user is at the cap; `failed`) and
`Avatune-Index-Job` names the job concerned.
"""

from __future__ import annotations

import logging
import math
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from contracts.context_documents import (
    DocumentError,
    MetadataValue,
    parse_context_document,
    validate_context_document_name,
    validate_metadata_key,
)
from contracts.jobs import JobRecord, JobType
from contracts.messages import (
    INDEX_REQUEST_SCHEMA,
    RETRIEVE_REQUEST_SCHEMA,
    IndexRequest,
    QueueRequest,
    RetrieveRequest,
)
from handlers.avatar_ref import AvatarRef
from handlers.context_store import ContextDocument
from handlers.dependencies import (
    AuthorizedAvatar,
    ContextStoreDep,
    IdempotencyDep,
    JobStoreDep,
    SettingsDep,
    TrainQueueDep,
)
from handlers.documents import DocumentNotFound, PresignedUpload
from handlers.job_store import JobStore
from handlers.paging import encode_cursor, page_after
from handlers.problems import Problem
from handlers.routes.jobs import JobPlan, JobView, queue_job
from handlers.settings import Settings
from handlers.train_queue import TrainQueue
from handlers.uploads import checked_name, read_capped_body

log = logging.getLogger("avatune.api")

router = APIRouter(tags=["context documents and retrieval"])

BASE = "/v1/users/{user_id}/avatars/{avatar_id}"
CONTEXT = BASE + "/context"
_UPLOADS = "context/uploads"  # named in the 413 for documents over MAX_UPLOAD_BYTES

AUTO_INDEX_HEADER = "Avatune-Auto-Index"
INDEX_JOB_HEADER = "Avatune-Index-Job"
AutoIndexOutcome = Literal["queued", "pending", "skipped", "failed"]


class ContextDocumentList(BaseModel):
    items: list[ContextDocument]
    next_cursor: str | None


class ContextUploadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


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


# -- helpers ---------------------------------------------------------------------------------


def _checked_name(name: str) -> str:
    return checked_name(name, validate_context_document_name)


def _not_found(name: str) -> Problem:
    return Problem(404, f"no context document named {name!r}")


async def _validated(name: str, data: bytes) -> None:
    try:
        await run_in_threadpool(parse_context_document, name, data)
    except DocumentError as exc:
        extra = {"line": exc.line} if exc.line is not None else {}
        raise Problem(422, f"{name}: {exc}", title="Invalid context document", **extra) from None


def _params(request: QueueRequest) -> dict[str, object]:
    """The job record's `request`: the request's own fields (as the trainer records them)."""
    return request.model_dump(mode="json", exclude=set(QueueRequest.model_fields))


def _plan_for(
    avatar: AvatarRef,
    job_type: JobType,
    build: type[IndexRequest] | type[RetrieveRequest],
    schema: str,
    **fields: object,
) -> JobPlan:
    def plan(job_id: str) -> tuple[JobRecord, QueueRequest]:
        record = JobRecord(id=job_id, type=job_type, user_id=avatar.user_id, avatar_id=avatar.avatar_id, source="api")
        request = build(
            schema_=schema,
            job_id=job_id,
            user_id=avatar.user_id,
            avatar_id=avatar.avatar_id,
            requested_at=record.created_at,
            origin="api",
            **fields,
        )
        record.request = _params(request)
        return record, request

    return plan


async def _auto_index(
    avatar: AvatarRef, jobs: JobStore, queue: TrainQueue, settings: Settings, response: Response
) -> None:
    """With AUTO_INDEX on, queue an index job after a document change; never raises (the change
    is already stored). Outcome in the response headers (module doc)."""
    if not settings.auto_index:
        return
    outcome: AutoIndexOutcome
    job_id: str | None = None

    async def prepare() -> JobPlan:
        return _plan_for(avatar, "index", IndexRequest, INDEX_REQUEST_SCHEMA)

    try:
        view = await queue_job(avatar, jobs, queue, settings, None, prepare)
        outcome, job_id = "queued", view.id
    except Problem as problem:
        active = problem.extensions.get("active_job_id") if problem.status == 409 else None
        outcome, job_id = (
            ("skipped", str(active) if active else None) if problem.status in (409, 429) else ("failed", None)
        )
        if active:
            try:
                record = await jobs.get(avatar, str(active))
            except Exception:
                log.exception("reading active job %s for auto-index failed", active)
                record = None
            if record is not None and record.type == "index" and record.status == "queued":
                outcome = "pending"  # it lists the documents when it starts: this change included
    except Exception:
        log.exception("auto-index for %s/%s failed", avatar.user_id, avatar.avatar_id)
        outcome = "failed"
    response.headers[AUTO_INDEX_HEADER] = outcome
    if job_id:
        response.headers[INDEX_JOB_HEADER] = job_id


# -- context documents -----------------------------------------------------------------------


@router.get(CONTEXT, response_model=ContextDocumentList, summary="List context documents")
async def list_context_documents(
    avatar: AuthorizedAvatar,
    store: ContextStoreDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=2048)] = None,
) -> ContextDocumentList:
    items, last = await store.list(avatar, limit, page_after(cursor))
    return ContextDocumentList(items=items, next_cursor=encode_cursor(last) if last else None)


@router.post(
    CONTEXT + "/uploads", response_model=PresignedUpload, summary="Presigned PUT URL for a large context document"
)
async def presign_context_upload(
    avatar: AuthorizedAvatar, store: ContextStoreDep, settings: SettingsDep, body: ContextUploadRequest
) -> PresignedUpload:
    name = _checked_name(body.name)
    return await store.presign_upload(avatar, name, settings.presign_expires_seconds)


@router.post(
    CONTEXT + "/index",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobView,
    summary="Queue an index job: chunk and embed the avatar's context documents",
    responses={
        409: {"description": "nothing to index, or a job of the avatar is already active"},
        429: {"description": "the user is at MAX_ACTIVE_JOBS_PER_USER"},
    },
)
async def create_index_job(
    avatar: AuthorizedAvatar,
    store: ContextStoreDep,
    jobs: JobStoreDep,
    queue: TrainQueueDep,
    settings: SettingsDep,
    idempotency: IdempotencyDep,
    body: IndexJobBody | None = None,
) -> JobView:
    params = body or IndexJobBody()

    async def prepare() -> JobPlan:
        # With no documents an index job can still matter: it drops the chunks of deleted ones.
        # Only when there are neither documents nor any index of the user is there nothing to do.
        if not await store.has_documents(avatar) and not await store.has_vector_index(avatar.user_id):
            raise Problem(
                409,
                f"avatar {avatar.avatar_id!r} has no context documents to index; PUT one to .../context/{{name}} first",
            )
        return _plan_for(avatar, "index", IndexRequest, INDEX_REQUEST_SCHEMA, **params.model_dump())

    return await queue_job(avatar, jobs, queue, settings, idempotency, prepare)


@router.put(
    CONTEXT + "/{name}",
    response_model=ContextDocument,
    summary="Create or replace a context document from the raw body",
    responses={201: {"model": ContextDocument}},
)
async def put_context_document(
    avatar: AuthorizedAvatar,
    store: ContextStoreDep,
    jobs: JobStoreDep,
    queue: TrainQueueDep,
    settings: SettingsDep,
    request: Request,
    response: Response,
    name: str,
) -> ContextDocument:
    name = _checked_name(name)
    data = await read_capped_body(request, settings.max_upload_bytes, _UPLOADS)
    await _validated(name, data)
    doc, created = await store.put(avatar, name, data)
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    await _auto_index(avatar, jobs, queue, settings, response)
    return doc


@router.get(CONTEXT + "/{name}", summary="Download a context document", response_class=StreamingResponse)
async def download_context_document(avatar: AuthorizedAvatar, store: ContextStoreDep, name: str) -> StreamingResponse:
    name = _checked_name(name)
    try:
        resp, chunks = await store.open(avatar, name)
    except DocumentNotFound:
        raise _not_found(name) from None
    headers = {"ETag": resp["ETag"], "Content-Length": str(resp["ContentLength"])}
    return StreamingResponse(chunks, media_type=resp.get("ContentType") or "application/octet-stream", headers=headers)


@router.delete(CONTEXT + "/{name}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete a context document")
async def delete_context_document(
    avatar: AuthorizedAvatar,
    store: ContextStoreDep,
    jobs: JobStoreDep,
    queue: TrainQueueDep,
    settings: SettingsDep,
    name: str,
) -> Response:
    name = _checked_name(name)
    try:
        await store.delete(avatar, name)
    except DocumentNotFound:
        raise _not_found(name) from None
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    await _auto_index(avatar, jobs, queue, settings, response)
    return response


# -- retrieval -------------------------------------------------------------------------------


@router.post(
    BASE + "/retrievals",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobView,
    summary="Queue a retrieval: the best chunks of the avatar's index for a query (in the job's result)",
    responses={
        409: {"description": "the user has no vector index yet, or a job of the avatar is already active"},
        429: {"description": "the user is at MAX_ACTIVE_JOBS_PER_USER"},
    },
)
async def create_retrieval(
    avatar: AuthorizedAvatar,
    store: ContextStoreDep,
    jobs: JobStoreDep,
    queue: TrainQueueDep,
    settings: SettingsDep,
    idempotency: IdempotencyDep,
    body: RetrievalBody,
) -> JobView:
    async def prepare() -> JobPlan:
        if not await store.has_vector_index(avatar.user_id):
            raise Problem(
                409,
                f"no vector index for avatar {avatar.avatar_id!r} yet; "
                "POST .../context/index and wait for the job to succeed first",
            )
        return _plan_for(avatar, "retrieve", RetrieveRequest, RETRIEVE_REQUEST_SCHEMA, **body.model_dump())

    return await queue_job(avatar, jobs, queue, settings, idempotency, prepare)
