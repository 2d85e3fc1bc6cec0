"""The fault soak's stack (`bench.soak`): moto in server mode, the faulty proxy the workers reach
it through, a real API server, real trainer workers that can be killed and replaced, and a
drain that records every event published on the events queue.

Only the workers go through the proxy: the faults under test are the trainer's (S3 and SQS
calls reset or cut mid-request), while the API, the driver and the checks talk to moto
directly, so what they read is what S3 and SQS hold.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3

from bench.common import PY, ROOT, ready_process
from infra.bootstrap import StackNames, bootstrap
from infra.faulty_proxy import FaultPlan, FaultyProxy
from infra.processes import api_server

# The API gives a job back to the queue once its lease expired this long ago (the tests' value
# is 900 s; small here so that abandoned jobs are met during the soak).
STALE_LEASE_SECONDS = 20
MAX_JOB_ATTEMPTS = 3

# Short heartbeat, lease and visibility settings, and an SQS visibility cap of 15 s so that
# every job longer than about 12 s hands its message over (trainer.runtime.heartbeat).
WORKER_ENV = {
    "HEARTBEAT_SECONDS": "1",
    "PROGRESS_INTERVAL_SECONDS": "0.5",
    "VISIBILITY_TIMEOUT_SECONDS": "4",
    "LEASE_SECONDS": "4",
    "SQS_MAX_VISIBILITY_SECONDS": "15",
    "CHECKPOINT_EVERY_STEPS": "5",
    "DEAD_LETTER_SWEEP_SECONDS": "5",
    "TORCH_THREADS": "1",
    "METRICS_PORT": "0",
    "EVAL_FRACTION": "0.1",
    "SAMPLE_PROMPTS": "1",
    "SAMPLE_MAX_NEW_TOKENS": "8",
    "ADAPTER_KEEP_VERSIONS": "3",
}

# Every 5th new connection of a worker is reset at once, every 7th dropped after the request
# went out and before any answer came back (the write may or may not have happened).
FAULT_PLAN = FaultPlan(reset_every=5, cut_every=7)

# SIGTERM asks a worker to hand its job back; the deployment waits this long before SIGKILL.
GRACE_SECONDS = 120


@dataclass
class WorkerProcess:
    proc: subprocess.Popen
    worker_id: str
    log: Path
    signalled: int | None = None  # the signal chaos sent it
    signalled_at: float = 0.0
    exited_after: float | None = None  # seconds from a SIGTERM to its exit


@dataclass
class Workers:
    """Trainer worker processes (`python -m trainer`), started and killed by the soak."""

    env: dict[str, str]
    logs: Path
    all: list[WorkerProcess] = field(default_factory=list)
    closed: bool = False  # stop_all was called: nothing starts any more
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> WorkerProcess | None:
        with self._lock:
            if self.closed:
                return None
            n = len(self.all)
            worker_id = f"soak-w{n}-{uuid.uuid4().hex[:6]}"
            log = self.logs / f"worker-{n}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    [PY, "-m", "trainer"],
                    cwd=ROOT,
                    env={**self.env, "WORKER_ID": worker_id},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            worker = WorkerProcess(proc, worker_id, log)
            self.all.append(worker)
            return worker

    def healthy(self) -> list[WorkerProcess]:
        """Running workers nobody asked to stop."""
        return [w for w in self.all if w.signalled is None and w.proc.poll() is None]

    def keep(self, count: int) -> int:
        """Start workers until `count` are healthy (replacing any that died); how many started."""
        started = 0
        while len(self.healthy()) < count and self.start() is not None:
            started += 1
        return started

    def kill(self, worker: WorkerProcess, sig: int) -> None:
        worker.signalled = sig
        worker.signalled_at = time.monotonic()
        worker.proc.send_signal(sig)

    def reap(self) -> None:
        """Note when SIGTERMed workers exited (their graceful hand-back time)."""
        for w in self.all:
            if w.signalled == signal.SIGTERM and w.exited_after is None and w.proc.poll() is not None:
                w.exited_after = time.monotonic() - w.signalled_at

    def stop_all(self) -> None:
        """SIGTERM every worker; SIGKILL those still running after GRACE_SECONDS."""
        with self._lock:
            self.closed = True
        for w in self.all:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + GRACE_SECONDS
        for w in self.all:
            try:
                w.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()


class EventDrain(threading.Thread):
    """Receives (and deletes) every message of the events queue from the start, keeping each
    event with its SQS message id, so the checks see every delivery, duplicates included."""

    def __init__(self, sqs: Any, queue_url: str) -> None:
        super().__init__(daemon=True, name="event-drain")
        self._sqs = sqs
        self._url = queue_url
        self._halt = threading.Event()
        self.events: list[dict[str, Any]] = []
        self.message_ids: list[str] = []
        self.errors = 0

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.drain_once(wait=1)
            except Exception:  # moto busy: try again; a message left unread is read next time
                self.errors += 1
                time.sleep(0.5)

    def drain_once(self, wait: int = 0) -> int:
        resp = self._sqs.receive_message(QueueUrl=self._url, MaxNumberOfMessages=10, WaitTimeSeconds=wait)
        messages = resp.get("Messages", [])
        for m in messages:
            self.events.append(json.loads(m["Body"]))
            self.message_ids.append(m["MessageId"])
            self._sqs.delete_message(QueueUrl=self._url, ReceiptHandle=m["ReceiptHandle"])
        return len(messages)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


@dataclass
class Stack:
    api_url: str
    secret: str
    bucket: str
    names: StackNames
    env: dict[str, str]
    proxy: FaultyProxy
    workers: Workers
    events: EventDrain
    logs: Path

    @property
    def s3(self) -> Any:
        return boto3.client("s3")

    def worker_logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("worker-*.log")))


@contextmanager
def _aws_environment(endpoint: str, bucket: str) -> Iterator[None]:
    """Point this process's boto3 clients (the checks, the event drain, bootstrap) at moto."""
    saved = dict(os.environ)
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="soak",
        AWS_SECRET_ACCESS_KEY="soak",
        AWS_DEFAULT_REGION="us-east-1",
        S3_BUCKET=bucket,
    )
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextmanager
def running_stack(model_dir: Path, logs: Path) -> Iterator[Stack]:
    """moto, the bootstrapped bucket and queues, the faulty proxy, the API and the event drain;
    workers are started by the caller (`stack.workers.keep(k)`) and stopped on the way out."""
    suffix = uuid.uuid4().hex[:6]
    names = StackNames(bucket="avatune-soak", train_queue=f"soak-{suffix}.fifo", events_queue=f"soak-{suffix}-events")
    secret = secrets.token_urlsafe(48)
    with ExitStack() as stack:
        base_env = {k: v for k, v in os.environ.items() if k != "DEV_MODE"}
        _, moto_port = stack.enter_context(
            ready_process([PY, "-m", "bench.moto_server"], env=base_env, stdin=True, log=logs / "moto.log")
        )
        endpoint = f"http://127.0.0.1:{moto_port}"
        stack.enter_context(_aws_environment(endpoint, names.bucket))
        urls = bootstrap(names, endpoint_url=endpoint)
        env = dict(
            os.environ,
            TRAIN_QUEUE_NAME=names.train_queue,
            EVENTS_QUEUE_NAME=names.events_queue,
            BASE_MODEL=str(model_dir),
            AUTH_JWT_SECRET=secret,
            STALE_LEASE_SECONDS=str(STALE_LEASE_SECONDS),
            MAX_JOB_ATTEMPTS=str(MAX_JOB_ATTEMPTS),
            MAX_ACTIVE_JOBS_PER_USER="4",
        )
        proxy = FaultyProxy(moto_port, FAULT_PLAN).start()
        stack.callback(proxy.stop)
        api_url = stack.enter_context(api_server(env, logs / "api.log"))
        workers = Workers({**env, **WORKER_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}, logs)
        stack.callback(workers.stop_all)
        events = EventDrain(boto3.client("sqs"), urls["events_queue_url"])
        events.start()
        stack.callback(events.stop)
        yield Stack(api_url, secret, names.bucket, names, env, proxy, workers, events, logs)
