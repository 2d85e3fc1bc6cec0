"""Feedback: what an app sends to `POST {base}/feedback` and what the API shows of a stored item.

One route takes three shapes (the body says which):

- a rated reply: `{"messages": [...], "reply": "...", "rating": "up" | "down"}` (KTO data);
- a correction or a choice: `{"messages": [...], "chosen": "...", "rejected": "..."}` (a pair:
  DPO data, and KTO data for each half);
- about a generation job of the avatar: `{"generation_id": "job-...", "rating": "down",
  "correction": "..."}`: the context and the reply are the generation's; a correction makes a
  pair with the generated reply as rejected, a rating alone is a rated reply.

Each item is stored as its own training document `{id}.jsonl` (`feedback_document_name`), one
preference line (`contracts.preferences`) whose `avatune_feedback` object is `FeedbackMeta`. Ids
are `feedback-{11 hex digits}-{8 hex digits}`: the first part counts milliseconds down from
2^44, so names sort newest first (S3 lists in name order) and no two app servers ever write
the same key (S3 has no append: one object per item needs no read-modify-write).
"""

from __future__ import annotations

import re
import secrets
import time
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from contracts.messages import ChatMessage

Rating = Literal["up", "down"]
FEEDBACK_PREFIX = "feedback-"
FEEDBACK_ID_RE = re.compile(r"^feedback-[0-9a-f]{11}-[0-9a-f]{8}$")
_TIME_SPAN = 16**11  # milliseconds counted down from here: until the year 2527
MAX_REPLY_CHARS = 100_000


def new_feedback_id(now_ms: int | None = None) -> str:
    """A fresh id that sorts before every earlier one (newest first in name order)."""
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    return f"{FEEDBACK_PREFIX}{_TIME_SPAN - 1 - ms:011x}-{secrets.token_hex(4)}"


def is_feedback_id(value: str) -> bool:
    return bool(FEEDBACK_ID_RE.match(value))


def feedback_document_name(feedback_id: str) -> str:
    """The training document a feedback item is stored as."""
    return f"{feedback_id}.jsonl"


class FeedbackBody(BaseModel):
    """The body of `POST {base}/feedback`: one of the three shapes of the module docstring."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] | None = Field(
        default=None, min_length=1, max_length=200, description="the conversation the reply answers"
    )
    reply: str | None = Field(default=None, max_length=MAX_REPLY_CHARS, description="the rated reply")
    rating: Rating | None = Field(default=None, description="up: a good reply; down: a bad one")
    chosen: str | None = Field(default=None, max_length=MAX_REPLY_CHARS, description="the better reply of a pair")
    rejected: str | None = Field(default=None, max_length=MAX_REPLY_CHARS, description="the worse reply of a pair")
    generation_id: str | None = Field(
        default=None, max_length=128, description="a generation job of this avatar: its context and reply are used"
    )
    correction: str | None = Field(
        default=None,
        max_length=MAX_REPLY_CHARS,
        description="with generation_id: what the reply should have been (a pair: correction over the reply)",
    )
    use_for_training: bool = Field(default=True, description="the stored document's flag")

    def shape_problem(self) -> tuple[str, str] | None:
        """(field, why) when the body is none of the three shapes, else None."""
        given = {
            name
            for name in ("messages", "reply", "rating", "chosen", "rejected", "correction")
            if getattr(self, name) is not None
        }
        if self.generation_id is not None:
            extra = sorted(given & {"messages", "reply", "chosen", "rejected"})
            if extra:
                return extra[0], "with generation_id the context and the reply are the generation's: leave it out"
            if self.rating is None and self.correction is None:
                return "rating", "feedback on a generation needs a rating, a correction or both"
            if self.rating == "up" and self.correction is not None:
                return "rating", "a correction says the reply was not right: send rating down (or none) with it"
            return None
        if self.correction is not None:
            return (
                "correction",
                "a correction is of a generation (generation_id); a pair of your own is chosen and rejected",
            )
        if self.chosen is not None or self.rejected is not None:
            for name in ("chosen", "rejected", "messages"):
                if getattr(self, name) is None:
                    return name, "a pair needs messages, chosen and rejected"
            if given & {"reply", "rating"}:
                return sorted(given & {"reply", "rating"})[0], "a pair takes no reply or rating"
            return None
        if self.reply is not None or self.rating is not None:
            for name in ("messages", "reply", "rating"):
                if getattr(self, name) is None:
                    return name, "a rated reply needs messages, reply and rating"
            return None
        return "body", (
            "send a rated reply {messages, reply, rating}, a pair {messages, chosen, rejected} or feedback "
            "on a generation {generation_id, rating and/or correction}"
        )


class FeedbackMeta(BaseModel):
    """`avatune_feedback` of a stored item: where it came from (trainers ignore it)."""

    model_config = ConfigDict(extra="ignore")

    id: str
    created_at: datetime | None = None
    rating: Rating | None = None
    generation_id: str | None = None
    adapter_version: int | None = Field(default=None, description="the adapter version the generation ran")


class FeedbackItem(BaseModel):
    """A feedback item as the API shows it."""

    id: str
    kind: Literal["pair", "rating"] = Field(description="pair: chosen over rejected; rating: one rated reply")
    messages: list[ChatMessage]
    chosen: str | None = Field(default=None, description="a pair's better reply, or a reply rated up")
    rejected: str | None = Field(default=None, description="a pair's worse reply, or a reply rated down")
    rating: Rating | None = None
    generation_id: str | None = None
    adapter_version: int | None = None
    created_at: datetime
    use_for_training: bool
    document: str = Field(description="the training document it is stored as (under .../training-data)")


class FeedbackList(BaseModel):
    items: list[FeedbackItem]
    next_cursor: str | None


class FeedbackKeyRecord(BaseModel):
    """`adapters/idempotency/feedback/{sha256 of the key}.json`: the item a feedback POST with
    an Idempotency-Key created, and the fingerprint of that request (`handlers.idempotency`)."""

    feedback_id: str
    fingerprint: str
    created_at: datetime
