"""OpenAI-compatible files, `/openai/v1/files` (`client.files.*` of the `openai` SDK): the
token's user's fine-tuning files (`handlers.services.openai_files`). Part of the OpenAI
application (`handlers.openai_app`, mounted at `/openai/v1`), whose errors are OpenAI's body."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import StreamingResponse

from handlers.dependencies import FileStoreDep, FineTuningStoreDep, JobStoreDep, OpenAIUser, SettingsDep
from handlers.openai_errors import OPENAI_ERROR_RESPONSES
from handlers.openai_models import CursorPage, FileDeleted, FileObject
from handlers.problems import Problem
from handlers.services import openai_files, openai_results
from handlers.uploads import MULTIPART_OVERHEAD

router = APIRouter(prefix="/files", tags=["files"], responses=OPENAI_ERROR_RESPONSES)


def _too_large(limit: int) -> Problem:
    return Problem(413, f"the file exceeds MAX_UPLOAD_BYTES ({limit} bytes)", field="file")


@router.post("", response_model=FileObject, summary="Upload a fine-tuning file (.jsonl, purpose fine-tune)")
async def upload_file(
    user_id: OpenAIUser,
    files: FileStoreDep,
    settings: SettingsDep,
    request: Request,
    file: Annotated[UploadFile, File(description="the JSONL training file")],
    purpose: Annotated[str, Form(max_length=64, description="fine-tune")],
) -> FileObject:
    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length", "")
    if (declared.isdigit() and int(declared) > limit + MULTIPART_OVERHEAD) or (file.size or 0) > limit:
        raise _too_large(limit)
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise _too_large(limit)
    return await openai_files.upload_file(files, user_id, data, file.filename, purpose)


@router.get("", response_model=CursorPage[FileObject], summary="The user's files")
async def list_files(
    user_id: OpenAIUser,
    files: FileStoreDep,
    after: Annotated[str | None, Query(max_length=200, description="a file id: the page starts after it")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000, description="at most 100 are answered at once")] = 10_000,
    order: Annotated[Literal["asc", "desc"], Query(description="by creation time")] = "desc",
    purpose: Annotated[str | None, Query(max_length=64)] = None,
) -> CursorPage[FileObject]:
    return await openai_files.list_files(files, user_id, after=after, limit=limit, order=order, purpose=purpose)


@router.get("/{file_id}", response_model=FileObject, summary="One file (a job's results file included)")
async def retrieve_file(
    user_id: OpenAIUser, files: FileStoreDep, entries: FineTuningStoreDep, jobs: JobStoreDep, file_id: str
) -> FileObject:
    return await openai_results.retrieve(files, entries, jobs, user_id, file_id)


@router.delete("/{file_id}", response_model=FileDeleted, summary="Delete a file")
async def delete_file(user_id: OpenAIUser, files: FileStoreDep, file_id: str) -> FileDeleted:
    return await openai_results.delete(files, user_id, file_id)


@router.get(
    "/{file_id}/content",
    response_class=StreamingResponse,
    summary="A file's content",
    responses={200: {"content": {"application/jsonl": {}, "text/csv": {}}}},
)
async def file_content(
    user_id: OpenAIUser, files: FileStoreDep, entries: FineTuningStoreDep, jobs: JobStoreDep, file_id: str
) -> StreamingResponse:
    chunks, media_type, length = await openai_results.content(files, entries, jobs, user_id, file_id)
    return StreamingResponse(chunks, media_type=media_type, headers={"Content-Length": str(length)})
