"""The current-adapter lock on the trainer's side (the rule: `contracts.adapters.CurrentAdapterLock`;
the API's side: `handlers.adapter_store`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from contracts.adapters import CURRENT_LOCK_SECONDS, CURRENT_LOCK_WAIT_SECONDS, CurrentAdapterLock
from contracts.jobs import utcnow
from contracts.keys import current_adapter_lock_key
from trainer.errors import RetryLater
from trainer.s3_objects import S3Objects

log = logging.getLogger("avatune.trainer")


class CurrentAdapterBusy(RetryLater):
    """Someone else kept changing the current adapter for longer than we wait: the job is handed
    back and retried later, not failed (a dead holder's lock expires on its own)."""


@contextmanager
def current_adapter_lock(
    objects: S3Objects, user_id: str, avatar_id: str, owner: str, wait: float = CURRENT_LOCK_WAIT_SECONDS
) -> Iterator[None]:
    """Hold the avatar's current-adapter lock for the block (taking over one whose holder died)."""
    key = current_adapter_lock_key(user_id, avatar_id)
    token = CurrentAdapterLock.token(owner)
    deadline = time.monotonic() + wait
    while True:
        lock = CurrentAdapterLock(owner=token, expires_at=utcnow() + timedelta(seconds=CURRENT_LOCK_SECONDS))
        etag = objects.create(key, lock.model_dump_json().encode())
        if etag is not None:
            break
        found = objects.read(key)
        if found is not None:
            verdict = CurrentAdapterLock.verdict(found[0], token)
            if verdict == "ours":  # our create landed, its answer was lost
                etag = found[1]
                break
            if verdict == "expired":
                log.warning("current-adapter lock of %s/%s expired: taking it over", user_id, avatar_id)
                objects.delete_if(key, found[1])
                continue
        if time.monotonic() > deadline:
            raise CurrentAdapterBusy(f"the current adapter of {avatar_id!r} is being changed by someone else")
        time.sleep(0.2)
    try:
        yield
    finally:
        objects.delete_if(key, etag)
