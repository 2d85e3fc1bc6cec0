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
from handlers.dependencies import AuthorizedAvatar, JobStoreDep, SettingsDep, TrainingDataStoreDep
from handlers.paging import encode_cursor, page_after
from handlers.services import feedback as feedback_service

router = APIRouter(tags=["feedback"])

BASE = "/v1/users/{user_id}/avatars/{avatar_id}/feedback"


@router.post(
    BASE,
    status_code=status.HTTP_201_CREATED,
    response_model=FeedbackItem,
    summary="Record one judgement: a rated reply, a pair (chosen, rejected) or feedback on a generation",
    responses={
        403: {"description": "the token may not act for this user"},
        404: {"description": "the avatar has no such generation"},
        409: {"description": "the generation has not succeeded (yet)"},
        413: {"description": "the item is larger than MAX_UPLOAD_BYTES"},
        422: {
            "description": "none of the three shapes, an empty reply, chosen equal to rejected, ...; `field` names it"
        },
    },
)
async def post_feedback(
    avatar: AuthorizedAvatar,
    body: FeedbackBody,
    documents: TrainingDataStoreDep,
    jobs: JobStoreDep,
    settings: SettingsDep,
    response: Response,
) -> FeedbackItem:
    item = await feedback_service.record_feedback(avatar, body, documents, jobs, settings.max_upload_bytes)
    response.headers["Location"] = f"{BASE.format(user_id=avatar.user_id, avatar_id=avatar.avatar_id)}/{item.id}"
    return item


@router.get(BASE, response_model=FeedbackList, summary="The avatar's feedback, newest first")
async def list_feedback(
    avatar: AuthorizedAvatar,
    documents: TrainingDataStoreDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=2048)] = None,
) -> FeedbackList:
    items, last = await feedback_service.list_feedback(avatar, documents, limit, page_after(cursor))
    return FeedbackList(items=items, next_cursor=encode_cursor(last) if last else None)


@router.delete(BASE + "/{feedback_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete one feedback item")
async def delete_feedback(avatar: AuthorizedAvatar, documents: TrainingDataStoreDep, feedback_id: str) -> Response:
    await feedback_service.delete_feedback(avatar, feedback_id, documents)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
