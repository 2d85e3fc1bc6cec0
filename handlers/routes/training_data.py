"""Training documents of one avatar: `/v1/users/{user_id}/avatars/{avatar_id}/training-data`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict

from contracts.documents import DocumentError
from contracts.ids import validate_document_name
from contracts.training_documents import parse_training_document
from handlers.archive import zip_stream
from handlers.dependencies import AuthorizedAvatar, SettingsDep, TrainingDataStoreDep
from handlers.documents import DocumentNotFound, PresignedUpload
from handlers.paging import encode_cursor, page_after
from handlers.problems import Problem
from handlers.training_data_store import TrainingDocument
from handlers.uploads import MULTIPART_OVERHEAD, checked_name, read_capped_body, refuse_declared_size, too_large

router = APIRouter(prefix="/v1/users/{user_id}/avatars/{avatar_id}/training-data", tags=["training data"])

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
    name: str
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
    "", status_code=status.HTTP_201_CREATED, response_model=TrainingDocument, summary="Upload a document (multipart)"
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
    name: Annotated[str | None, Form(description="store under this name instead of the file's")] = None,
) -> TrainingDocument:
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


@router.post("/uploads", response_model=PresignedUpload, summary="Presigned PUT URL for a large document")
async def presign_upload(
    avatar: AuthorizedAvatar, store: TrainingDataStoreDep, settings: SettingsDep, body: UploadRequest
) -> PresignedUpload:
    name = _checked_name(body.name)
    return await store.presign_upload(avatar, name, body.use_for_training, settings.presign_expires_seconds)


@router.get("", response_model=DocumentList, summary="List documents")
async def list_documents(
    avatar: AuthorizedAvatar,
    store: TrainingDataStoreDep,
    use_for_training: Annotated[
        bool | None, Query(description="true: used for training; false: not used; absent: all")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=2048)] = None,
) -> DocumentList:
    items, last = await store.list(avatar, use_for_training, limit, page_after(cursor))
    return DocumentList(items=items, next_cursor=encode_cursor(last) if last else None)


@router.delete("", response_model=DeleteResult, summary="Delete every document with the given flag")
async def delete_documents(
    avatar: AuthorizedAvatar,
    store: TrainingDataStoreDep,
    use_for_training: Annotated[bool | None, Query()] = None,
) -> DeleteResult:
    if use_for_training is None:
        raise Problem(400, "refusing to delete every document: pass ?use_for_training=false (or =true)")
    return DeleteResult(deleted=await store.delete_where(avatar, use_for_training))


@router.get(
    "/archive",
    summary="Download documents as one zip stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/zip": {}}}},
)
async def download_archive(
    avatar: AuthorizedAvatar,
    store: TrainingDataStoreDep,
    use_for_training: Annotated[Literal["true", "false", "all"], Query(description="default true")] = "true",
) -> StreamingResponse:
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
    responses={201: {"model": TrainingDocument}},
)
async def put_document(
    avatar: AuthorizedAvatar,
    store: TrainingDataStoreDep,
    settings: SettingsDep,
    request: Request,
    response: Response,
    name: str,
    use_for_training: Annotated[
        bool | None, Query(description="absent: keep the existing flag (true for a new document)")
    ] = None,
) -> TrainingDocument:
    name = _checked_name(name)
    data = await read_capped_body(request, settings.max_upload_bytes, _UPLOADS)
    await _validated(name, data)
    doc, created = await store.put(avatar, name, data, use_for_training)
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return doc


@router.get("/{name}", summary="Download a document", response_class=StreamingResponse)
async def download_document(avatar: AuthorizedAvatar, store: TrainingDataStoreDep, name: str) -> StreamingResponse:
    name = _checked_name(name)
    try:
        resp, chunks = await store.open(avatar, name)
    except DocumentNotFound:
        raise _not_found(name) from None
    headers = {"ETag": resp["ETag"], "Content-Length": str(resp["ContentLength"])}
    return StreamingResponse(chunks, media_type=resp.get("ContentType") or "application/octet-stream", headers=headers)


@router.patch("/{name}", response_model=TrainingDocument, summary="Set use_for_training")
async def patch_document(
    avatar: AuthorizedAvatar, store: TrainingDataStoreDep, name: str, body: FlagUpdate
) -> TrainingDocument:
    name = _checked_name(name)
    try:
        return await store.set_flag(avatar, name, body.use_for_training)
    except DocumentNotFound:
        raise _not_found(name) from None


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete one document")
async def delete_document(avatar: AuthorizedAvatar, store: TrainingDataStoreDep, name: str) -> Response:
    name = _checked_name(name)
    try:
        await store.delete(avatar, name)
    except DocumentNotFound:
        raise _not_found(name) from None
    return Response(status_code=status.HTTP_204_NO_CONTENT)
