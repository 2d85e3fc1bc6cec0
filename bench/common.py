"""Shared helpers: processes, ports, the machine description, markdown tables."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import date
from pathlib import Path

from infra.processes import free_port, stop, wait_http  # noqa: F401 (re-exported)

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


@contextmanager
def ready_process(
    args: list[str], env: dict[str, str] | None = None, stdin: bool = False, log: Path | None = None
) -> Iterator[tuple[subprocess.Popen, int]]:
    """A child that prints `ready PORT` first; yields it and the port, stops it afterwards."""
    err = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        env=env or dict(os.environ),
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stderr=err,
        text=True,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line.startswith("ready "):
            raise RuntimeError(f"{args} did not start: {line!r}")
        yield proc, int(line.split()[1])
    finally:
        if stdin and proc.stdin:
            try:
                proc.stdin.close()
            except OSError:
                pass
        stop(proc)
        if log:
            err.close()  # type: ignore[union-attr]


def command(proc: subprocess.Popen, cmd: dict) -> dict:
    """Send a JSON command line to a child started with stdin=True; its JSON answer."""
    assert proc.stdin and proc.stdout
    proc.stdin.write(json.dumps(cmd) + "\n")
    proc.stdin.flush()
    answer = json.loads(proc.stdout.readline())
    if not answer.get("ok"):
        raise RuntimeError(f"{cmd['op']} failed: {answer.get('error')}")
    return answer


class NoControl:
    """A job's control (`trainer.control.TrainingControl`) that never stops, checkpoints or
    reports: what a benchmark hands the trainer's functions."""

    def stop_reason(self) -> None:
        return None

    def report(self, progress: object) -> None:
        pass

    def checkpoint_due(self, step: int) -> bool:
        return False

    def checkpoint_saved(self, local_dir: Path, step: int) -> None:
        pass


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        mem_s = f", {mem:.0f} GiB RAM"
    except (ValueError, OSError):
        mem_s = ""
    system = f"{platform.system()} {platform.release()}"
    return f"{cpu}, {os.cpu_count()} cores{mem_s}, {system}, Python {platform.python_version()}"


def today() -> str:
    return date.today().isoformat()


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def secs(value: float) -> str:
    if value >= 100:
        return f"{value:.0f} s"
    if value >= 10:
        return f"{value:.1f} s"
    if value >= 1:
        return f"{value:.2f} s"
    return f"{value * 1000:.0f} ms"


def ratio(baseline: float, ours: float) -> str:
    return f"{baseline / ours:.1f}×" if ours > 0 else "∞"
