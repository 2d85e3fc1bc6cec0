"""Context-document formats (RAG): validation on upload (API) and records for the chunker (trainer).

One parser serves both sides, so a document the API accepts is exactly a document an index
job can chunk. Pure: no I/O, no torch. Accepted (by name extension, case-insensitive):

- `.txt`, `.md`: UTF-8 text (a leading BOM is dropped), not blank. The whole document is
  one record; Markdown is kept as written (the chunker sees the markup).
- `.jsonl`: one JSON object a line, `{"text": str, "metadata"?: {key: str|int|float|bool}}`;
  blank lines are skipped, at least one record is required, unknown fields are refused
  (a typo such as `"meta"` must not silently drop metadata). Metadata keys match
  `METADATA_KEY_PATTERN` so that an index can store them as columns and filter on them
  inside the store; values are scalars (no null, lists or objects).

Offsets: every `ContextRecord` carries `start_offset`, the character (not byte) offset in
the decoded document where the record starts: 0 for `.txt`/`.md` (its `text` is the
decoded document itself, so `text[i]` is document character `start_offset + i`); for
`.jsonl`, the offset of the record's line (its `text` is JSON-decoded, so offsets inside
`text` do not map onto the raw line; `line` names the source line). A chunk's position is
therefore (`record.index`, offset inside `record.text`), and `start_offset + offset` is the
document character offset for `.txt`/`.md`.

Errors raise `contracts.documents.DocumentError` (`.message`, `.line` 1-based for JSONL),
the same error type as training documents.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from contracts.documents import DocumentError, decode_document, first_error, jsonl_objects
from contracts.ids import CONTEXT_DOCUMENT_EXTENSIONS, validate_document_name

__all__ = [
    "CONTEXT_DOCUMENT_EXTENSIONS",
    "ContextFormat",
    "ContextRecord",
    "DocumentError",
    "MAX_METADATA_KEYS",
    "MAX_METADATA_VALUE_CHARS",
    "METADATA_KEY_PATTERN",
    "MetadataValue",
    "context_content_type",
    "context_document_format",
    "parse_context_document",
    "validate_context_document_name",
    "validate_metadata",
    "validate_metadata_key",
]

ContextFormat = Literal["txt", "md", "jsonl"]

# Keys become column names / filter fields of the vector store: keep them plain identifiers.
METADATA_KEY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
_METADATA_KEY_RE = re.compile(METADATA_KEY_PATTERN)
MAX_METADATA_KEYS = 32
MAX_METADATA_VALUE_CHARS = 1024

# Strict: `true` stays a bool, `"1"` stays a string, null is refused.
MetadataValue = StrictBool | StrictInt | StrictFloat | Annotated[StrictStr, Field(max_length=MAX_METADATA_VALUE_CHARS)]


@dataclass(frozen=True, slots=True)
class ContextRecord:
    """One unit of retrievable text from a context document (see the module doc for offsets)."""

    text: str
    metadata: dict[str, bool | int | float | str] = field(default_factory=dict)
    start_offset: int = 0
    line: int = 1
    index: int = 0  # 0-based position of the record in its document


class _JsonlRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: StrictStr
    # Values are checked by `validate_metadata` (clearer messages than a union's errors).
    metadata: dict[str, object] = Field(default_factory=dict)


def validate_context_document_name(name: str) -> str:
    """`name` if it is a safe context-document name (`.txt`, `.md`, `.jsonl`); else raises
    `contracts.ids.InvalidIdentifier`."""
    return validate_document_name(name, CONTEXT_DOCUMENT_EXTENSIONS)


def context_document_format(name: str) -> ContextFormat:
    """`txt`, `md` or `jsonl` from the name, or raise DocumentError."""
    lowered = name.lower()
    for ext in ("jsonl", "txt", "md"):
        if lowered.endswith("." + ext):
            return ext  # type: ignore[return-value]
    raise DocumentError("unsupported context document type: use .txt, .md or .jsonl")


def context_content_type(name: str) -> str:
    return {
        "jsonl": "application/jsonl",
        "md": "text/markdown; charset=utf-8",
        "txt": "text/plain; charset=utf-8",
    }[context_document_format(name)]


def validate_metadata_key(key: str) -> str:
    """`key` if it may be a metadata key (or a retrieval filter key); else raises ValueError."""
    if not isinstance(key, str) or not _METADATA_KEY_RE.match(key):
        raise ValueError(
            f"metadata key {key!r} must be 1-64 characters of letters, digits and '_', not starting with a digit"
        )
    return key


def validate_metadata(metadata: Mapping[str, object]) -> dict[str, bool | int | float | str]:
    """Check a metadata mapping (keys, count, scalar values, string lengths) and return it typed;
    raises ValueError with the offending key."""
    if len(metadata) > MAX_METADATA_KEYS:
        raise ValueError(f"metadata may have at most {MAX_METADATA_KEYS} keys")
    checked: dict[str, bool | int | float | str] = {}
    for key, value in metadata.items():
        validate_metadata_key(key)
        if not isinstance(value, (bool, int, float, str)):
            kind = {type(None): "null", list: "an array", dict: "an object"}.get(type(value), type(value).__name__)
            raise ValueError(f"metadata.{key}: must be a string, number or boolean, not {kind}")
        if isinstance(value, float) and not math.isfinite(value):  # NaN never equals a filter value
            raise ValueError(f"metadata.{key}: must be a finite number")
        if isinstance(value, str) and len(value) > MAX_METADATA_VALUE_CHARS:
            raise ValueError(f"metadata.{key}: at most {MAX_METADATA_VALUE_CHARS} characters")
        checked[key] = value
    return checked


def _parse_jsonl(text: str) -> list[ContextRecord]:
    records: list[ContextRecord] = []
    for number, start, obj in jsonl_objects(text):
        if not isinstance(obj, dict):
            raise DocumentError('each line must be a JSON object {"text": ..., "metadata"?: {...}}', line=number)
        try:
            rec = _JsonlRecord.model_validate(obj)
            metadata = validate_metadata(rec.metadata)
        except ValidationError as exc:
            raise DocumentError(first_error(exc), line=number) from None
        except ValueError as exc:
            raise DocumentError(str(exc), line=number) from None
        if not rec.text.strip():
            raise DocumentError("text: must not be empty", line=number)
        records.append(
            ContextRecord(text=rec.text, metadata=metadata, start_offset=start, line=number, index=len(records))
        )
    return records


def parse_context_document(name: str, data: bytes) -> list[ContextRecord]:
    """Validate a context document and return its records (at least one, each with non-blank text).

    `name` picks the format by extension (only the extension is looked at here; key safety is
    `validate_context_document_name`'s job). Raises DocumentError with a clear message (and a
    1-based `line` for JSONL) when the document cannot be indexed.
    """
    fmt = context_document_format(name)
    text = decode_document(data)
    if not text.strip():
        raise DocumentError("document is empty")
    if fmt == "jsonl":
        records = _parse_jsonl(text)
        if not records:
            raise DocumentError("document holds no records")
        return records
    return [ContextRecord(text=text)]
