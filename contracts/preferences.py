"""Preference records: judgements of replies, the data of DPO and KTO jobs.

A preference document is a `.jsonl` training document whose every line is a judgement in one of
these shapes (each line's keys say which):

- TRL preference: `{"prompt", "chosen", "rejected"}`, plain (strings: the prompt is the user's
  message, as in a prompt/completion document) or conversational (message lists; `chosen` and
  `rejected` one assistant message each). Without `prompt` (TRL's implicit prompt), `chosen` and
  `rejected` are whole conversations: what they share from the start is the prompt.
- OpenAI preference fine-tuning: `{"input": {"messages": [...]}, "preferred_output":
  [{"role": "assistant", ...}], "non_preferred_output": [{"role": "assistant", ...}]}`.
- KTO: `{"prompt", "completion", "label": true | false}`, plain or conversational: one rated reply.

Each becomes a `Judgement`: the conversation so far (`prompt`, which does not end with the
assistant's turn) and a `chosen` and/or a `rejected` reply. A pair (both) is what DPO trains on;
a rated reply has one of them (thumbs up: chosen, down: rejected) and is KTO data, as is each half
of a pair. Roles are system, user, assistant (OpenAI's `developer` is read as system).

avatune's feedback items are stored as one such line (`Judgement.to_record`): a pair in the TRL
conversational shape, a rating in the KTO shape, plus an `avatune_feedback` object (the item's id,
time, generation) that every reader ignores.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from contracts.documents import ChatMessage, Role

# Any of these keys makes a JSONL record a judgement rather than a demonstration.
PREFERENCE_KEYS = frozenset({"chosen", "rejected", "preferred_output", "non_preferred_output", "label"})
ROLES: tuple[Role, ...] = ("system", "user", "assistant")
_ROLE_ALIASES: dict[str, Role] = {"developer": "system"}
FEEDBACK_META_KEY = "avatune_feedback"

JudgementKind = Literal["pair", "rating"]


class Judgement(BaseModel):
    """One judgement of a reply to a conversation: a pair (chosen and rejected) or a rated reply
    (chosen alone: thumbs up; rejected alone: thumbs down)."""

    prompt: list[ChatMessage] = Field(min_length=1)
    chosen: str | None = None
    rejected: str | None = None

    @model_validator(mode="after")
    def _valid(self) -> Judgement:
        check_judgement(self.prompt, self.chosen, self.rejected)
        return self

    @property
    def kind(self) -> JudgementKind:
        return "pair" if self.chosen is not None and self.rejected is not None else "rating"

    def kto_items(self) -> list[tuple[str, bool]]:
        """(reply, desirable?) for each reply: a pair gives both halves."""
        items = [] if self.chosen is None else [(self.chosen, True)]
        return items + ([] if self.rejected is None else [(self.rejected, False)])

    def prompt_dicts(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.content} for m in self.prompt]

    def to_record(self, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """The JSONL record of this judgement: TRL conversational for a pair, KTO for a rating."""
        record: dict[str, Any] = {"prompt": self.prompt_dicts()}
        if self.kind == "pair":
            record["chosen"] = [_assistant(self.chosen)]
            record["rejected"] = [_assistant(self.rejected)]
        else:
            reply, label = self.kto_items()[0]
            record["completion"] = [_assistant(reply)]
            record["label"] = label
        if meta is not None:
            record[FEEDBACK_META_KEY] = meta
        return record


def _assistant(content: str | None) -> dict[str, str]:
    return {"role": "assistant", "content": content or ""}


class JudgementError(ValueError):
    """A judgement that breaks a rule; `part` is "prompt", "chosen" or "rejected"."""

    def __init__(self, message: str, part: str) -> None:
        super().__init__(message)
        self.part = part


def check_judgement(prompt: list[ChatMessage], chosen: str | None, rejected: str | None) -> None:
    """The rules every judgement keeps, wherever it comes from (JudgementError saying which)."""
    if not prompt or not any(m.content.strip() for m in prompt):
        raise JudgementError("prompt is empty: a judgement needs the conversation the reply answers", "prompt")
    if prompt[-1].role == "assistant":
        raise JudgementError(
            "prompt ends with an assistant message: the judged reply must answer the user's turn", "prompt"
        )
    if chosen is None and rejected is None:
        raise JudgementError("a judgement needs a chosen or a rejected reply", "chosen")
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if reply is not None and not reply.strip():
            raise JudgementError(f"{name} is an empty reply", name)
    if chosen is not None and rejected is not None and chosen.strip() == rejected.strip():
        raise JudgementError(
            "chosen and rejected are the same reply: a pair must prefer one reply over another", "rejected"
        )


def is_preference_record(obj: object) -> bool:
    """Whether a parsed JSONL line is a judgement (it has a preference key)."""
    return isinstance(obj, dict) and not PREFERENCE_KEYS.isdisjoint(obj)


def parse_preference_record(obj: object) -> Judgement:
    """One JSONL line as a Judgement; ValueError with what is wrong (the caller adds the line)."""
    if not isinstance(obj, dict):
        raise ValueError("each line must be a JSON object")
    if "preferred_output" in obj or "non_preferred_output" in obj:
        prompt, chosen, rejected = _openai(obj)
    elif "label" in obj:
        prompt, chosen, rejected = _kto(obj)
    else:
        prompt, chosen, rejected = _trl(obj)
    check_judgement(prompt, chosen, rejected)
    return Judgement.model_construct(prompt=prompt, chosen=chosen, rejected=rejected)


# -- the shapes ---------------------------------------------------------------------------------


def _trl(obj: dict[str, Any]) -> tuple[list[ChatMessage], str | None, str | None]:
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise ValueError(f'a preference pair needs "chosen" and "rejected" (missing "{key}")')
    if "prompt" not in obj:
        return _implicit_prompt(obj["chosen"], obj["rejected"])
    return _prompt(obj["prompt"], "prompt"), _reply(obj["chosen"], "chosen"), _reply(obj["rejected"], "rejected")


def _implicit_prompt(chosen: object, rejected: object) -> tuple[list[ChatMessage], str, str]:
    """TRL's implicit prompt: two conversations; their shared beginning is the prompt and what
    follows is one assistant message each."""
    if not isinstance(chosen, list) or not isinstance(rejected, list):
        raise ValueError('without "prompt", chosen and rejected must be whole conversations (message lists)')
    chosen_messages, rejected_messages = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    shared = 0
    for a, b in zip(chosen_messages, rejected_messages):
        if (a.role, a.content) != (b.role, b.content):
            break
        shared += 1
    shared = min(shared, len(chosen_messages) - 1, len(rejected_messages) - 1)
    prompt = chosen_messages[:shared]
    return prompt, _one_reply(chosen_messages[shared:], "chosen"), _one_reply(rejected_messages[shared:], "rejected")


def _openai(obj: dict[str, Any]) -> tuple[list[ChatMessage], str | None, str | None]:
    for key in ("input", "preferred_output", "non_preferred_output"):
        if key not in obj:
            raise ValueError(
                f'an OpenAI preference record needs "input", "preferred_output" and '
                f'"non_preferred_output" (missing "{key}")'
            )
    source = obj["input"]
    if not isinstance(source, dict) or "messages" not in source:
        raise ValueError('input must be an object with "messages"')
    prompt = _messages(source["messages"], "input.messages")
    return (
        prompt,
        _reply(obj["preferred_output"], "preferred_output"),
        _reply(obj["non_preferred_output"], "non_preferred_output"),
    )


def _kto(obj: dict[str, Any]) -> tuple[list[ChatMessage], str | None, str | None]:
    for key in ("prompt", "completion"):
        if key not in obj:
            raise ValueError(f'a rated reply needs "prompt", "completion" and "label" (missing "{key}")')
    label = obj["label"]
    if not isinstance(label, bool):
        raise ValueError("label must be true (a desirable reply) or false (an undesirable one)")
    reply = _reply(obj["completion"], "completion")
    prompt = _prompt(obj["prompt"], "prompt")
    return (prompt, reply, None) if label else (prompt, None, reply)


# -- the parts ----------------------------------------------------------------------------------


def _prompt(value: object, where: str) -> list[ChatMessage]:
    if isinstance(value, str):
        return [ChatMessage(role="user", content=value)]
    return _messages(value, where)


def _reply(value: object, where: str) -> str:
    """A reply: a string, or a list holding one assistant message."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a string or a list with one assistant message")
    return _one_reply(_messages(value, where), where)


def _one_reply(messages: list[ChatMessage], where: str) -> str:
    if len(messages) != 1 or messages[0].role != "assistant":
        raise ValueError(f"{where} must be exactly one assistant message (the reply)")
    return messages[0].content


def _messages(value: object, where: str) -> list[ChatMessage]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where} must be a non-empty list of messages")
    messages = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ValueError(f"{where}.{i} must be a message object with role and content")
        role = item.get("role")
        role = _ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            raise ValueError(f"{where}.{i}.role: unknown role {item.get('role')!r} (use system, user or assistant)")
        content = item.get("content")
        if not isinstance(content, str):
            raise ValueError(f"{where}.{i}.content must be a string")
        messages.append(ChatMessage(role=role, content=content))
    return messages
