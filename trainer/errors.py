"""Failures that end a job: retrying cannot help, so the job is marked `failed` with the reason."""


class RetryLater(Exception):
    """A passing condition (another writer holds a lock the job needs): the job is handed back
    to the queue and retried later, and the attempt does not count as a failure."""


class JobFailure(Exception):
    """The job cannot succeed (no data, bad data, out of memory, ...); `str()` is the user-facing reason."""


def is_cuda_oom(exc: BaseException) -> bool:
    """A CUDA out-of-memory error (torch's OutOfMemoryError, or its message from older builds)."""
    return type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(exc)
