"""The local events consumer (`python -m infra.events_consumer`, what `make dev` runs in place
of the events Lambda) and the local receiver (`avatune webhooks listen`), as real processes
against moto: a final event reaches the listener signed and with the job's header, a
`job.started` event is consumed without a delivery, and a poison message is left for SQS to
redeliver until it lands in the dead-letter queue."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from contracts.jobs import JobRecord
from contracts.keys import job_key
from contracts.messages import JobEvent
from contracts.sealing import DEV_SEAL_KEY, LocalSealer, job_context, seal_callbacks
from contracts.spec import Callbacks, JobSpec
from contracts.webhooks import signature_header
from tests.conftest import ROOT, TEST_BUCKET, free_port, stop, wait_http

SECRET = "whsec-" + uuid.uuid4().hex


@pytest.fixture
def events_queue(sqs) -> Iterator[tuple[str, str, str]]:
    """(name, url, dlq url) of a private events queue: 1 s visibility, dead-lettered after 2 receives."""
    name = f"avatune-test-events-{uuid.uuid4().hex[:8]}"
    dlq_url = sqs.create_queue(QueueName=name + "-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    url = sqs.create_queue(
        QueueName=name,
        Attributes={
            "VisibilityTimeout": "1",
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "2"}),
        },
    )["QueueUrl"]
    yield name, url, dlq_url
    sqs.delete_queue(QueueUrl=url)
    sqs.delete_queue(QueueUrl=dlq_url)


def listener(tmp_path: Path, port: int, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "webhooks", "listen", "--port", str(port), *args],
        cwd=ROOT,
        stdout=open(tmp_path / f"listen-{port}.out", "wb"),
        stderr=subprocess.STDOUT,
        env=dict(os.environ, COLUMNS="200"),
    )
    wait_http(f"http://127.0.0.1:{port}/", proc)
    return proc


def finished_job(s3, webhook_url: str, auth_header: str) -> JobRecord:
    user, avatar, job_id = "u-" + uuid.uuid4().hex[:10], "avatar-1", f"job-{uuid.uuid4().hex[:12]}-0a1b2c3d"
    callbacks = Callbacks(webhook_url=webhook_url, allow_private=True, auth_header=auth_header)
    spec = seal_callbacks(JobSpec(callbacks=callbacks), LocalSealer(DEV_SEAL_KEY), job_context(user, avatar, job_id))
    record = JobRecord(id=job_id, user_id=user, avatar_id=avatar, status="succeeded", spec=spec, adapter_version=3)
    s3.put_object(Bucket=TEST_BUCKET, Key=job_key(user, avatar, job_id), Body=record.to_json())
    return record


def event(record: JobRecord, name: str, status: str) -> str:
    return JobEvent(
        event=name,
        job_id=record.id,
        user_id=record.user_id,
        avatar_id=record.avatar_id,
        status=status,
        adapter_version=3,
    ).to_message_body()


def wait_until(check, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_consumer_delivers_final_events_and_dead_letters_poison(s3, sqs, events_queue, tmp_path: Path) -> None:
    name, url, dlq_url = events_queue
    port = free_port()
    listen = listener(tmp_path, port, "--secret", SECRET, "--count", "1")
    header = "Token whk-" + uuid.uuid4().hex
    record = finished_job(s3, f"http://127.0.0.1:{port}/hook", header)
    sqs.send_message(QueueUrl=url, MessageBody=event(record, "job.started", "running"))  # consumed, never delivered
    sqs.send_message(QueueUrl=url, MessageBody="{not json")
    sqs.send_message(QueueUrl=url, MessageBody=event(record, "job.succeeded", "succeeded"))

    log = tmp_path / "consumer.log"
    consumer = subprocess.Popen(
        [sys.executable, "-m", "infra.events_consumer"],
        cwd=ROOT,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        env=dict(
            os.environ,
            EVENTS_QUEUE_NAME=name,
            DEV_MODE="true",
            WEBHOOK_SIGNING_SECRET=SECRET,
            WEBHOOK_ALLOW_PRIVATE="true",
            WEBHOOK_BACKOFF_SECONDS="0.01",
        ),
    )
    try:
        assert listen.wait(60) == 0  # one delivery, its signature held
        out = (tmp_path / f"listen-{port}.out").read_text()
        assert f"job.succeeded job {record.id} status succeeded version 3" in out, out
        assert "[signature ok]" in out and "authorization: present" in out and header not in out

        def dead_lettered() -> list[dict]:
            return sqs.receive_message(QueueUrl=dlq_url, WaitTimeSeconds=1).get("Messages", [])

        poison: list[dict] = []
        wait_until(lambda: bool(poison.extend(dead_lettered()) or poison))
        assert [m["Body"] for m in poison] == ["{not json"]
    finally:
        stop(consumer)
        stop(listen)
    # The two good messages were deleted: nothing is left on the queue, visible or in flight.
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert (attrs["ApproximateNumberOfMessages"], attrs["ApproximateNumberOfMessagesNotVisible"]) == ("0", "0")
    text = log.read_text()
    assert "malformed job event" in text and header not in text


def test_listener_refuses_a_bad_signature(tmp_path: Path) -> None:
    port = free_port()
    listen = listener(tmp_path, port, "--secret", SECRET, "--count", "2")
    body = json.dumps({"event": "job.failed", "job_id": "job-1", "status": "failed", "error": "boom"}).encode()
    try:
        good = httpx.post(
            f"http://127.0.0.1:{port}/hook", content=body, headers={"Avatune-Signature": signature_header(SECRET, body)}
        )
        forged = hmac.new(b"other", b"0." + body, hashlib.sha256).hexdigest()
        bad = httpx.post(
            f"http://127.0.0.1:{port}/hook",
            content=body,
            headers={"Avatune-Signature": f"t={int(time.time())},v1={forged}"},
        )
        assert (good.status_code, bad.status_code) == (200, 401)
        assert listen.wait(30) == 1  # exits non-zero: a delivery did not verify
    finally:
        stop(listen)
    out = (tmp_path / f"listen-{port}.out").read_text()
    assert "[signature ok]" in out and "[signature INVALID]" in out and "error 'boom'" in out
