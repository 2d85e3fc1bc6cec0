"""`/openai/v1/files`: the user's fine-tuning files (`handlers.file_store`).

A file is checked on upload exactly as a training document is (`contracts.documents.parse_document`,
the trainer's own parser: chat records with `weight`, prompt/completion, text), so a file that is
accepted trains, and one that would not is a 400 naming its line. Only `purpose: "fine-tune"`
and `.jsonl` files are kept (avatune has no other use for files). Another user's file, or an id
that is no file id at all, is a 404: this user has no such file.

Listing pages are at most `MAX_FILES_PAGE` files (each a HEAD for its filename); a larger `limit`
gets that many and `has_more`, which the SDK's auto-paging follows.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi.concurrency import run_in_threadpool

from contracts.documents import DocumentError, parse_document
from contracts.ids import is_valid_id
from handlers.file_store import FileStore, StoredFile, new_file_id
from handlers.openai_models import CursorPage, FileDeleted, FileObject
from handlers.problems import Problem
from handlers.s3_objects import OpenedObject

MAX_FILES_PAGE = 100
MAX_FILENAME_LENGTH = 255
FINE_TUNE = "fine-tune"


def no_such_file(file_id: str, param: str = "file_id") -> Problem:
    return Problem(404, f"No such File object: {file_id}", field=param)


def file_object(stored: StoredFile) -> FileObject:
    return FileObject(
        id=stored.file_id,
        bytes=stored.size,
        created_at=stored.created_at,
        filename=stored.filename,
        purpose=FINE_TUNE,
    )


def _checked_filename(filename: str | None) -> str:
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1].strip()
    if not name or len(name) > MAX_FILENAME_LENGTH or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise Problem(400, f"the file needs a name of 1 to {MAX_FILENAME_LENGTH} printable characters", field="file")
    if not name.lower().endswith(".jsonl"):
        message = f"Invalid file format for fine-tuning: {name!r} is not a .jsonl file"
        raise Problem(400, message, field="file", code="invalid_file")
    return name


async def upload_file(files: FileStore, user_id: str, data: bytes, filename: str | None, purpose: str) -> FileObject:
    """Check and store an uploaded file (the caller has capped its size); its FileObject."""
    if purpose != FINE_TUNE:
        raise Problem(
            400, f"purpose {purpose!r}: avatune keeps fine-tuning files only (purpose 'fine-tune')", field="purpose"
        )
    name = _checked_filename(filename)
    try:
        await run_in_threadpool(parse_document, "upload.jsonl", data)
    except DocumentError as exc:
        raise Problem(400, f"{name}: {exc}", field="file", code="invalid_file_format") from None
    for _ in range(3):  # a new id is taken only by a concurrent upload in the same millisecond
        stored = await files.create(user_id, new_file_id(), data, name, FINE_TUNE)
        if stored is not None:
            return file_object(stored)
    raise Problem(503, "could not store the file; retry", headers={"Retry-After": "1"})


async def stored_file(files: FileStore, user_id: str, file_id: str, param: str = "file_id") -> StoredFile:
    """The user's file `file_id`; 404 (naming `param`) when there is none."""
    found = await files.get(user_id, file_id) if is_valid_id(file_id) else None
    if found is None:
        raise no_such_file(file_id, param)
    return found


async def list_files(
    files: FileStore,
    user_id: str,
    *,
    after: str | None,
    limit: int,
    order: Literal["asc", "desc"],
    purpose: str | None,
) -> CursorPage[FileObject]:
    """One page of the user's files by creation time, after the file id `after`."""
    if purpose is not None and purpose != FINE_TUNE:
        return CursorPage[FileObject](data=[], has_more=False)
    ids = await files.ids(user_id)
    if order == "desc":
        ids.reverse()
    if after is not None:
        ids = [i for i in ids if (i < after if order == "desc" else i > after)]
    page, rest = ids[: min(limit, MAX_FILES_PAGE)], ids[min(limit, MAX_FILES_PAGE) :]
    found = await asyncio.gather(*(files.get(user_id, i) for i in page))
    data = [file_object(f) for f in found if f is not None]  # None: deleted since the listing
    return CursorPage[FileObject](
        data=data,
        has_more=bool(rest),
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


async def delete_file(files: FileStore, user_id: str, file_id: str) -> FileDeleted:
    if not is_valid_id(file_id) or not await files.delete(user_id, file_id):
        raise no_such_file(file_id)
    return FileDeleted(id=file_id, deleted=True)


async def open_file(files: FileStore, user_id: str, file_id: str) -> OpenedObject:
    opened = await files.open(user_id, file_id) if is_valid_id(file_id) else None
    if opened is None:
        raise no_such_file(file_id)
    return opened
