"""Feedback (`{base}/feedback`): an app's judgements of the avatar's replies, stored as the
avatar's preference training documents (`contracts.feedback`), which `objective` dpo and kto
jobs train on.

- record: the body's shape (422 naming the field) -> for `generation_id`, that generation's job
  record -> a judgement, checked by the rules every preference document keeps (422 naming the
  field: an empty reply, chosen equal to rejected, ...) -> one new document `{id}.jsonl`,
  flagged as asked. Each item is its own object under a fresh id: concurrent app servers never
  read-modify-write, so none loses another's item; a failure leaves nothing behind. With an
  `Idempotency-Key` (`handlers.feedback_keys`) the key's record names the item's id before the
  item is written, and every request with the key writes that one document: a retry (or a
  concurrent duplicate) answers the same item instead of storing a second; the key used for a
  different request is a 422; a record older than IDEMPOTENCY_KEY_TTL_HOURS starts afresh.
- list: the avatar's feedback documents, newest first (their names sort so), read concurrently.
- delete: one item's document (404 when there is none).

A generation is looked up under the avatar the feedback is posted to: the path is what the caller
is authorised for, so another user's generation is never read. Posting to that user's avatar is
a 403 (the tenant rule, `handlers.auth`); posting its id to one's own avatar is a 404, as for a
generation that does not exist: a job id reveals nothing about another tenant's jobs. The
generation must have succeeded (409 while it runs) and be a `generate` job (422 otherwise). Its
context is the conversation it was asked to continue (retrieved passages are not part of it)
and its reply the completion it produced.

`preference_documents_exist` serves the 409 of a dpo/kto job on an avatar with no preference
document: it reads the first line of the flagged `.jsonl` documents, feedback items first, until
one is a judgement.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from datetime import timedelta

from contracts.documents import ChatMessage as DocumentMessage
from contracts.documents import DocumentError
from contracts.feedback import (
    FEEDBACK_PREFIX,
    FeedbackBody,
    FeedbackItem,
    FeedbackMeta,
    feedback_document_name,
    is_feedback_id,
    new_feedback_id,
)
from contracts.ids import InvalidIdentifier, validate_id
from contracts.job_kinds import request_of
from contracts.jobs import JobRecord, utcnow
from contracts.messages import ChatMessage, GenerateRequest
from contracts.preferences import (
    FEEDBACK_META_KEY,
    Judgement,
    JudgementError,
    check_judgement,
    is_preference_record,
    parse_preference_record,
)
from contracts.training_documents import parse_training_document
from handlers.avatar_ref import AvatarRef
from handlers.documents import DocumentNotFound
from handlers.feedback_keys import FeedbackKeys
from handlers.idempotency import Idempotency
from handlers.job_store import JobStore
from handlers.problems import Problem
from handlers.training_data_store import TrainingDataStore, TrainingDocument

log = logging.getLogger("avatune.api")

# Reading flagged documents' first lines for the 409 of a preference job: how many at most (a
# larger avatar is left to the trainer, which fails the job with the same advice), how many at
# once, and how much of each.
MAX_SNIFFED = 256
SNIFF_BATCH = 16
SNIFF_BYTES = 256 * 1024


# -- recording an item --------------------------------------------------------------------------


@dataclass(frozen=True)
class FeedbackIntake:
    """Where a feedback POST stores its item and its Idempotency-Key record, and its limits."""

    documents: TrainingDataStore
    jobs: JobStore
    keys: FeedbackKeys
    max_bytes: int
    key_ttl: timedelta


async def record_feedback(
    avatar: AvatarRef, body: FeedbackBody, intake: FeedbackIntake, idempotency: Idempotency | None
) -> FeedbackItem:
    """Store one feedback item as a new preference document; the item as the API shows it (the
    earlier one when `idempotency` says this request was made before)."""
    if problem := body.shape_problem():
        field, why = problem
        raise Problem(422, f"{field}: {why}", field=None if field == "body" else field)
    meta = FeedbackMeta(id=new_feedback_id(), created_at=utcnow(), rating=body.rating)
    if body.generation_id is not None:
        record = await _generation(avatar, body.generation_id, intake.jobs)
        meta.generation_id, meta.adapter_version = record.id, record.adapter_version
        judgement = _generation_judgement(body, record)
    else:
        judgement = _own_judgement(body)
    data = _document(judgement, meta, intake.max_bytes)  # every check before the key is recorded
    if idempotency:
        feedback_id, earlier = await _keyed_id(avatar, intake, idempotency, meta.id)
        if earlier is not None:
            return earlier
        if feedback_id != meta.id:
            meta.id = feedback_id
            data = _document(judgement, meta, intake.max_bytes)
    doc, _ = await intake.documents.put(avatar, feedback_document_name(meta.id), data, body.use_for_training)
    return _item(judgement, meta, doc)


def _document(judgement: Judgement, meta: FeedbackMeta, max_bytes: int) -> bytes:
    """The item's training document, checked as the trainer will read it (413, 422)."""
    line = json.dumps(judgement.to_record(meta.model_dump(mode="json", exclude_none=True)), ensure_ascii=False)
    data = (line + "\n").encode()
    if len(data) > max_bytes:
        raise Problem(
            413, f"the feedback item is {len(data)} bytes as a document; at most {max_bytes} (MAX_UPLOAD_BYTES)"
        )
    try:
        parse_training_document(feedback_document_name(meta.id), data)
    except DocumentError as exc:
        raise Problem(422, str(exc)) from None
    return data


async def _keyed_id(
    avatar: AvatarRef, intake: FeedbackIntake, idempotency: Idempotency, fresh_id: str
) -> tuple[str, FeedbackItem | None]:
    """The item id this request's Idempotency-Key stands for, and the item when it is stored.

    A new key is recorded (If-None-Match) naming `fresh_id`. A key already recorded names the
    id of its first request: whether that request is still writing, failed after its record or
    never got its answer back, this one writes (or rewrites) the same document, so there is
    never a second item. 422 for a different request under the key; a record older than the
    TTL is dropped and the key starts afresh."""
    for _ in range(2):  # a record created between our read and our create: read it once more
        found = await intake.keys.recall(avatar, idempotency.key_hash)
        if found is not None:
            earlier, etag = found
            if utcnow() - earlier.created_at > intake.key_ttl:
                await intake.keys.forget(avatar, idempotency.key_hash, etag)
            else:
                if earlier.fingerprint != idempotency.fingerprint:
                    raise Problem(
                        422,
                        f"this Idempotency-Key was already used for a different request "
                        f"(feedback {earlier.feedback_id}); send a new key for a new item",
                        feedback_id=earlier.feedback_id,
                    )
                return earlier.feedback_id, await _stored_item_named(avatar, intake.documents, earlier.feedback_id)
        if await intake.keys.remember(avatar, idempotency.key_hash, fresh_id, idempotency.fingerprint):
            return fresh_id, None
    raise Problem(409, "this Idempotency-Key's record keeps changing; retry", headers={"Retry-After": "1"})


async def _stored_item_named(avatar: AvatarRef, documents: TrainingDataStore, feedback_id: str) -> FeedbackItem | None:
    try:
        doc = await documents.describe(avatar, feedback_document_name(feedback_id))
    except DocumentNotFound:
        return None
    return await _stored_item(avatar, documents, doc)


def _messages(messages: list[ChatMessage] | list[dict[str, str]]) -> list[DocumentMessage]:
    return [
        DocumentMessage(role=m["role"], content=m["content"])
        if isinstance(m, dict)
        else DocumentMessage(role=m.role, content=m.content)
        for m in messages
    ]


def _checked(
    prompt: list[DocumentMessage], chosen: str | None, rejected: str | None, fields: dict[str, str]
) -> Judgement:
    """The judgement, or a 422 naming the body field (`fields`: judgement part -> field) it broke."""
    try:
        check_judgement(prompt, chosen, rejected)
    except JudgementError as exc:
        field = fields.get(exc.part, exc.part)
        raise Problem(422, f"{field}: {exc}", field=field) from None
    return Judgement.model_construct(prompt=prompt, chosen=chosen, rejected=rejected)


def _own_judgement(body: FeedbackBody) -> Judgement:
    """A pair, or a rated reply, sent whole."""
    assert body.messages is not None
    prompt = _messages(body.messages)
    if body.chosen is not None:
        return _checked(prompt, body.chosen, body.rejected, {"prompt": "messages"})
    up = body.rating == "up"
    fields = {"prompt": "messages", "chosen": "reply", "rejected": "reply"}
    return _checked(prompt, body.reply if up else None, None if up else body.reply, fields)


def _generation_judgement(body: FeedbackBody, record: JobRecord) -> Judgement:
    """Feedback on a generation: its context and reply; a correction makes a pair."""
    try:
        request = request_of(record)
    except ValueError:
        raise Problem(409, f"generation {record.id}'s request cannot be read: post the pair itself") from None
    assert isinstance(request, GenerateRequest)
    prompt = _messages(request.chat())
    reply = str((record.result or {}).get("completion", ""))
    if not reply.strip():
        raise Problem(
            422,
            f"generation_id: generation {record.id} produced an empty reply, so there is nothing to rate or "
            "correct; post a pair (messages, chosen, rejected) instead",
            field="generation_id",
        )
    if body.correction is not None:
        return _checked(prompt, body.correction, reply, {"chosen": "correction", "rejected": "correction"})
    up = body.rating == "up"
    return _checked(prompt, reply if up else None, None if up else reply, {})


async def _generation(avatar: AvatarRef, generation_id: str, jobs: JobStore) -> JobRecord:
    """The avatar's succeeded generation job `generation_id` (see the module docstring)."""
    try:
        validate_id(generation_id, "generation_id")
    except InvalidIdentifier as exc:
        raise Problem(422, f"generation_id: {exc}", field="generation_id") from None
    record = await jobs.get(avatar, generation_id)
    if record is None:
        raise Problem(
            404,
            f"avatar {avatar.avatar_id!r} has no generation {generation_id}: feedback names a generation of "
            "the avatar it is posted to",
        )
    if record.type != "generate":
        raise Problem(
            422, f"generation_id: {generation_id} is a {record.type} job, not a generation", field="generation_id"
        )
    if record.status != "succeeded":
        raise Problem(409, f"generation {generation_id} is {record.status}: post feedback on it once it has succeeded")
    return record


def _item(judgement: Judgement, meta: FeedbackMeta, doc: TrainingDocument) -> FeedbackItem:
    return FeedbackItem(
        id=meta.id,
        kind=judgement.kind,
        messages=[ChatMessage(role=m.role, content=m.content) for m in judgement.prompt],
        chosen=judgement.chosen,
        rejected=judgement.rejected,
        rating=meta.rating,
        generation_id=meta.generation_id,
        adapter_version=meta.adapter_version,
        created_at=meta.created_at or doc.last_modified,
        use_for_training=doc.use_for_training,
        document=doc.name,
    )


# -- listing and deleting -----------------------------------------------------------------------


async def list_feedback(
    avatar: AvatarRef, documents: TrainingDataStore, limit: int, after: str | None
) -> tuple[list[FeedbackItem], str | None]:
    """Up to `limit` feedback items after the document name `after`, newest first; and the name
    to continue after (None on the last page)."""
    docs, last = await documents.list_named(avatar, FEEDBACK_PREFIX, limit, after)
    docs = [d for d in docs if d.name.endswith(".jsonl") and is_feedback_id(d.name.removesuffix(".jsonl"))]
    items = await asyncio.gather(*(_stored_item(avatar, documents, doc) for doc in docs))
    return [item for item in items if item is not None], last


async def _stored_item(avatar: AvatarRef, documents: TrainingDataStore, doc: TrainingDocument) -> FeedbackItem | None:
    """A stored item read back; None when it was deleted meanwhile or is not one (a document put
    under such a name by hand)."""
    try:
        data = await documents.read(avatar, doc.name)
    except DocumentNotFound:
        return None
    try:
        obj = json.loads(data.decode("utf-8").strip().split("\n", 1)[0])
        judgement = parse_preference_record(obj)
        meta = FeedbackMeta.model_validate(obj.get(FEEDBACK_META_KEY) or {"id": doc.name.removesuffix(".jsonl")})
    except (ValueError, AttributeError):  # ValidationError and JSONDecodeError are ValueErrors
        log.warning("training document %s is named like a feedback item but is none", doc.name)
        return None
    return _item(judgement, meta, doc)


def checked_feedback_id(feedback_id: str) -> str:
    """A feedback id from a path (400 when it cannot be one)."""
    if not is_feedback_id(feedback_id):
        raise Problem(400, f"{feedback_id[:140]!r} is not a feedback id (feedback-<11 hex>-<8 hex>)")
    return feedback_id


async def delete_feedback(avatar: AvatarRef, feedback_id: str, documents: TrainingDataStore) -> None:
    try:
        await documents.delete(avatar, feedback_document_name(checked_feedback_id(feedback_id)))
    except DocumentNotFound:
        raise Problem(404, f"avatar {avatar.avatar_id!r} has no feedback {feedback_id}") from None


# -- the 409 of a preference job ----------------------------------------------------------------


async def preference_documents_exist(avatar: AvatarRef, documents: TrainingDataStore) -> bool | None:
    """Whether a flagged document of the avatar holds preferences: True, False, or None when
    that could not be told (too many documents to read, a first line too long to read whole)."""
    names = [doc.name async for doc in documents.iter_all(avatar, True) if doc.name.lower().endswith(".jsonl")]
    names.sort(key=lambda name: not name.startswith(FEEDBACK_PREFIX))  # a feedback item answers at once
    unknown = len(names) > MAX_SNIFFED
    for start in range(0, min(len(names), MAX_SNIFFED), SNIFF_BATCH):
        batch = names[start : start + SNIFF_BATCH]
        answers = await asyncio.gather(*(_holds_preferences(avatar, documents, name) for name in batch))
        if True in answers:
            return True
        unknown = unknown or None in answers
    return None if unknown else False


async def _holds_preferences(avatar: AvatarRef, documents: TrainingDataStore, name: str) -> bool | None:
    """Whether the document's first record is a judgement (None: could not tell)."""
    try:
        start = await documents.read(avatar, name, max_bytes=SNIFF_BYTES)
    except DocumentNotFound:
        return False
    except Exception:  # e.g. a Range on an empty object: the trainer will tell
        return None
    text = start.decode("utf-8", errors="replace").removeprefix("\ufeff")
    lines = text.split("\n")
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        if index == len(lines) - 1 and len(start) >= SNIFF_BYTES:
            return None  # the first record goes on beyond what was read
        try:
            return is_preference_record(json.loads(line))
        except json.JSONDecodeError:
            return False  # not valid JSONL: the trainer will say so
    return False
