"""Training documents of one avatar: `/v1/users/{user_id}/avatars/{avatar_id}/training-data`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Body, File, Form, Query, Request, Response, UploadFile, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from contracts.documents import DocumentError
from contracts.ids import DOCUMENT_EXTENSIONS, validate_document_name
from contracts.training_documents import parse_training_document
from handlers.archive import zip_stream
from handlers.dependencies import AuthorizedAvatar, SettingsDep, TrainingDataStoreDep
from handlers.documents import UPLOAD_SIZE_DESCRIPTION, DocumentNotFound, PresignedUpload
from handlers.openapi import (
    AUTHORIZED,
    TRAINING_DOCUMENT_EXAMPLE,
    TrainingDocumentName,
    document_download,
    document_name_schema,
    problems,
    raw_document_body,
)
from handlers.paging import encode_cursor, page_after
from handlers.problems import Problem
from handlers.training_data_store import TrainingDocument
from handlers.uploads import (
    MULTIPART_OVERHEAD,
    checked_name,
    presigned_size,
    read_capped_body,
    refuse_declared_size,
    too_large,
)

router = APIRouter(
    prefix="/v1/users/{user_id}/avatars/{avatar_id}/training-data", tags=["training data"], responses=AUTHORIZED
)

# Where a document too large for MAX_UPLOAD_BYTES goes instead (named in the 413).
_UPLOADS = "training-data/uploads"


class DocumentList(BaseModel):
    items: list[TrainingDocument]
    next_cursor: str | None


class FlagUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    use_for_training: bool


class UploadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="the document's name", json_schema_extra=document_name_schema(DOCUMENT_EXTENSIONS))
    size: int = Field(ge=1, description=UPLOAD_SIZE_DESCRIPTION)
    use_for_training: bool = True


class DeleteResult(BaseModel):
    deleted: int


def _checked_name(name: str) -> str:
    return checked_name(name, validate_document_name)


def _too_large(limit: int) -> Problem:
    return too_large(limit, _UPLOADS)


async def _validated(name: str, data: bytes) -> None:
    try:
        await run_in_threadpool(parse_training_document, name, data)
    except DocumentError as exc:
        extra = {"line": exc.line} if exc.line is not None else {}
        raise Problem(422, f"{name}: {exc}", title="Invalid training document", **extra) from None


def _not_found(name: str) -> Problem:
    return Problem(404, f"no training document named {name!r}")


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=TrainingDocument,
    summary="Upload a document (multipart)",
    responses=problems(413, 422, _422="not a valid document (`line` names a malformed line), or a bad form field"),
)
async def upload_document(
    avatar: AuthorizedAvatar,
    store: TrainingDataStoreDep,
    settings: SettingsDep,
    request: Request,
    file: Annotated[
        UploadFile, File(description="the document (.jsonl demonstrations or preferences, .json dialog or .txt)")
    ],
    use_for_training: Annotated[bool, Form()] = True,
    name: Annotated[
        str | None,
        Form(
            description="store under this name instead of the file's",
            json_schema_extra=document_name_schema(DOCUMENT_EXTENSIONS),
        ),
    ] = None,
) -> TrainingDocument:
    """Validate and store one training document: a `.jsonl` of chat, prompt/completion or text
    records, a `.json` dialog or a `.txt`, checked with the trainer's own parser (nothing is
    stored when it is refused). `use_for_training` defaults to true; an existing document of the
    same name is replaced. Larger than MAX_UPLOAD_BYTES: 413, use `POST .../training-data/uploads`."""
    refuse_declared_size(request, settings.max_upload_bytes, _UPLOADS, MULTIPART_OVERHEAD)
    doc_name = _checked_name(name or file.filename or "")
    if file.size is not None and file.size > settings.max_upload_bytes:
        raise _too_large(settings.max_upload_bytes)
    data = await file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise _too_large(settings.max_upload_bytes)
    await _validated(doc_name, data)
    doc, _ = await store.put(avatar, doc_name, data, use_for_training)
    return doc


@router.post(
    "/uploads",
    response_model=PresignedUpload,
    summary="Presigned PUT URL for a large document",
    responses=problems(422),
)
async def presign_upload(
    avatar: AuthorizedAvatar,
    store: TrainingDataStoreDep,
    settings: SettingsDep,
    body: Annotated[
        UploadRequest,
        Body(openapi_examples={"big": {"summary": "a large chat export", "value": {"name": "big.jsonl"}}}),
    ],
) -> PresignedUpload:
    """A SigV4 presigned PUT straight to S3 (Lambda caps request bodies near 6 MB): send the file
    to `url` with exactly the `headers` given (`x-amz-tagging` and `Content-Type` are signed).
    Such uploads are not validated on the way in; the trainer validates every document."""
    name = _checked_name(body.name)
    size = presigned_size(body.size, settings.max_presigned_upload_bytes)
    return await store.presign_upload(avatar, name, body.use_for_training, size, settings.presign_expires_seconds)


@router.get("", response_model=DocumentList, summary="List documents", responses=problems(422))
async def list_documents(
    avatar: AuthorizedAvatar,
    store: TrainingDataStoreDep,
    use_for_training: Annotated[
        bool | None, Query(description="true: used for training; false: not used; absent: all")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=2048)] = None,
) -> DocumentList:
    """The avatar's documents by name, a page at a time (`next_cursor` until null); filtered by
    `use_for_training` when given."""
    items, last = await store.list(avatar, use_for_training, limit, page_after(cursor))
    return DocumentList(items=items, next_cursor=encode_cursor(last) if last else None)


@router.delete(
    "",
    response_model=DeleteResult,
    summary="Delete every document with the given flag",
    responses=problems(400, 422, _400="no `use_for_training` filter (refusing to delete every document), or a bad id"),
)
async def delete_documents(
    avatar: AuthorizedAvatar,
    store: TrainingDataStoreDep,
    use_for_training: Annotated[bool | None, Query(description="required: which documents to delete")] = None,
) -> DeleteResult:
    """Delete every document whose flag is `use_for_training` (`false`: clean up the unused ones)."""
    if use_for_training is None:
        raise Problem(400, "refusing to delete every document: pass ?use_for_training=false (or =true)")
    return DeleteResult(deleted=await store.delete_where(avatar, use_for_training))


@router.get(
    "/archive",
    summary="Download documents as one zip stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}}}}
    | problems(422),
)
async def download_archive(
    avatar: AuthorizedAvatar,
    store: TrainingDataStoreDep,
    use_for_training: Annotated[Literal["true", "false", "all"], Query(description="default true")] = "true",
) -> StreamingResponse:
    """A zip stream of the documents used for training (`false`: the unused ones, `all`: all)."""
    flag = None if use_for_training == "all" else use_for_training == "true"

    async def names() -> AsyncIterator[str]:
        async for doc in store.iter_all(avatar, flag):
            yield doc.name

    async def open_entry(name: str) -> AsyncIterator[bytes]:
        _, chunks = await store.open(avatar, name)
        return chunks

    filename = f"{avatar.avatar_id}-training-data.zip"
    return StreamingResponse(
        zip_stream(names(), open_entry),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.put(
    "/{name}",
    response_model=TrainingDocument,
    summary="Create or replace a document from the raw body",
    responses={201: {"model": TrainingDocument, "description": "created"}}
    | problems(413, 422, _422="not a valid document (`line` names a malformed line)"),
    openapi_extra=raw_document_body(".jsonl, .json dialog or .txt", TRAINING_DOCUMENT_EXAMPLE),
)
async def put_document(
    avatar: AuthorizedAvatar,
    store: TrainingDataStoreDep,
    settings: SettingsDep,
    request: Request,
    response: Response,
    name: TrainingDocumentName,
    use_for_training: Annotated[
        bool | None, Query(description="absent: keep the existing flag (true for a new document)")
    ] = None,
) -> TrainingDocument:
    """Create (201) or replace (200) the document `name` from the raw body
    (`curl --data-binary @file`), validated as an upload is. Its `use_for_training` flag is kept
    unless the query gives one (a new document: true)."""
    name = _checked_name(name)
    data = await read_capped_body(request, settings.max_upload_bytes, _UPLOADS)
    await _validated(name, data)
    doc, created = await store.put(avatar, name, data, use_for_training)
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return doc


@router.get(
    "/{name}",
    summary="Download a document",
    response_class=StreamingResponse,
    responses=document_download("application/jsonl", "application/json", "text/plain") | problems(404),
)
async def download_document(
    avatar: AuthorizedAvatar, store: TrainingDataStoreDep, name: TrainingDocumentName
) -> StreamingResponse:
    """The document's bytes as stored, with its ETag."""
    name = _checked_name(name)
    try:
        resp, chunks = await store.open(avatar, name)
    except DocumentNotFound:
        raise _not_found(name) from None
    headers = {"ETag": resp["ETag"], "Content-Length": str(resp["ContentLength"])}
    return StreamingResponse(chunks, media_type=resp.get("ContentType") or "application/octet-stream", headers=headers)


@router.patch("/{name}", response_model=TrainingDocument, summary="Set use_for_training", responses=problems(404, 422))
async def patch_document(
    avatar: AuthorizedAvatar,
    store: TrainingDataStoreDep,
    name: TrainingDocumentName,
    body: Annotated[
        FlagUpdate,
        Body(openapi_examples={"off": {"summary": "keep, do not train", "value": {"use_for_training": False}}}),
    ],
) -> TrainingDocument:
    """Set the document's `use_for_training` flag (the object is rewritten in place: same
    content and ETag, a new `last_modified`)."""
    name = _checked_name(name)
    try:
        return await store.set_flag(avatar, name, body.use_for_training)
    except DocumentNotFound:
        raise _not_found(name) from None


@router.delete(
    "/{name}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete one document", responses=problems(404)
)
async def delete_document(
    avatar: AuthorizedAvatar, store: TrainingDataStoreDep, name: TrainingDocumentName
) -> Response:
    """Delete the document `name`: jobs queued from now on no longer see it."""
    name = _checked_name(name)
    try:
        await store.delete(avatar, name)
    except DocumentNotFound:
        raise _not_found(name) from None
    return Response(status_code=status.HTTP_204_NO_CONTENT)
