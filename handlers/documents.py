"""What the two document stores (training data, context documents) share: the error for a
missing document and the answer to a presigned-upload request."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel


class DocumentNotFound(Exception):
    pass


class PresignedUpload(BaseModel):
    url: str
    headers: dict[str, str]
    expires_at: datetime
