"""Context documents and retrieval (RAG) of one avatar, under
`/v1/users/{user_id}/avatars/{avatar_id}`:

- `{base}/context[/{name}]`: the avatar's context documents (`.txt`, `.md`, `.jsonl`; see
  contracts/context_documents.py) in `vectorstore_data/`, validated like training data;
- `POST {base}/context/index`: queue an `index` job (chunk, embed, write the user's vector index);
- `POST {base}/retrievals`: queue a `retrieve` job; its chunks land in the job's `result`.

Index and retrieve jobs are jobs like any other (`queue_job`: Idempotency-Key, the avatar's one
active slot, the user's cap), shown, listed and cancelled under `{base}/training-jobs`; their
bodies and checks are in `handlers.services.context_jobs`.

AUTO_INDEX=true: a successful PUT or DELETE of a document also queues an index job, best
effort: the upload never fails for it. The `Avatune-Auto-Index` response header says what
happened (`queued`; `pending` when a queued index job, which will see the change, already holds
the avatar's slot; `skipped` when another job holds it or the user is at the cap; `failed`) and
`Avatune-Index-Job` names the job concerned.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from contracts.context_documents import (
    CONTEXT_DOCUMENT_EXTENSIONS,
    DocumentError,
    parse_context_document,
    validate_context_document_name,
)
from handlers.avatar_ref import AvatarRef
from handlers.context_store import ContextDocument
from handlers.dependencies import (
    AuthorizedAvatar,
    ContextStoreDep,
    JobIntakeDep,
    JobStoreDep,
    SettingsDep,
    TrainQueueDep,
)
from handlers.documents import UPLOAD_SIZE_DESCRIPTION, DocumentNotFound, PresignedUpload
from handlers.job_store import JobStore
from handlers.job_views import JobView
from handlers.openapi import (
    AUTHORIZED,
    CONTEXT_DOCUMENT_EXAMPLE,
    JOB_CREATED,
    RETRIEVAL_EXAMPLES,
    ContextDocumentName,
    document_download,
    document_name_schema,
    problems,
    raw_document_body,
)
from handlers.paging import encode_cursor, page_after
from handlers.problems import Problem
from handlers.services.context_jobs import IndexJobBody, RetrievalBody, auto_index, queue_index_job, queue_retrieval
from handlers.services.jobs import JobIntake
from handlers.settings import Settings
from handlers.train_queue import TrainQueue
from handlers.uploads import checked_name, presigned_size, read_capped_body

router = APIRouter(tags=["context documents and retrieval"], responses=AUTHORIZED)

BASE = "/v1/users/{user_id}/avatars/{avatar_id}"
CONTEXT = BASE + "/context"
_UPLOADS = "context/uploads"  # named in the 413 for documents over MAX_UPLOAD_BYTES

AUTO_INDEX_HEADER = "Avatune-Auto-Index"
INDEX_JOB_HEADER = "Avatune-Index-Job"


class ContextDocumentList(BaseModel):
    items: list[ContextDocument]
    next_cursor: str | None


class ContextUploadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(
        description="the document's name", json_schema_extra=document_name_schema(CONTEXT_DOCUMENT_EXTENSIONS)
    )
    size: int = Field(ge=1, description=UPLOAD_SIZE_DESCRIPTION)


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


async def _auto_index(
    avatar: AvatarRef, jobs: JobStore, queue: TrainQueue, settings: Settings, response: Response
) -> None:
    """AUTO_INDEX after a document change (`context_jobs.auto_index`); its outcome in the
    response headers (module doc). The upload's own request is no job request: no
    Idempotency-Key is read (the body is streamed under its cap, never read whole for a key)."""
    done = await auto_index(avatar, JobIntake(jobs, queue, settings))
    if done is None:
        return
    response.headers[AUTO_INDEX_HEADER] = done.outcome
    if done.job_id:
        response.headers[INDEX_JOB_HEADER] = done.job_id


# -- context documents -----------------------------------------------------------------------


@router.get(CONTEXT, response_model=ContextDocumentList, summary="List context documents", responses=problems(422))
async def list_context_documents(
    avatar: AuthorizedAvatar,
    store: ContextStoreDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=2048)] = None,
) -> ContextDocumentList:
    """The avatar's context documents by name, a page at a time (`next_cursor` until null)."""
    items, last = await store.list(avatar, limit, page_after(cursor))
    return ContextDocumentList(items=items, next_cursor=encode_cursor(last) if last else None)


@router.post(
    CONTEXT + "/uploads",
    response_model=PresignedUpload,
    summary="Presigned PUT URL for a large context document",
    responses=problems(422),
)
async def presign_context_upload(
    avatar: AuthorizedAvatar, store: ContextStoreDep, settings: SettingsDep, body: ContextUploadRequest
) -> PresignedUpload:
    """A SigV4 presigned PUT straight to S3, for documents over MAX_UPLOAD_BYTES; not validated
    on the way in (an index job validates every document). Then `POST .../context/index`."""
    name = _checked_name(body.name)
    size = presigned_size(body.size, settings.max_presigned_upload_bytes)
    return await store.presign_upload(avatar, name, size, settings.presign_expires_seconds)


@router.post(
    CONTEXT + "/index",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobView,
    summary="Queue an index job: chunk and embed the avatar's context documents",
    responses=problems(*JOB_CREATED, _409="nothing to index, or a job of the avatar is already active"),
)
async def create_index_job(
    avatar: AuthorizedAvatar,
    store: ContextStoreDep,
    intake: JobIntakeDep,
    body: Annotated[
        IndexJobBody | None,
        Body(
            openapi_examples={
                "incremental": {"summary": "new and changed documents only", "value": {}},
                "full": {"summary": "every document again", "value": {"full": True}},
            }
        ),
    ] = None,
) -> JobView:
    """Chunk and embed the avatar's context documents into the user's vector index on S3
    (incremental: only new and changed documents are embedded, deleted ones dropped). Answers
    202 with the job; its `result` holds the counts once it succeeded."""
    record = await queue_index_job(avatar, body or IndexJobBody(), store, intake)
    return JobView.of(record)


@router.put(
    CONTEXT + "/{name}",
    response_model=ContextDocument,
    summary="Create or replace a context document from the raw body",
    responses={201: {"model": ContextDocument, "description": "created"}}
    | problems(413, 422, _422="not a valid context document (`line` names a malformed line)"),
    openapi_extra=raw_document_body(".txt, .md or .jsonl of {text, metadata}", CONTEXT_DOCUMENT_EXAMPLE),
)
async def put_context_document(
    avatar: AuthorizedAvatar,
    store: ContextStoreDep,
    jobs: JobStoreDep,
    queue: TrainQueueDep,
    settings: SettingsDep,
    request: Request,
    response: Response,
    name: ContextDocumentName,
) -> ContextDocument:
    """Create (201) or replace (200) the context document `name` from the raw body
    (`curl --data-binary @file`), validated as an index job will read it. With AUTO_INDEX the
    `Avatune-Auto-Index` header says whether an index job was queued."""
    name = _checked_name(name)
    data = await read_capped_body(request, settings.max_upload_bytes, _UPLOADS)
    await _validated(name, data)
    doc, created = await store.put(avatar, name, data)
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    await _auto_index(avatar, jobs, queue, settings, response)
    return doc


@router.get(
    CONTEXT + "/{name}",
    summary="Download a context document",
    response_class=StreamingResponse,
    responses=document_download("application/jsonl", "text/markdown", "text/plain") | problems(404),
)
async def download_context_document(
    avatar: AuthorizedAvatar, store: ContextStoreDep, name: ContextDocumentName
) -> StreamingResponse:
    """The document's bytes as stored, with its ETag."""
    name = _checked_name(name)
    try:
        resp, chunks = await store.open(avatar, name)
    except DocumentNotFound:
        raise _not_found(name) from None
    headers = {"ETag": resp["ETag"], "Content-Length": str(resp["ContentLength"])}
    return StreamingResponse(chunks, media_type=resp.get("ContentType") or "application/octet-stream", headers=headers)


@router.delete(
    CONTEXT + "/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a context document",
    responses=problems(404),
)
async def delete_context_document(
    avatar: AuthorizedAvatar,
    store: ContextStoreDep,
    jobs: JobStoreDep,
    queue: TrainQueueDep,
    settings: SettingsDep,
    name: ContextDocumentName,
) -> Response:
    """Delete the document; the next index job drops its chunks (at once with AUTO_INDEX)."""
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
    responses=problems(*JOB_CREATED, _409="the user has no vector index yet, or a job of the avatar is already active"),
)
async def create_retrieval(
    avatar: AuthorizedAvatar,
    store: ContextStoreDep,
    intake: JobIntakeDep,
    body: Annotated[RetrievalBody, Body(openapi_examples=RETRIEVAL_EXAMPLES)],
) -> JobView:
    """The avatar's chunks closest to `query` (at most `top_k`, each at least `score_threshold`,
    whose metadata equals every `filters` item), found by a retrieve job: answers 202 with the
    job; its `result.passages` holds them, best first, once it succeeded."""
    record = await queue_retrieval(avatar, body, store, intake)
    return JobView.of(record)
