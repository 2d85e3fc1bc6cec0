"""Failures that end a job: retrying cannot help, so the job is marked `failed` with the reason."""


class JobFailure(Exception):
    """The job cannot succeed (no data, bad data, out of memory, ...); `str()` is the user-facing reason."""
