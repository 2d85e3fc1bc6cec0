"""The fault soak's bookkeeping (`bench.soak`): every job the driver created, every write of a
training document's flag with when it was sent and acknowledged, every "delete all unused"
round, and every HTTP answer. The checks judge the stores against this record.

Times are seconds since the ledger was made (`Ledger.now`), one monotonic clock for all threads.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

FINAL = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True)
class DocWrite:
    """One PUT or PATCH of a training document, as the API answered it."""

    avatar: str  # "user_id/avatar_id"
    name: str
    op: str  # "patch" | "put"
    flag: bool | None  # the flag the write asked for
    sent: float
    acked: float
    status: int | None  # the HTTP status; None: no answer at all

    @property
    def ok(self) -> bool:
        return self.status in (200, 201)

    @property
    def gone(self) -> bool:
        """A PATCH that found no document: deleted by a delete-unused the driver raced."""
        return self.status == 404

    @property
    def flagged_true(self) -> bool:
        return self.ok and self.flag is True


@dataclass(frozen=True)
class DeleteRound:
    """One `DELETE {base}/training-data?use_for_training=false`."""

    avatar: str
    started: float
    ended: float
    deleted: int | None  # None: no 200 answer

    def overlaps(self, write: DocWrite) -> bool:
        """The write was in flight while the delete was (one of the races under test)."""
        return write.avatar == self.avatar and write.sent < self.ended and write.acked > self.started


@dataclass(frozen=True)
class JobEntry:
    job_id: str
    user_id: str
    avatar_id: str
    type: str
    created: float
    probe: bool = False  # created after the load, to show the avatar is not locked


@dataclass
class Ledger:
    t0: float = field(default_factory=time.monotonic)
    jobs: dict[str, JobEntry] = field(default_factory=dict)
    writes: list[DocWrite] = field(default_factory=list)
    deletes: list[DeleteRound] = field(default_factory=list)
    responses: Counter[tuple[str, str]] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    round_checks: int = 0  # documents checked after delete rounds
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def job(self, entry: JobEntry) -> None:
        with self._lock:
            self.jobs[entry.job_id] = entry

    def write(self, write: DocWrite) -> None:
        with self._lock:
            self.writes.append(write)

    def delete_round(self, round_: DeleteRound) -> None:
        with self._lock:
            self.deletes.append(round_)

    def response(self, op: str, status: int | str, expected: frozenset[int], detail: str = "") -> None:
        """Count an answer; one outside `expected` (a 5xx, a refused request, no answer) is kept."""
        with self._lock:
            self.responses[(op, str(status))] += 1
            if status not in expected:
                self.unexpected.append(f"{op}: {status} at {self.now():.1f} s {detail}".rstrip())

    def violation(self, text: str) -> None:
        with self._lock:
            self.violations.append(f"[{self.now():.1f} s] {text}")

    def flags_true(self) -> list[DocWrite]:
        """Every write the API acknowledged that flagged a document `true` (and when)."""
        return [w for w in self.writes if w.flagged_true]

    def raced_true(self) -> list[DocWrite]:
        """Acknowledged `true` flags that were in flight while a delete-unused of their avatar was."""
        return [w for w in self.flags_true() if any(d.overlaps(w) for d in self.deletes)]
