"""What a running job lets its work know and do: the `TrainingControl` protocol and the stop
reasons it speaks.

The job runtime (`trainer.runtime.control.JobControl`) implements it for the worker's own
process; a data-parallel rank implements it through files (`trainer.distributed`). Training
loops, index builds and generations consult it between steps; none of them knows who stops
them or why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from contracts.jobs import JobProgress

# Why a job's work stopped before it was done.
CANCELLED = "cancelled"  # the user asked: the work is thrown away
PREEMPTED = "preempted"  # SIGTERM (spot reclaim, scale-in, rollout): checkpoint, hand the job back
LOST_LEASE = "lost_lease"  # another worker owns the job now (or its record is gone): write nothing
# A job past `resources.max_duration_minutes` stops with a reason that starts with this; it keeps
# its last checkpoint (written at the stop) and ends failed with the reason.
DURATION_EXCEEDED = "exceeded max_duration_minutes"


def keeps_checkpoint(reason: str) -> bool:
    """Whether a job stopped for `reason` writes a checkpoint at the stop (a cancel throws the work away)."""
    return reason == PREEMPTED or reason.startswith(DURATION_EXCEEDED)


class TrainingControl(Protocol):
    """What a running job lets the training loop know and do."""

    def stop_reason(self) -> str | None:
        """Non-None once training must stop at the next step ("cancelled", "preempted", ...)."""

    def report(self, progress: JobProgress) -> None:
        """Latest progress (cheap: the job's heartbeat decides when to persist it)."""

    def checkpoint_due(self, step: int) -> bool:
        """Whether to write a checkpoint after this step."""

    def checkpoint_saved(self, local_dir: Path, step: int) -> None:
        """A complete checkpoint is on local disk: upload it."""


def report_progress(control: TrainingControl, step: int, total_steps: int) -> JobProgress:
    """Report `step` of `total_steps` through `control` and return that progress (a job's last
    progress goes into its final record)."""
    progress = JobProgress(step=step, total_steps=total_steps)
    control.report(progress)
    return progress
