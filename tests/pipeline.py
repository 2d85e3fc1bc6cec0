"""Fixtures' helpers for end-to-end tests: an API server and real trainer processes sharing a
pair of queues of their own (so no other test's messages are consumed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3

from contracts.keys import checkpoint_prefix
from contracts.messages import QueueRequest
from infra.bootstrap import StackNames, bootstrap
from tests.conftest import ROOT, TEST_BUCKET, Api, free_port, keys_under, wait_http

WORKER_ENV = {
    "HEARTBEAT_SECONDS": "1",
    "PROGRESS_INTERVAL_SECONDS": "0.5",
    "VISIBILITY_TIMEOUT_SECONDS": "4",
    "LEASE_SECONDS": "4",
    "CHECKPOINT_EVERY_STEPS": "5",
    "TORCH_THREADS": "1",
    "EVAL_FRACTION": "0.1",
    "METRICS_PORT": "0",
}


def chat_document(n: int = 40, seed: str = "") -> bytes:
    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"{seed}question {i}: how are you?"},
                    {"role": "assistant", "content": f"{seed}answer {i}: great, thanks for asking"},
                ]
            }
        )
        for i in range(n)
    ]
    return ("\n".join(lines) + "\n").encode()


def prompt(i: int, seed: str = "") -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{seed}question {i}: how are you?"}]


def pairs(n: int = 16) -> list[dict]:
    """Chosen and rejected replies of about the same length, so neither wins by length."""
    return [
        {
            "prompt": prompt(i),
            "chosen": [{"role": "assistant", "content": f"great, thanks for asking {i}"}],
            "rejected": [{"role": "assistant", "content": f"leave me alone now {i}"}],
        }
        for i in range(n)
    ]


def jsonl(records: list[dict]) -> bytes:
    return ("\n".join(json.dumps(r) for r in records) + "\n").encode()


@dataclass
class Pipeline:
    api_url: str
    env: dict[str, str]
    train_queue_url: str
    events_queue_url: str
    train_dlq_url: str
    logs: Path
    workers: list[subprocess.Popen] = field(default_factory=list)
    seen_events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def sqs(self) -> Any:
        return boto3.client("sqs")

    def client(self, avatar_id: str = "avatar-1") -> Api:
        return Api(self.api_url, "u-" + uuid.uuid4().hex[:10], avatar_id)

    def start_worker(self, **extra: str) -> subprocess.Popen:
        log = open(self.logs / f"worker-{len(self.workers)}.log", "wb")
        env = {**self.env, **WORKER_ENV, "WORKER_ID": f"w{len(self.workers)}-{uuid.uuid4().hex[:6]}", **extra}
        proc = subprocess.Popen(
            [sys.executable, "-m", "trainer"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        self.workers.append(proc)
        return proc

    def trainers_alive(self) -> bool:
        return any(p.poll() is None for p in self.workers if "trainer" in p.args)

    def stop_workers(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def events_for(self, job_id: str) -> list[str]:
        """Event types published for a job so far (drains the events queue into `seen_events`)."""
        while True:
            resp = self.sqs.receive_message(QueueUrl=self.events_queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0)
            messages = resp.get("Messages", [])
            if not messages:
                break
            for m in messages:
                self.seen_events.append(json.loads(m["Body"]))
                self.sqs.delete_message(QueueUrl=self.events_queue_url, ReceiptHandle=m["ReceiptHandle"])
        return [e["event"] for e in self.seen_events if e.get("job_id") == job_id]

    def adapter_events(self, avatar_id: str) -> list[dict[str, Any]]:
        """The `adapter.promoted` events of an avatar seen so far (drains the events queue)."""
        self.events_for("")
        return [e for e in self.seen_events if e["event"] == "adapter.promoted" and e["avatar_id"] == avatar_id]

    def wait_events(self, job_id: str, final: str, timeout: float = 30) -> list[str]:
        """Event types of a job once `final` has arrived (events follow the record's update)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events = self.events_for(job_id)
            if final in events:
                return events
            time.sleep(0.2)
        return self.events_for(job_id)

    def send(self, request: QueueRequest) -> str:
        """A request straight on the train queue, as another service sends it; its job id."""
        self.sqs.send_message(
            QueueUrl=self.train_queue_url,
            MessageBody=request.to_message_body(),
            MessageGroupId=request.message_group_id(),
            MessageDeduplicationId=request.job_id,
        )
        return request.job_id

    def worker_log(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-4000:] for p in sorted(self.logs.glob("worker-*.log")))


def wait_for_job(
    api: Api, job_id: str, until: set[str], timeout: float = 180, pipeline: Pipeline | None = None, condition=None
) -> tuple[dict[str, Any], list[str]]:
    """Poll the job until its status is in `until` (and `condition(job)` holds); returns it and
    the statuses seen on the way."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.get(f"{api.base}/training-jobs/{job_id}").json()
        if not seen or seen[-1] != job["status"]:
            seen.append(job["status"])
        if job["status"] in until and (condition is None or condition(job)):
            return job, seen
        if pipeline is not None and not pipeline.trainers_alive():
            raise RuntimeError(f"every trainer worker has exited; job {job_id} is {seen}\n{pipeline.worker_log()}")
        time.sleep(0.1)
    logs = pipeline.worker_log() if pipeline else ""
    raise TimeoutError(f"job {job_id} stuck in {seen}\n{logs}")


def wait_for_checkpoint(pipeline: Pipeline, api: Api, job_id: str, s3: Any, min_step: int = 12) -> None:
    """Wait until the running job is past `min_step` and has a complete checkpoint in S3."""
    wait_for_job(api, job_id, {"running"}, pipeline=pipeline, condition=lambda j: j["progress"]["step"] >= min_step)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(k.endswith("/_COMPLETE") for k in keys_under(s3, checkpoint_prefix(api.user_id, api.avatar_id, job_id))):
            return
        time.sleep(0.2)
    raise TimeoutError("no checkpoint was written\n" + pipeline.worker_log())


def train_through_api(pipeline: Pipeline, api: Api, body: dict[str, Any]) -> dict[str, Any]:
    """Queue a training job through the API and wait for it to succeed; the finished job."""
    r = api.post(f"{api.base}/training-jobs", json=body)
    assert r.status_code == 202, r.text
    done, _ = wait_for_job(api, r.json()["id"], {"succeeded", "failed"}, pipeline=pipeline)
    assert done["status"] == "succeeded", done
    return done


def start_pipeline(
    tmp: Path, model_dir: Path, env: dict[str, str] | None = None, api_env: dict[str, str] | None = None
) -> Pipeline:
    """Queues of their own, and an API server on them: `env` over the process's own for the
    server and (through `start_worker`) the workers, `api_env` for the server alone."""
    suffix = uuid.uuid4().hex[:8]
    names = StackNames(bucket=TEST_BUCKET, train_queue=f"e2e-{suffix}.fifo", events_queue=f"e2e-{suffix}-events")
    urls = bootstrap(names)
    env = dict(
        os.environ,
        TRAIN_QUEUE_NAME=names.train_queue,
        EVENTS_QUEUE_NAME=names.events_queue,
        BASE_MODEL=str(model_dir),
        MAX_ACTIVE_JOBS_PER_USER="4",
        **(env or {}),
    )
    api_environment = {**env, **(api_env or {})}
    port = free_port()
    api_log = open(tmp / "api.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "handlers.app:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=api_environment,
        stdout=api_log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthz", proc)
    dlq = boto3.client("sqs").get_queue_url(QueueName=names.train_dlq)["QueueUrl"]
    pipeline = Pipeline(url, env, urls["train_queue_url"], urls["events_queue_url"], dlq, tmp)
    pipeline.workers.append(proc)  # stopped with the workers
    return pipeline
