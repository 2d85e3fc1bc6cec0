"""The ready file: how a long-running process tells its supervisor that it serves.

The trainer worker (once it polls the train queue) and the events consumer (once it polls the
events queue) create the file named by READY_FILE, if set, and remove it when they stop. `make
dev` waits for them before it prints its one "ready" line; a Kubernetes readiness probe can
test the same file (`test -f`). Pure stdlib.
"""

from __future__ import annotations

import os
from pathlib import Path

READY_FILE_VARIABLE = "READY_FILE"


def ready_file() -> Path | None:
    """The file READY_FILE names, or None when it is unset."""
    value = os.environ.get(READY_FILE_VARIABLE, "").strip()
    return Path(value) if value else None


def mark_ready(path: Path | None = None) -> None:
    """Create the ready file (atomically: a reader never sees it half-written)."""
    path = path or ready_file()
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(f"{os.getpid()}\n")
    tmp.replace(path)


def mark_stopped(path: Path | None = None) -> None:
    path = path or ready_file()
    if path is not None:
        path.unlink(missing_ok=True)
