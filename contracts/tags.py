"""S3 object tags used by avatune."""

from __future__ import annotations

from urllib.parse import urlencode

USE_FOR_TRAINING = "use_for_training"
DEFAULT_USE_FOR_TRAINING = True


def flag_value(flag: bool) -> str:
    return "true" if flag else "false"


def parse_flag(value: str | None) -> bool:
    """The tag's value as a bool; a missing or unknown value counts as the default (true)."""
    if value is None:
        return DEFAULT_USE_FOR_TRAINING
    return value.strip().lower() != "false"


def tagging_header(flag: bool) -> str:
    """The URL-encoded `x-amz-tagging` / `Tagging` value carrying the training flag."""
    return urlencode({USE_FOR_TRAINING: flag_value(flag)})


def flag_from_tagset(tagset: list[dict[str, str]]) -> bool:
    for tag in tagset:
        if tag.get("Key") == USE_FOR_TRAINING:
            return parse_flag(tag.get("Value"))
    return DEFAULT_USE_FOR_TRAINING
