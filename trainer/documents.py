"""Download an avatar's documents flagged for training and turn them into conversations."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts.documents import Conversation, DocumentError, parse_document
from contracts.ids import InvalidIdentifier, validate_document_name
from contracts.jobs import TrainingDocumentRef
from contracts.keys import document_name_from_key, training_data_prefix
from contracts.tags import flag_from_tagset
from trainer.aws import is_not_found, is_precondition_failed
from trainer.errors import JobFailure


@dataclass
class TrainingData:
    conversations: list[Conversation]
    documents: list[TrainingDocumentRef]


class DocumentSource:
    def __init__(self, s3: Any, bucket: str, concurrency: int = 16) -> None:
        self._s3 = s3
        self._bucket = bucket
        self._concurrency = concurrency

    def _listing(self, prefix: str) -> list[dict[str, Any]]:
        objects: list[dict[str, Any]] = []
        for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=self._bucket, Prefix=prefix):
            objects.extend(page.get("Contents", []))
        return objects

    def _flag(self, key: str) -> bool | None:
        try:
            return flag_from_tagset(self._s3.get_object_tagging(Bucket=self._bucket, Key=key).get("TagSet", []))
        except Exception as exc:
            if is_not_found(exc):
                return None
            raise

    def _download(self, key: str, etag: str, dest: Path) -> bytes | None:
        """The object's bytes as listed (If-Match the listed ETag); None if it changed or vanished."""
        try:
            resp = self._s3.get_object(Bucket=self._bucket, Key=key, IfMatch=etag)
        except Exception as exc:
            if is_not_found(exc) or is_precondition_failed(exc):
                return None
            raise
        data = resp["Body"].read()
        dest.write_bytes(data)
        return data

    def fetch(self, user_id: str, avatar_id: str, scratch: Path) -> TrainingData:
        """Every document tagged `use_for_training=true`, downloaded concurrently into `scratch`
        and parsed. Raises JobFailure when there is nothing to train on or a document is invalid."""
        prefix = training_data_prefix(user_id, avatar_id)
        objects = [o for o in self._listing(prefix) if _valid_name(document_name_from_key(o["Key"], prefix))]
        scratch.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(self._concurrency) as pool:
            flags = list(pool.map(lambda o: self._flag(o["Key"]), objects))
            chosen = [o for o, flag in zip(objects, flags) if flag]
            payloads = list(pool.map(
                lambda o: self._download(o["Key"], o["ETag"], scratch / o["Key"][len(prefix):]), chosen
            ))
        conversations: list[Conversation] = []
        refs: list[TrainingDocumentRef] = []
        for obj, data in zip(chosen, payloads):
            name = obj["Key"][len(prefix):]
            if data is None:  # replaced or deleted while we listed: not what the job saw
                continue
            try:
                conversations.extend(parse_document(name, data))
            except DocumentError as exc:
                raise JobFailure(f"training document {name!r} is invalid: {exc}") from None
            refs.append(TrainingDocumentRef(name=name, etag=obj["ETag"].strip('"'), size=obj["Size"]))
        if not refs:
            raise JobFailure("no document is flagged use_for_training=true")
        return TrainingData(conversations=conversations, documents=refs)


def _valid_name(name: str | None) -> bool:
    if name is None:
        return False
    try:
        validate_document_name(name)
    except InvalidIdentifier:
        return False
    return True
