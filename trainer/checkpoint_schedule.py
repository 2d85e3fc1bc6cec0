"""When a running job writes a checkpoint: every N steps (if set) and every T seconds."""

from __future__ import annotations

import time


class CheckpointSchedule:
    def __init__(self, every_steps: int, interval_seconds: float) -> None:
        self._every_steps = every_steps
        self._interval = interval_seconds
        self._last = time.monotonic()

    def due(self, step: int) -> bool:
        by_steps = self._every_steps > 0 and step % self._every_steps == 0
        return by_steps or time.monotonic() - self._last >= self._interval

    def saved(self) -> None:
        self._last = time.monotonic()
