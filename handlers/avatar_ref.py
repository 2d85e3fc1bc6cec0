"""`AvatarRef`: the user and avatar a request acts on, once validated and authorised
(`handlers.dependencies.authorized_avatar`). Stores and services take it instead of bare ids,
so a key is only ever built from ids that passed `contracts.ids`. Plain data: no FastAPI."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AvatarRef:
    user_id: str
    avatar_id: str
