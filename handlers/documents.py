"""What the two document stores (training data, context documents) share: the error for a
missing document and the answer to a presigned-upload request."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel


class DocumentNotFound(Exception):
    pass


class PresignedUpload(BaseModel):
    """A presigned PUT: send exactly `headers` (they are signed, Content-Length included, so S3
    refuses a body of another size or a changed flag) with the document as the body."""

    url: str
    headers: dict[str, str]
    expires_at: datetime


# What a client asks a presigned upload for: the document's exact size in bytes, signed into the URL.
UPLOAD_SIZE_DESCRIPTION = (
    "the document's exact size in bytes: signed into the URL as Content-Length, so S3 accepts no other "
    "(at most MAX_PRESIGNED_UPLOAD_BYTES)"
)
