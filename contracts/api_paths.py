"""API paths that other records point at (a job view's `links`). Routes are a public contract
like the S3 keys: these builders and the routes in `handlers/routes/` must agree (tested)."""

from __future__ import annotations

from typing import Literal

WholeModelKind = Literal["merged", "full"]

# Where the OpenAI-compatible API (files, fine-tuning jobs) is mounted: the SDK's base_url.
OPENAI_PREFIX = "/openai/v1"


def avatar_path(user_id: str, avatar_id: str) -> str:
    return f"/v1/users/{user_id}/avatars/{avatar_id}"


def version_file_path(user_id: str, avatar_id: str, version: int, name: str) -> str:
    """An adapter version's file (`metrics.json`, `samples.json`, `loss.png`)."""
    return f"{avatar_path(user_id, avatar_id)}/adapter/versions/{version}/files/{name}"


def whole_model_path(user_id: str, avatar_id: str, kind: WholeModelKind, version: int) -> str:
    """One merged (fuse job) or fully fine-tuned (method full) model."""
    return f"{avatar_path(user_id, avatar_id)}/{kind}-models/{version}"


def export_path(user_id: str, avatar_id: str, version: int, export_format: str) -> str:
    """One export of an adapter version (export jobs)."""
    return f"{avatar_path(user_id, avatar_id)}/exports/{version}/{export_format}"
