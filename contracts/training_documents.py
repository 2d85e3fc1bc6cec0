"""A training document is either demonstrations or preferences; this module tells them apart.

- demonstrations (`contracts.documents`): chat, prompt/completion and text `.jsonl` records,
  `.txt` and `.json` dialogs; what supervised fine-tuning (`objective: sft`) trains on;
- preferences (`contracts.preferences`): `.jsonl` records that judge replies (TRL pairs,
  OpenAI preference records, KTO rated replies); what `objective: dpo` and `kto` train on.

A `.jsonl` document's kind is its first record's: a record with a preference key (`chosen`,
`rejected`, `preferred_output`, `non_preferred_output`, `label`) makes it preferences, and then
every line must be a judgement (mixing the kinds in one document is refused, naming the line).
The API validates uploads with `parse_training_document` and the trainer reads documents with
it, so a document either side accepts is one the other can use. Each job reads the documents of
its own kind and leaves the others alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from contracts.documents import (
    Conversation,
    DocumentError,
    decode_document,
    document_format,
    errors_at_line,
    jsonl_objects,
    parse_document,
    parse_jsonl_record,
)
from contracts.preferences import Judgement, is_preference_record, parse_preference_record

DocumentKind = Literal["demonstrations", "preferences"]
DEMONSTRATION_KEYS = frozenset({"messages", "prompt", "completion", "text"})


@dataclass(frozen=True)
class ParsedDocument:
    """A validated training document: its demonstrations or its judgements (never both)."""

    kind: DocumentKind
    conversations: list[Conversation] = field(default_factory=list)
    judgements: list[Judgement] = field(default_factory=list)


def parse_training_document(name: str, data: bytes) -> ParsedDocument:
    """Validate a training document of either kind; DocumentError (with the 1-based line for
    JSONL) when it cannot be used."""
    if document_format(name) != "jsonl":
        return ParsedDocument("demonstrations", conversations=parse_document(name, data))
    text = decode_document(data)
    if not text.strip():
        raise DocumentError("document is empty")
    kind: DocumentKind | None = None
    conversations: list[Conversation] = []
    judgements: list[Judgement] = []
    for number, _, obj in jsonl_objects(text):
        if not isinstance(obj, dict):
            raise DocumentError("each line must be a JSON object", line=number)
        preference = is_preference_record(obj)
        if kind is None:
            kind = "preferences" if preference else "demonstrations"
        elif preference != (kind == "preferences"):
            raise DocumentError(_mixed(kind, obj), line=number)
        with errors_at_line(number):
            if preference:
                judgements.append(parse_preference_record(obj))
            else:
                conversations.append(parse_jsonl_record(obj))
    if kind is None:
        raise DocumentError("document holds no training records")
    return ParsedDocument(kind, conversations=conversations, judgements=judgements)


def _mixed(kind: DocumentKind, obj: dict) -> str:
    if kind == "preferences" and DEMONSTRATION_KEYS.isdisjoint(obj):
        return (
            "not a preference record: a line needs chosen and rejected (with prompt, or as whole "
            "conversations), input with preferred_output and non_preferred_output, or prompt, completion and label"
        )
    other = "a demonstration" if kind == "preferences" else "a preference"
    return (
        f"{other} record in a document of {kind} (its first record decides): keep demonstrations "
        "and preferences in separate documents"
    )
