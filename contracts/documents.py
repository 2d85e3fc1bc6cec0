"""Training-document formats: validation on upload (API) and conversion to chat (trainer).

One parser serves both sides, so a document the API accepts is exactly a document the
trainer can use. Accepted:

- `.jsonl`, one record a line, each one of
  - chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": str, "weight"?: 0|1}, ...]}`
  - prompt/completion: `{"prompt": str, "completion": str}`
  - text: `{"text": str}`
- `.txt`: plain UTF-8 text; paragraphs (separated by blank lines) become assistant turns.
- `.json`: a dialog `{"dialog": [{"speaker": str, "content": str}, ...], "speaker": str}`;
  the chosen speaker's turns become the assistant's, everyone else's the user's.

These are demonstrations (what supervised fine-tuning learns from). A `.jsonl` document may
instead hold preferences (judgements of replies, for DPO and KTO jobs): `contracts.preferences`
reads those, and `contracts.training_documents` tells the two kinds apart.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

Role = Literal["system", "user", "assistant"]


class ChatMessage(BaseModel):
    """One chat turn. `weight: 0` on an assistant turn shows it to the model without training on it."""

    model_config = ConfigDict(extra="forbid")

    role: Role
    content: str
    weight: Literal[0, 1] | None = None


class Conversation(BaseModel):
    messages: list[ChatMessage] = Field(min_length=1)


class _ChatRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")
    messages: list[ChatMessage] = Field(min_length=1)

    @field_validator("messages")
    @classmethod
    def _has_assistant(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.role == "assistant" and m.content.strip() for m in messages):
            raise ValueError("a chat record needs at least one non-empty assistant message")
        return messages


class _PromptCompletionRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str
    completion: str = Field(min_length=1)


class _TextRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: str = Field(min_length=1)


class DialogTurn(BaseModel):
    speaker: str = Field(min_length=1)
    content: str


class Dialog(BaseModel):
    """A `.json` dialog document."""

    dialog: list[DialogTurn] = Field(min_length=1)
    speaker: str = Field(min_length=1, description="whose voice the avatar learns")


class DocumentError(ValueError):
    """A document that cannot be used for training; `line` is 1-based where it applies."""

    def __init__(self, message: str, line: int | None = None) -> None:
        self.message = message
        self.line = line
        super().__init__(f"line {line}: {message}" if line is not None else message)


def document_format(name: str) -> str:
    """`jsonl`, `json` or `txt` from the document name, or raise DocumentError."""
    lowered = name.lower()
    for ext in ("jsonl", "json", "txt"):
        if lowered.endswith("." + ext):
            return ext
    raise DocumentError("unsupported document type: use .jsonl, .json or .txt")


def content_type_for(name: str) -> str:
    return {
        "jsonl": "application/jsonl",
        "json": "application/json",
        "txt": "text/plain; charset=utf-8",
    }[document_format(name)]


def decode_document(data: bytes) -> str:
    """A document's text: UTF-8 (else DocumentError), a leading BOM dropped."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DocumentError(f"document is not valid UTF-8 (byte offset {exc.start})") from None
    return text.removeprefix("\ufeff")


def first_error(exc: ValidationError) -> str:
    """The first error of a pydantic ValidationError as "loc: message"."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    return f"{where}: {err['msg']}" if where else err["msg"]


def jsonl_objects(text: str) -> Iterator[tuple[int, int, object]]:
    """(1-based line number, character offset of the line, parsed JSON value) for each
    non-blank line of a JSONL text; DocumentError with the line on malformed JSON.

    Lines end at "\n" only (a "\r" before it is JSON whitespace): `str.splitlines` would also
    cut at U+2028, U+0085, form feeds..., which may stand unescaped inside a JSON string."""
    offset = 0
    for number, line in enumerate(text.split("\n"), start=1):
        start, offset = offset, offset + len(line) + 1
        if not line.strip():
            continue
        try:
            obj = json.loads(line.strip())
        except json.JSONDecodeError as exc:
            raise DocumentError(f"malformed JSON: {exc.msg}", line=number) from None
        yield number, start, obj


def parse_jsonl_record(obj: object) -> Conversation:
    """One demonstration line (chat, prompt/completion or text) as a conversation; ValueError or
    ValidationError when it is none (the caller adds the line)."""
    if not isinstance(obj, dict):
        raise ValueError("each line must be a JSON object")
    if "messages" in obj:
        return Conversation(messages=_ChatRecord.model_validate(obj).messages)
    if "prompt" in obj or "completion" in obj:
        rec = _PromptCompletionRecord.model_validate(obj)
        return Conversation(
            messages=[
                ChatMessage(role="user", content=rec.prompt),
                ChatMessage(role="assistant", content=rec.completion),
            ]
        )
    if "text" in obj:
        rec_t = _TextRecord.model_validate(obj)
        return Conversation(messages=[ChatMessage(role="assistant", content=rec_t.text)])
    raise ValueError('a record needs "messages", "prompt"/"completion" or "text"')


@contextmanager
def errors_at_line(number: int) -> Iterator[None]:
    """A record's ValidationError or ValueError, as a DocumentError naming its 1-based line."""
    try:
        yield
    except ValidationError as exc:
        raise DocumentError(first_error(exc), line=number) from None
    except ValueError as exc:
        raise DocumentError(str(exc), line=number) from None


def _parse_jsonl(text: str) -> list[Conversation]:
    conversations: list[Conversation] = []
    for number, _, obj in jsonl_objects(text):
        with errors_at_line(number):
            conversations.append(parse_jsonl_record(obj))
    return conversations


def dialog_to_conversation(dialog: Dialog) -> Conversation:
    """The chosen speaker becomes `assistant`, everyone else `user`; consecutive turns of a role merge."""
    messages: list[ChatMessage] = []
    for turn in dialog.dialog:
        role: Role = "assistant" if turn.speaker == dialog.speaker else "user"
        if messages and messages[-1].role == role:
            messages[-1] = ChatMessage(role=role, content=messages[-1].content + "\n" + turn.content)
        else:
            messages.append(ChatMessage(role=role, content=turn.content))
    return Conversation(messages=messages)


def _parse_dialog(text: str) -> list[Conversation]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DocumentError(f"malformed JSON: {exc.msg}", line=exc.lineno) from None
    try:
        dialog = Dialog.model_validate(obj)
    except ValidationError as exc:
        raise DocumentError(
            'a .json document must be a dialog {"dialog": [{"speaker", "content"}...], "speaker": ...}: '
            + first_error(exc)
        ) from None
    if not any(t.speaker == dialog.speaker for t in dialog.dialog):
        raise DocumentError(f"speaker {dialog.speaker!r} does not occur in the dialog")
    return [dialog_to_conversation(dialog)]


def _parse_text(text: str) -> list[Conversation]:
    paragraphs = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n")]
    return [Conversation(messages=[ChatMessage(role="assistant", content=p)]) for p in paragraphs if p]


def parse_document(name: str, data: bytes) -> list[Conversation]:
    """Validate a training document and return it as chat conversations.

    Raises DocumentError with a clear message (and line number for JSONL) when the
    document cannot be used.
    """
    fmt = document_format(name)
    text = decode_document(data)
    if not text.strip():
        raise DocumentError("document is empty")
    if fmt == "jsonl":
        conversations = _parse_jsonl(text)
    elif fmt == "json":
        conversations = _parse_dialog(text)
    else:
        conversations = _parse_text(text)
    if not conversations:
        raise DocumentError("document holds no training records")
    return conversations
