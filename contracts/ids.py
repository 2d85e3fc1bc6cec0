"""Validation of the identifiers that become parts of S3 keys.

Every user id, avatar id and document name passes through here before it is placed in a
key, so no request can build a key outside its own prefix.
"""

from __future__ import annotations

import re

MAX_ID_LENGTH = 128
MAX_DOCUMENT_NAME_LENGTH = 200

# Ids: letters, digits and a little punctuation; never a path separator or a leading dot.
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]*$")
# Document names additionally allow spaces, and must end in an accepted extension.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@ ()+-]*$")

DOCUMENT_EXTENSIONS = (".jsonl", ".json", ".txt")
# Context documents (RAG, `vectorstore_data/`): see contracts/context_documents.py.
CONTEXT_DOCUMENT_EXTENSIONS = (".txt", ".md", ".jsonl")


class InvalidIdentifier(ValueError):
    """An id or name that may not be used in an S3 key."""


def _check_common(value: str, what: str, max_length: int) -> None:
    if not value:
        raise InvalidIdentifier(f"{what} must not be empty")
    if len(value) > max_length:
        raise InvalidIdentifier(f"{what} must be at most {max_length} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise InvalidIdentifier(f"{what} must not contain control characters")
    if "/" in value or "\\" in value:
        raise InvalidIdentifier(f"{what} must not contain '/' or '\\'")
    if ".." in value:
        raise InvalidIdentifier(f"{what} must not contain '..'")
    if value.startswith("."):
        raise InvalidIdentifier(f"{what} must not start with a dot")


def validate_id(value: str, what: str = "id") -> str:
    """Return `value` if it is a safe user or avatar id, else raise InvalidIdentifier."""
    _check_common(value, what, MAX_ID_LENGTH)
    if not _ID_RE.match(value):
        raise InvalidIdentifier(
            f"{what} may contain only letters, digits, '_', '-', '.', '@' and must start with a letter or digit"
        )
    return value


def is_valid_id(value: str) -> bool:
    """Whether `value` is a safe id (`validate_id` accepts it): for names found in listings."""
    try:
        validate_id(value)
    except InvalidIdentifier:
        return False
    return True


def validate_document_name(value: str, extensions: tuple[str, ...] = DOCUMENT_EXTENSIONS) -> str:
    """Return `value` if it is a safe document name ending in one of `extensions` (default:
    training documents')."""
    _check_common(value, "document name", MAX_DOCUMENT_NAME_LENGTH)
    if value != value.strip():
        raise InvalidIdentifier("document name must not start or end with whitespace")
    if not _NAME_RE.match(value):
        raise InvalidIdentifier(
            "document name may contain only letters, digits, spaces and _ - . @ ( ) + and must start with a "
            "letter or digit"
        )
    if not value.lower().endswith(extensions):
        raise InvalidIdentifier(f"document name must end with one of {', '.join(extensions)}")
    return value
