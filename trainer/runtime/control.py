"""`JobControl`: the `trainer.control.TrainingControl` of a job running in the worker's process.

It answers "stop?" from what the heartbeat noticed (cancel, lost lease), the worker's shutdown
flag (SIGTERM) and the job's `resources.max_duration_minutes`; it keeps the latest progress for
the heartbeat to persist; it schedules checkpoints and uploads them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from contracts.jobs import JobProgress, JobRecord, utcnow
from trainer.checkpoint_schedule import CheckpointSchedule
from trainer.control import CANCELLED, DURATION_EXCEEDED, LOST_LEASE, PREEMPTED
from trainer.runtime.heartbeat import Heartbeat

# Uploads a complete local checkpoint directory of `step` for the job.
CheckpointUpload = Callable[[Path, int], None]


class JobControl:
    def __init__(
        self,
        job: JobRecord,
        heartbeat: Heartbeat,
        shutdown: threading.Event,
        schedule: CheckpointSchedule,
        upload_checkpoint: CheckpointUpload,
    ) -> None:
        self._heartbeat = heartbeat
        self._shutdown = shutdown
        self._schedule = schedule
        self._upload = upload_checkpoint
        # resources.max_duration_minutes counts from the job's first start (retries included).
        resources = job.spec.resources if job.spec else None
        self._limit = resources.max_duration_minutes if resources else None
        started = job.started_at or utcnow()
        self._deadline = started + timedelta(minutes=self._limit) if self._limit else None

    def stop_reason(self) -> str | None:
        if self._heartbeat.cancelled.is_set():
            return CANCELLED
        if self._heartbeat.lost_lease.is_set():
            return LOST_LEASE
        if self._shutdown.is_set():
            return PREEMPTED
        if self._deadline is not None and utcnow() >= self._deadline:
            return f"{DURATION_EXCEEDED}={self._limit:g}"
        return None

    def report(self, progress: JobProgress) -> None:
        self._heartbeat.progress = progress

    @property
    def progress(self) -> JobProgress | None:
        """The latest progress reported."""
        return self._heartbeat.progress

    def checkpoint_due(self, step: int) -> bool:
        return self._schedule.due(step)

    def checkpoint_saved(self, local_dir: Path, step: int) -> None:
        self._schedule.saved()
        self._upload(local_dir, step)
