"""`make soak` / `python -m bench.soak --minutes N --workers K`: a fault soak of the job runtime,
the API and the stores, on this machine only (127.0.0.1). Not part of the test suite, and not
run by `python -m bench`: it writes section 9 of BENCHMARKS.md and exits 1 on any violation.

    python -m bench.soak                       # 6 minutes of load, 2 workers
    python -m bench.soak --minutes 15 --workers 3 --seed 7

Why: the tests show each fault path once, in isolation (tests/faults/test_runtime_faults.py,
test_promote_races.py, test_delete_unused_race.py). Production meets them all at once and
in every interleaving: a worker killed mid-publish while a promote waits for the lock, a
redelivered message adopted while the API re-queues the same job, a network cut on the
write that marks an event published. The soak runs the real processes together for minutes
and then checks that nothing was lost, duplicated or left locked.

The stack (`bench.soak_stack`): moto in server mode, bootstrapped like `make dev`, a real
API server (uvicorn, STALE_LEASE_SECONDS=20) and K real trainer workers (`python -m trainer`,
tiny model, short heartbeats and leases, an SQS visibility cap of 15 s so that long jobs hand
their messages over) reaching S3 and SQS through `infra.faulty_proxy` (a fraction of the
connections reset, or cut after the request went out). The load (`bench.soak_load`), through
the real HTTP API for 3 users x 2 avatars: uploads, training jobs of a few seconds, fuse and
generation jobs, cancels, concurrent promotes, and on the first avatar of each user "delete all
unused" racing PATCHes to true and re-uploads (the other avatar's documents stay as they are,
so its jobs can resume from checkpoints); chaos kills a random worker (SIGKILL or SIGTERM)
every 10-30 s and starts another.

Then the load and the chaos stop, K healthy workers run until every job is final (the API's
GET of a job also settles abandoned ones), and the invariants (`bench.soak_checks`) are checked:

1. every job is final (none left queued or running);
2. every final job's final event was published; every event's `event_id` is
   `{job_id}:{event}`; a repeated event_id is the same event again (at-least-once), never a
   job with two different final events;
3. no avatar is locked: `adapters/active_job.json` is absent or names an active job, and a new
   job can be created on every avatar (a probe job, run to its end);
4. no document flagged true is lost: after every delete-unused round (and at the end), each
   document whose last acknowledged write flagged it true exists, flagged true;
5. each avatar's current adapter is one whole version: the manifest's version is kept under
   `versions/`, and each current file's sha256 equals the manifest's and that version's;
6. the API answered nothing unexpected (no 5xx, no refused request the load did not expect).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import machine, secs, table, today
from bench.soak_checks import (
    adapter_findings,
    event_findings,
    job_events,
    job_findings,
    log_counts,
    pointer_violations,
)
from bench.soak_ledger import FINAL, Ledger
from bench.soak_load import Api, AvatarDriver, Chaos, Promoter
from bench.soak_stack import FAULT_PLAN, STALE_LEASE_SECONDS, WORKER_ENV, Stack, running_stack

SECTION = 9
SETTLE_SECONDS = 900  # generous: a job may wait out a dead worker's current-adapter lock (300 s)
EVENTS_SECONDS = 180
PROGRESS_SECONDS = 30

Log = Callable[[str], None]


def _drivers(stack: Stack, ledger: Ledger, users: int, avatars: int, seed: int) -> list[AvatarDriver]:
    from handlers.auth import issue_token

    drivers = []
    for u in range(users):
        user_id = f"soak-u{u}"
        token = issue_token(stack.secret, user_id)
        for a in range(avatars):
            api = Api(stack.api_url, token, user_id, f"a{a}", ledger)
            calm = avatars > 1 and a == avatars - 1
            drivers.append(AvatarDriver(api, stack.s3, stack.bucket, seed * 100 + u * 10 + a, churn=not calm))
    return drivers


def _progress(stack: Stack, ledger: Ledger, chaos: Chaos | None, started: float) -> str:
    kills = dict(chaos.kills) if chaos else {}
    return (
        f"  {time.monotonic() - started:5.0f} s: {len(ledger.jobs)} jobs created, {len(stack.events.events)} events, "
        f"{len(ledger.writes)} document writes, {len(ledger.deletes)} delete rounds, kills {kills}, "
        f"proxy resets/cuts {stack.proxy.resets}/{stack.proxy.cuts}, violations {len(ledger.violations)}"
    )


def _load(stack: Stack, drivers: list[AvatarDriver], workers: int, minutes: float, seed: int, log: Log) -> Chaos:
    """Run the load and the chaos for `minutes`, then stop both (the workers keep running)."""
    stop_load, stop_chaos = threading.Event(), threading.Event()
    threads = [t for d in drivers for t in d.threads(stop_load)] + [Promoter(drivers, stop_load, seed)]
    chaos = Chaos(stack.workers, workers, stop_chaos, seed + 1)
    try:
        for t in [*threads, chaos]:
            t.start()
        started = time.monotonic()
        end = started + minutes * 60
        while time.monotonic() < end:
            time.sleep(min(PROGRESS_SECONDS, max(0.0, end - time.monotonic())))
            log(_progress(stack, drivers[0].ledger, chaos, started))
    finally:
        stop_load.set()
        for t in threads:
            t.join(180)
        stop_chaos.set()
        chaos.join(60)
    return chaos


def _settle(stack: Stack, drivers: list[AvatarDriver], workers: int, log: Log) -> dict[str, dict[str, Any]]:
    """Every job of every avatar, polled (GET settles abandoned ones) until all are final or
    SETTLE_SECONDS passed; K healthy workers are kept meanwhile."""
    views: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + SETTLE_SECONDS
    reported = time.monotonic()
    while True:
        stack.workers.keep(workers)
        stack.workers.reap()
        for d in drivers:
            for view in d.api.jobs():
                if view["status"] not in FINAL:
                    view = d.api.job(view["id"]) or view
                views[view["id"]] = {**view, "avatar": d.api.avatar}
        pending = [v["id"] for v in views.values() if v["status"] not in FINAL]
        if not pending or time.monotonic() > deadline:
            return views
        if time.monotonic() - reported > PROGRESS_SECONDS:
            reported = time.monotonic()
            log(f"  settling: {len(pending)} jobs not final yet ({', '.join(pending[:4])}...)")
        time.sleep(2)


def _probe(drivers: list[AvatarDriver], ledger: Ledger, seed: int) -> list[str]:
    """A new job on every avatar (the avatar is not locked); violations where none could be made."""
    violations = []
    rng = random.Random(seed)
    for d in drivers:
        if d.create_job("train", rng, probe=True) is None:
            violations.append(f"{d.api.avatar}: a new training job could not be created after the soak")
    return violations


def _await_events(stack: Stack, views: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The events received once every final job's final event is in (or EVENTS_SECONDS passed)."""
    deadline = time.monotonic() + EVENTS_SECONDS
    while time.monotonic() < deadline:
        seen = {(e["job_id"], e["event"]) for e in job_events(list(stack.events.events))}
        if all((job_id, f"job.{v['status']}") in seen for job_id, v in views.items() if v["status"] in FINAL):
            break
        time.sleep(1)
    time.sleep(3)  # a redelivery of an event in flight arrives too
    return list(stack.events.events)


def _document_stats(ledger: Ledger) -> dict[str, Any]:
    return {
        "document writes (PATCH / re-upload)": len(ledger.writes),
        "flags set true, acknowledged": len(ledger.flags_true()),
        "of them in flight during a delete-unused": len(ledger.raced_true()),
        "PATCHes that found the document deleted (404)": sum(1 for w in ledger.writes if w.gone),
        "delete-unused rounds": len(ledger.deletes),
        "documents deleted by them": sum(d.deleted or 0 for d in ledger.deletes),
        "true documents checked after the rounds": ledger.round_checks,
    }


def _responses(ledger: Ledger, op: str) -> dict[str, int]:
    return {status: n for (o, status), n in sorted(ledger.responses.items()) if o == op}


def _faults(stack: Stack, chaos: Chaos) -> dict[str, Any]:
    stack.workers.reap()
    graceful = [w.exited_after for w in stack.workers.all if w.exited_after is not None]
    return {
        "worker connections through the proxy": stack.proxy.connections,
        "connections reset": stack.proxy.resets,
        "connections cut before the answer": stack.proxy.cuts,
        "workers SIGKILLed": chaos.kills.get("SIGKILL", 0),
        "workers SIGTERMed": chaos.kills.get("SIGTERM", 0),
        "workers started": len(stack.workers.all),
        "slowest SIGTERM hand-back": secs(max(graceful)) if graceful else "n/a",
        **log_counts(stack.logs),
    }


def _unexpected_exits(stack: Stack) -> list[str]:
    return [
        f"worker {w.worker_id} exited with {w.proc.returncode} without being signalled (log {w.log})"
        for w in stack.workers.all
        if w.signalled is None and w.proc.poll() is not None
    ]


def _check(stack: Stack, drivers: list[AvatarDriver], ledger: Ledger, workers: int, seed: int, log: Log) -> dict:
    """After the load: settle, probe every avatar, settle again, and check every invariant."""
    t0 = time.monotonic()
    views = _settle(stack, drivers, workers, log)
    _await_events(stack, views)  # a job's tail frees its avatar's slot before its final event goes out
    avatars = [d.api.avatar for d in drivers]
    violations = {"avatars unlocked": pointer_violations(stack.s3, stack.bucket, avatars, views)}
    violations["avatars unlocked"] += _probe(drivers, ledger, seed)
    log(f"  all jobs final after {time.monotonic() - t0:.0f} s; probe jobs created, settling them")
    views = _settle(stack, drivers, workers, log)
    jobs, violations["jobs final"] = job_findings(views)
    missing = sorted(set(ledger.jobs) - set(views))
    violations["jobs final"] += [f"job {j} was created (202) but is not listed" for j in missing]
    events, violations["events"] = event_findings(_await_events(stack, views), views)
    for d in drivers:
        d.check_round("at the end")
    violations["documents flagged true kept"] = list(ledger.violations)
    trained = {v["avatar"] for v in views.values() if v["type"] == "train" and v["status"] == "succeeded"}
    adapters, violations["current adapter whole"] = adapter_findings(stack.s3, stack.bucket, avatars, trained)
    violations["API answers expected"] = list(ledger.unexpected)
    violations["workers alive"] = _unexpected_exits(stack)
    return {
        "jobs": jobs,
        "events": events,
        "adapters": adapters,
        "documents": _document_stats(ledger),
        "promotes": _responses(ledger, "promote"),
        "violations": violations,
        "settle_seconds": time.monotonic() - t0,
    }


def _log(message: str) -> None:
    print(message, flush=True)


def run(minutes: float, workers: int, users: int = 3, avatars: int = 2, seed: int = 1, log: Log = _log) -> dict:
    """Run the soak; its numbers and violations (by invariant)."""
    from trainer.tiny_model import write_tiny_model

    logs = Path(tempfile.mkdtemp(prefix="avatune-soak-"))
    started = time.monotonic()
    log(f"soak: {minutes} min, {workers} workers, {users} users x {avatars} avatars; logs in {logs}")
    model_dir = write_tiny_model(logs / "model")
    with running_stack(model_dir, logs) as stack:
        ledger = Ledger()
        drivers = _drivers(stack, ledger, users, avatars, seed)
        for d in drivers:
            d.setup()
        stack.workers.keep(workers)
        chaos = _load(stack, drivers, workers, minutes, seed, log)
        log(f"load stopped after {time.monotonic() - started:.0f} s; settling every job")
        result = _check(stack, drivers, ledger, workers, seed, log)
        result["faults"] = _faults(stack, chaos)
    result.update(
        minutes=minutes,
        workers=workers,
        users=users,
        avatars=avatars,
        seed=seed,
        logs=str(logs),
        total_seconds=time.monotonic() - started,
        machine=machine(),
        date=today(),
    )
    (logs / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return result


# -- the report -----------------------------------------------------------------------------


def _rows(d: dict[str, Any]) -> list[list[object]]:
    return [[k, ", ".join(f"{a}: {b}" for a, b in v.items()) if isinstance(v, dict) else v] for k, v in d.items()]


def markdown(result: dict[str, Any], command_line: str) -> str:
    violations: dict[str, list[str]] = result["violations"]
    total = sum(len(v) for v in violations.values())
    settings = ", ".join(
        f"{k}={WORKER_ENV[k]}"
        for k in (
            "HEARTBEAT_SECONDS",
            "LEASE_SECONDS",
            "VISIBILITY_TIMEOUT_SECONDS",
            "SQS_MAX_VISIBILITY_SECONDS",
            "CHECKPOINT_EVERY_STEPS",
        )
    )
    out = [
        "## 9. Fault soak",
        "",
        f"`python -m bench.soak` (`make soak`; not run by `make bench`): {result['minutes']} minutes of load through "
        f"the real API on {result['users']} users x {result['avatars']} avatars (training, fuse and generation jobs, "
        "cancels, concurrent promotes; delete-unused racing PATCHes to true and re-uploads on the first avatar of "
        f"each user, whose other avatar's documents stay as they are), {result['workers']} real trainer "
        f"workers on the tiny model ({settings}; STALE_LEASE_SECONDS={STALE_LEASE_SECONDS} on the API), reaching "
        f"moto through `infra.faulty_proxy` (every {FAULT_PLAN.reset_every}th new connection reset, every "
        f"{FAULT_PLAN.cut_every}th cut after the request), a random worker SIGKILLed or SIGTERMed every 10-30 s. "
        "Then K healthy workers run until every job is final, a probe job runs on every avatar, and the invariants "
        "are checked against S3 and the events queue (`bench/soak.py` says what each one means).",
        "",
        "| invariant | result |",
        "| --- | --- |",
    ]
    out += [f"| {name} | {'held' if not v else f'**{len(v)} violations**'} |" for name, v in violations.items()]
    out += ["", table(["faults injected and paths taken", ""], _rows(result["faults"]))]
    out += ["", table(["jobs", ""], _rows(result["jobs"]))]
    out += ["", table(["events", ""], _rows(result["events"]))]
    out += [
        "",
        table(
            ["documents and promotes", ""],
            _rows({**result["documents"], "promotes (HTTP status: count)": result["promotes"]}),
        ),
    ]
    out += ["", table(["adapters", ""], _rows(result["adapters"]))]
    out += ["", f"**{total} violations.**"]
    for name, found in violations.items():
        out += [f"- {name}: {v}" for v in found[:20]]
    out += [
        "",
        f"Load {result['minutes']} min; settling, probes and checks {secs(result['settle_seconds'])}; "
        f"the whole run {secs(result['total_seconds'])}.",
        f"Machine: {result['machine']}. Date: {result['date']}. Reproduce: `{command_line}`.",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    from bench.__main__ import BENCHMARKS, write_section

    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=6.0, help="how long the load runs (default 6)")
    p.add_argument("--workers", type=int, default=2, help="trainer workers kept running (default 2)")
    p.add_argument("--users", type=int, default=3)
    p.add_argument("--avatars", type=int, default=2, help="avatars per user")
    p.add_argument("--seed", type=int, default=1, help="seeds the driver's and the chaos' choices")
    p.add_argument("--output", type=Path, default=BENCHMARKS)
    p.add_argument("--no-write", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    args = p.parse_args(argv)
    result = run(args.minutes, args.workers, args.users, args.avatars, args.seed)
    command_line = "python -m bench.soak " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(result, command_line.strip())
    print(text)
    if not args.no_write:
        write_section(SECTION, text, args.output)
        print(f"soak: wrote section {SECTION} of {args.output}")
    total = sum(len(v) for v in result["violations"].values())
    print(f"soak: {total} violations; logs in {result['logs']}")
    sys.exit(1 if total else 0)


if __name__ == "__main__":
    main()
