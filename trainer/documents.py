"""Download a job's training data and turn it into conversations: the avatar's documents
flagged for training (unless the spec says `use_flagged_documents: false`), plus the job spec's
explicit `datasets` (`s3://` JSONL files inside the caller's prefix), each pinned by the ETag it
was listed (or headed) with. A dataset with `split: "eval"` is the job's held-out set: its
conversations come back apart (`eval_conversations`) and are never trained on.

Each document is demonstrations or preferences (`contracts.training_documents`); a job reads
the kind it trains on (`sft`: demonstrations, `dpo`/`kto`: preferences) and leaves the other
kind's documents out (counted in `other_kind`); a dataset the job names must be of its kind.

The tenant rule is checked here again although the API checks it too: other services send
TrainRequests straight to the queue, and a dataset outside `s3://{bucket}/users/{user_id}/`
fails the job rather than being read with the trainer's credentials.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contracts.documents import Conversation, DocumentError
from contracts.ids import InvalidIdentifier, validate_document_name
from contracts.jobs import TrainingDocumentRef
from contracts.keys import document_name_from_key, training_data_prefix
from contracts.preferences import Judgement
from contracts.s3uri import InvalidS3Uri, S3Uri, parse_s3_uri, within_user_prefix
from contracts.spec import DatasetSource
from contracts.tags import flag_from_tagset
from contracts.training_documents import DocumentKind, ParsedDocument, parse_training_document
from trainer.errors import JobFailure
from trainer.s3_objects import S3Objects, TooLarge

# The record key each explicit dataset format requires on every line.
_FORMAT_KEYS = {"chat": ("messages",), "prompt_completion": ("prompt", "completion"), "text": ("text",)}


class DatasetChanged(RuntimeError):
    """A dataset was replaced or deleted between its HEAD and GET: the job is retried."""


@dataclass
class TrainingData:
    conversations: list[Conversation]
    documents: list[TrainingDocumentRef]
    skipped: int = 0  # documents left out because they are in `skip` (warm start: unchanged)
    eval_conversations: list[Conversation] = field(default_factory=list)  # the `split: eval` datasets
    judgements: list[Judgement] = field(default_factory=list)  # the preferences of dpo/kto jobs
    other_kind: int = 0  # flagged documents of the kind the job does not train on, left out


@dataclass
class _Source:
    """One file to read: its S3 location, the name the job records, how to parse it."""

    bucket: str
    key: str
    name: str
    etag: str
    size: int | None
    format: str = "auto"
    local: str = ""
    split: str = "train"


def parse_dataset(name: str, data: bytes, fmt: str) -> ParsedDocument:
    """A dataset file, parsed. `auto` goes by the name's extension and the records (like an
    uploaded document); `chat`, `prompt_completion` and `text` read JSONL demonstrations whose
    every record has that shape."""
    if fmt == "auto":
        return parse_training_document(name, data)
    parsed = parse_training_document("dataset.jsonl", data)  # validates every line
    if parsed.kind != "demonstrations":
        raise DocumentError(f"holds preference records, not {fmt} records: use format auto")
    wanted = _FORMAT_KEYS[fmt]
    for number, line in enumerate(data.decode("utf-8").removeprefix("\ufeff").splitlines(), start=1):
        if line.strip() and not any(k in json.loads(line) for k in wanted):
            raise DocumentError(f"not a {fmt} record (needs {' and '.join(map(repr, wanted))})", line=number)
    return parsed


def dataset_location(source: DatasetSource, bucket: str, user_id: str) -> S3Uri:
    """The dataset's parsed URI, or JobFailure when it is not a file inside the caller's prefix."""
    try:
        uri = parse_s3_uri(source.uri)
    except InvalidS3Uri as exc:
        raise JobFailure(f"dataset {source.uri[:200]!r} is invalid: {exc}") from None
    if not within_user_prefix(uri, bucket, user_id):
        raise JobFailure(
            f"dataset {source.uri!r} is outside the caller's prefix s3://{bucket}/users/{user_id}/: "
            "a job reads only its own user's data"
        )
    return uri


class DocumentSource:
    def __init__(self, s3: Any, bucket: str, concurrency: int = 16, max_bytes: int = 64 * 1024 * 1024) -> None:
        self._s3 = s3
        self._bucket = bucket
        self._objects = S3Objects(s3, bucket)
        self._concurrency = concurrency
        self._max_bytes = max_bytes  # per document: the worker never reads more (MAX_DOCUMENT_BYTES)

    def _listing(self, prefix: str) -> list[dict[str, Any]]:
        return self._objects.list(prefix)

    def _flag(self, key: str) -> bool | None:
        tags = self._objects.tags(key)
        return None if tags is None else flag_from_tagset(tags)

    def _download(self, source: _Source, dest: Path) -> Path | None:
        """The object as listed (If-Match the listed ETag), streamed to `dest`; None if it changed
        or vanished. JobFailure, naming it, when it is larger than the worker accepts."""
        try:
            size = S3Objects(self._s3, source.bucket).stream_to(source.key, dest, self._max_bytes, IfMatch=source.etag)
        except TooLarge as exc:
            raise JobFailure(_too_large(source, exc.size, self._max_bytes)) from None
        return None if size is None else dest

    def _dataset(self, index: int, source: DatasetSource, user_id: str) -> _Source:
        uri = dataset_location(source, self._bucket, user_id)
        head = S3Objects(self._s3, uri.bucket).head(uri.key)
        if head is None:
            raise JobFailure(f"dataset {source.uri!r} does not exist")
        return _Source(
            uri.bucket,
            uri.key,
            str(uri),
            head["ETag"].strip('"'),
            head.get("ContentLength"),
            source.format,
            f"dataset-{index}",
            source.split,
        )

    def _flagged(self, user_id: str, avatar_id: str) -> list[_Source]:
        prefix = training_data_prefix(user_id, avatar_id)
        objects = [o for o in self._listing(prefix) if _valid_name(document_name_from_key(o["Key"], prefix))]
        with ThreadPoolExecutor(self._concurrency) as pool:
            flags = list(pool.map(lambda o: self._flag(o["Key"]), objects))
        return [
            _Source(
                self._bucket,
                o["Key"],
                o["Key"][len(prefix) :],
                o["ETag"].strip('"'),
                o["Size"],
                local="doc-" + o["Key"][len(prefix) :],
            )
            for o, flag in zip(objects, flags)
            if flag
        ]

    def fetch(
        self,
        user_id: str,
        avatar_id: str,
        scratch: Path,
        datasets: Iterable[DatasetSource] = (),
        skip: set[tuple[str, str]] | None = None,
        flagged: bool = True,
        kind: DocumentKind = "demonstrations",
    ) -> TrainingData:
        """Every document tagged `use_for_training=true` (when `flagged`) and every dataset,
        downloaded concurrently into `scratch` and parsed; a training file whose (name, etag) is
        in `skip` is left out (counted in `skipped`; an eval dataset never is), so is a document
        of the other `kind`. Raises JobFailure when there is nothing to train on, or a file is
        invalid, not the caller's or (a dataset) of the other kind."""
        sources = [self._dataset(i, d, user_id) for i, d in enumerate(datasets)]
        if flagged:
            sources = self._flagged(user_id, avatar_id) + sources
        skip = skip or set()
        chosen = [s for s in sources if s.split == "eval" or (s.name, s.etag) not in skip]
        for source in chosen:  # refused before any download: one over the cap fails the job by name
            if source.size is not None and source.size > self._max_bytes:
                raise JobFailure(_too_large(source, source.size, self._max_bytes))
        scratch.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(self._concurrency) as pool:
            files = list(pool.map(lambda s: self._download(s, scratch / s.local), chosen))
        found = TrainingData(conversations=[], documents=[], skipped=len(sources) - len(chosen))
        for source, path in zip(chosen, files):
            if path is None:
                if source.name.startswith("s3://"):  # a dataset the job names: retried (the runner's attempts)
                    raise DatasetChanged(f"dataset {source.name!r} changed or vanished while the job read it")
                continue  # a document replaced or deleted while we listed: not what the job saw
            parsed = _parsed(source, path.read_bytes())  # one at a time: one document's bytes in memory
            if parsed.kind != kind:
                if source.name.startswith("s3://"):
                    raise JobFailure(
                        f"dataset {source.name!r} holds {parsed.kind}, but this job trains on {kind} "
                        f"({_OBJECTIVES[kind]})"
                    )
                found.other_kind += 1
                continue
            target = found.eval_conversations if source.split == "eval" else found.conversations
            target.extend(parsed.conversations)
            found.judgements.extend(parsed.judgements)
            found.documents.append(TrainingDocumentRef(name=source.name, etag=source.etag, size=source.size))
        if not (found.conversations or found.judgements):
            raise JobFailure(_nothing_to_train_on(kind, found, flagged))
        return found


_OBJECTIVES: dict[DocumentKind, str] = {"demonstrations": "objective sft", "preferences": "objective dpo or kto"}


def _parsed(source: _Source, data: bytes) -> ParsedDocument:
    try:
        return parse_dataset(source.name.rsplit("/", 1)[-1], data, source.format)
    except DocumentError as exc:
        what = "dataset" if source.name.startswith("s3://") else "training document"
        raise JobFailure(f"{what} {source.name!r} is invalid: {exc}") from None


def _nothing_to_train_on(kind: DocumentKind, found: TrainingData, flagged: bool) -> str:
    """Why a job found nothing to train on, and what to do about it."""
    if found.skipped:
        return (
            f"nothing new to train on: all {found.skipped} documents are unchanged since the current "
            "adapter version (warm_start trains only on documents added or changed since)"
        )
    if not flagged:
        return "the job names no training datasets (use_flagged_documents is false)"
    if kind == "preferences":
        return (
            "no preference document is flagged use_for_training=true: post feedback (POST .../feedback) "
            "or upload a preference document (.jsonl with prompt/chosen/rejected, OpenAI preference or "
            "prompt/completion/label records) before a dpo or kto job"
        )
    other = (
        f" ({found.other_kind} flagged preference documents are for objective dpo or kto)" if found.other_kind else ""
    )
    return f"no document is flagged use_for_training=true and the job names no training datasets{other}"


def _too_large(source: _Source, size: int, limit: int) -> str:
    kind = "dataset" if source.name.startswith("s3://") else "training document"
    return f"{kind} {source.name!r} is {size} bytes or more; a worker reads at most {limit} (MAX_DOCUMENT_BYTES)"


def _valid_name(name: str | None) -> bool:
    if name is None:
        return False
    try:
        validate_document_name(name)
    except InvalidIdentifier:
        return False
    return True
