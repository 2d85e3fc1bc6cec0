"""Files as the Files API shows them, results files included: `file-results-{job_id}` is a
succeeded fine-tuning job's step metrics as CSV (`handlers.openai_views.results_csv`), made from
its record when asked for and never stored, so it is not listed and cannot be deleted (it goes
with the job); every other id is a stored file (`handlers.services.openai_files`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from handlers.file_store import FileStore
from handlers.fine_tuning_store import FineTuningStore
from handlers.job_store import JobStore
from handlers.openai_models import FileDeleted, FileObject
from handlers.openai_views import RESULTS_FILE_PREFIX, results_csv
from handlers.problems import Problem
from handlers.services import openai_files
from handlers.services.openai_fine_tuning import loaded_job

RESULTS_MEDIA_TYPE = "text/csv"


async def _results(entries: FineTuningStore, jobs: JobStore, user_id: str, file_id: str) -> tuple[FileObject, bytes]:
    job_id = file_id.removeprefix(RESULTS_FILE_PREFIX)
    try:
        _, record = await loaded_job(entries, jobs, user_id, job_id)
    except Problem:
        raise openai_files.no_such_file(file_id) from None
    if record.status != "succeeded":
        raise openai_files.no_such_file(file_id)
    data = results_csv(record)
    finished = int((record.finished_at or record.updated_at).timestamp())
    return FileObject(
        id=file_id, bytes=len(data), created_at=finished, filename="step_metrics.csv", purpose="fine-tune-results"
    ), data


async def retrieve(
    files: FileStore, entries: FineTuningStore, jobs: JobStore, user_id: str, file_id: str
) -> FileObject:
    if file_id.startswith(RESULTS_FILE_PREFIX):
        return (await _results(entries, jobs, user_id, file_id))[0]
    return openai_files.file_object(await openai_files.stored_file(files, user_id, file_id))


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def content(
    files: FileStore, entries: FineTuningStore, jobs: JobStore, user_id: str, file_id: str
) -> tuple[AsyncIterator[bytes], str, int]:
    """The file's bytes (as chunks), media type and length."""
    if file_id.startswith(RESULTS_FILE_PREFIX):
        _, data = await _results(entries, jobs, user_id, file_id)
        return _once(data), RESULTS_MEDIA_TYPE, len(data)
    resp, chunks = await openai_files.open_file(files, user_id, file_id)
    return chunks, resp.get("ContentType") or "application/octet-stream", int(resp["ContentLength"])


async def delete(files: FileStore, user_id: str, file_id: str) -> FileDeleted:
    if file_id.startswith(RESULTS_FILE_PREFIX):
        raise Problem(400, "a results file belongs to its job and goes with it", field="file_id", code="unsupported")
    return await openai_files.delete_file(files, user_id, file_id)
