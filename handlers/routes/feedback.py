"""Feedback on the avatar's replies: `/v1/users/{user_id}/avatars/{avatar_id}/feedback`.

Thumbs up or down, corrections and choices, stored as the avatar's preference training documents
(listed, flagged, archived and deleted under `.../training-data` like any other) that `objective`
dpo and kto training jobs learn from. The shapes, ids and storage: `contracts.feedback`; the
logic: `handlers.services.feedback`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from contracts.feedback import FeedbackBody, FeedbackItem, FeedbackList
from handlers.dependencies import AuthorizedAvatar, FeedbackIntakeDep, IdempotencyDep, TrainingDataStoreDep
from handlers.openapi import AUTHORIZED, problems
from handlers.paging import encode_cursor, page_after
from handlers.services import feedback as feedback_service

router = APIRouter(tags=["feedback"], responses=AUTHORIZED)

BASE = "/v1/users/{user_id}/avatars/{avatar_id}/feedback"


@router.post(
    BASE,
    status_code=status.HTTP_201_CREATED,
    response_model=FeedbackItem,
    summary="Record one judgement: a rated reply, a pair (chosen, rejected) or feedback on a generation",
    responses=problems(
        404,
        409,
        413,
        422,
        _404="the avatar has no such generation",
        _409="the generation has not succeeded (yet), or a request with the same Idempotency-Key is in progress",
        _413="the item is larger than MAX_UPLOAD_BYTES",
        _422="none of the three shapes, an empty reply, chosen equal to rejected, ...; `field` names it; "
        "or an Idempotency-Key used for a different item",
    ),
)
async def post_feedback(
    avatar: AuthorizedAvatar,
    body: FeedbackBody,
    intake: FeedbackIntakeDep,
    idempotency: IdempotencyDep,
    response: Response,
) -> FeedbackItem:
    """One judgement of a reply, in one of three shapes (the body says which): a rated reply
    (`messages`, `reply`, `rating` up or down), a pair (`messages`, `chosen`, `rejected`) or
    feedback on a generation job (`generation_id`, `rating` and/or `correction`: the job's own
    prompt and completion are used). Stored as one preference document of its own in
    `training_data/` (flagged for training), which dpo and kto jobs learn from. A retry with the
    same `Idempotency-Key` answers the item the first request stored and stores nothing."""
    item = await feedback_service.record_feedback(avatar, body, intake, idempotency)
    response.headers["Location"] = f"{BASE.format(user_id=avatar.user_id, avatar_id=avatar.avatar_id)}/{item.id}"
    return item


@router.get(BASE, response_model=FeedbackList, summary="The avatar's feedback, newest first")
async def list_feedback(
    avatar: AuthorizedAvatar,
    documents: TrainingDataStoreDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=2048)] = None,
) -> FeedbackList:
    """The avatar's feedback items, newest first, `limit` a page; pass `next_cursor` back as
    `cursor` for the next page."""
    items, last = await feedback_service.list_feedback(avatar, documents, limit, page_after(cursor))
    return FeedbackList(items=items, next_cursor=encode_cursor(last) if last else None)


@router.delete(
    BASE + "/{feedback_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete one feedback item",
    responses=problems(404, _404="the avatar has no such feedback item"),
)
async def delete_feedback(avatar: AuthorizedAvatar, documents: TrainingDataStoreDep, feedback_id: str) -> Response:
    """Delete one feedback item (its preference document); later preference jobs no longer see it."""
    await feedback_service.delete_feedback(avatar, feedback_id, documents)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
