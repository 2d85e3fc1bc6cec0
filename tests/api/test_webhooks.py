"""Webhooks: a job's final event reaches its `callbacks.webhook_url`, signed, with the job's
`auth_header` (sealed at rest with KMS on moto, or a local Fernet key), retried after a 5xx,
refused for non-public addresses (SSRF), and the header never in plain text in a log line, an
S3 object, a queue message or an API response.

The receiver is a real HTTP server in a thread; events come from a real worker through the
events queue and are handed to `handlers.events_handler.handler` as Lambda hands SQS batches.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest

from contracts.job_kinds import parse_train_queue_message, record_of
from contracts.jobs import JobRecord
from contracts.keys import job_key
from contracts.messages import TRAIN_REQUEST_SCHEMA, InvalidMessage, JobEvent, TrainRequest
from contracts.sealing import (
    DEV_SEAL_KEY,
    KmsSealer,
    LocalSealer,
    SealError,
    SealingUnavailable,
    job_context,
    seal_callbacks,
    sealer_from_env,
)
from contracts.spec import Callbacks, JobSpec
from contracts.webhooks import MASKED_SECRET, check_webhook_url, is_public_address, literal_ip, verify_signature
from handlers import webhooks
from handlers.events_handler import handler
from tests.conftest import TEST_BUCKET, keys_under
from tests.pipeline import Pipeline, chat_document, start_pipeline, wait_for_job

FAST = {"num_epochs": 1, "batch_size": 4, "learning_rate": 0.01, "r": 4}
SIGNING_ENV = "WEBHOOK_SIGNING_SECRET_TESTS"
SIGNING_SECRET = "whsec-" + uuid.uuid4().hex


# --------------------------------------------------------------------------------------------
# fixtures: a KMS key on moto, a pipeline sealing with it, a receiver
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kms_key(stack) -> str:
    return boto3.client("kms").create_key(Description="avatune webhook tests")["KeyMetadata"]["Arn"]


@pytest.fixture(scope="module")
def sealing_pipeline(stack, kms_key: str, tiny_model_dir: Path, tmp_path_factory) -> Iterator[Pipeline]:
    """API + worker sealing callbacks.auth_header with the moto KMS key."""
    saved = {k: os.environ.get(k) for k in ("CALLBACK_SEALER", "CALLBACK_KMS_KEY_ID")}
    os.environ.update(CALLBACK_SEALER="kms", CALLBACK_KMS_KEY_ID=kms_key)
    try:
        p = start_pipeline(tmp_path_factory.mktemp("webhooks"), tiny_model_dir)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        yield p
    finally:
        p.stop_workers()


class Receiver:
    """A webhook receiver: records every request; answers each path's scripted statuses in turn
    (then 200)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.script: dict[str, list[int]] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.requests.append({"path": self.path, "headers": dict(self.headers.items()), "body": body})
                queue = receiver.script.get(self.path) or []
                status = queue.pop(0) if queue else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def to(self, path: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"] == path]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture
def events_env(monkeypatch, kms_key: str) -> None:
    """The events function's environment (as the template sets it, plus private targets allowed
    for this local receiver); the cached deliverer is rebuilt from it."""
    monkeypatch.setenv("S3_BUCKET", TEST_BUCKET)
    monkeypatch.setenv("CALLBACK_SEALER", "kms")
    monkeypatch.setenv("CALLBACK_KMS_KEY_ID", kms_key)
    monkeypatch.setenv(SIGNING_ENV, SIGNING_SECRET)
    monkeypatch.setenv("WEBHOOK_ALLOW_PRIVATE", "true")
    monkeypatch.setenv("WEBHOOK_BACKOFF_SECONDS", "0.01")
    monkeypatch.setenv("WEBHOOK_TIMEOUT_SECONDS", "5")
    webhooks.reset()
    yield
    webhooks.reset()


def sqs_record(body: str, message_id: str | None = None) -> dict:
    return {
        "messageId": message_id or str(uuid.uuid4()),
        "receiptHandle": "rh-" + uuid.uuid4().hex,
        "body": body,
        "attributes": {"ApproximateReceiveCount": "1"},
        "messageAttributes": {},
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:avatune-events",
        "awsRegion": "us-east-1",
    }


def secret_header() -> str:
    # Not "Bearer ...": the log formatter masks bearer tokens, which would hide a leak from this test.
    return "Token whk-" + uuid.uuid4().hex


def finished_job(s3, callbacks: dict[str, Any], sealer=None, status: str = "succeeded") -> JobRecord:
    """A finished job's record in S3 with these callbacks (auth_header sealed as the API does)."""
    user, avatar, job_id = "u-" + uuid.uuid4().hex[:10], "avatar-1", f"job-{uuid.uuid4().hex[:12]}-0a1b2c3d"
    spec = seal_callbacks(JobSpec(callbacks=Callbacks(**callbacks)), sealer, job_context(user, avatar, job_id))
    record = JobRecord(id=job_id, user_id=user, avatar_id=avatar, status=status, spec=spec, adapter_version=1)
    s3.put_object(Bucket=TEST_BUCKET, Key=job_key(user, avatar, job_id), Body=record.to_json())
    return record


def final_event(record: JobRecord, event: str = "job.succeeded") -> JobEvent:
    status = event.removeprefix("job.")
    return JobEvent(
        event=event,
        job_id=record.id,
        user_id=record.user_id,
        avatar_id=record.avatar_id,
        status=status,
        adapter_version=record.adapter_version,
    )


def all_logs(caplog, pipeline: Pipeline) -> str:
    files = "\n".join(p.read_text(errors="replace") for p in sorted(pipeline.logs.glob("*.log")))
    return caplog.text + "\n" + files


def objects_text(s3, prefix: str) -> str:
    return "\n".join(
        s3.get_object(Bucket=TEST_BUCKET, Key=k)["Body"].read().decode("latin-1") for k in keys_under(s3, prefix)
    )


# --------------------------------------------------------------------------------------------
# end to end: API -> trainer -> events queue -> events handler -> receiver
# --------------------------------------------------------------------------------------------


def test_final_event_reaches_the_webhook_signed_with_the_jobs_header(
    sealing_pipeline: Pipeline, receiver: Receiver, events_env, s3, caplog
) -> None:
    caplog.set_level(logging.INFO)
    pipeline = sealing_pipeline
    header = secret_header()
    api = pipeline.client()
    assert api.put_doc("chat.jsonl", chat_document()).status_code == 201
    hook = f"/hook/{uuid.uuid4().hex}"
    body = {
        **FAST,
        "callbacks": {
            "webhook_url": receiver.url(hook),
            "auth_header": header,
            "allow_private": True,
            "signing_secret_ref": SIGNING_ENV,
        },
    }
    r = api.post(f"{api.base}/training-jobs", json=body)
    assert r.status_code == 202, r.text
    assert header not in r.text and "auth_header" not in r.text
    job_id = r.json()["id"]
    assert r.json()["spec"]["callbacks"] == {
        "webhook_url": receiver.url(hook),
        "allow_private": True,
        "signing_secret_ref": SIGNING_ENV,
    }

    # The train request on the queue carries the sealed header only (peeked before any worker runs).
    sqs = pipeline.sqs
    messages = sqs.receive_message(QueueUrl=pipeline.train_queue_url, MaxNumberOfMessages=1, WaitTimeSeconds=5).get(
        "Messages", []
    )
    assert messages, "the train request was not queued"
    sqs.change_message_visibility(
        QueueUrl=pipeline.train_queue_url, ReceiptHandle=messages[0]["ReceiptHandle"], VisibilityTimeout=0
    )
    queued = json.loads(messages[0]["Body"])
    assert queued["job_id"] == job_id
    assert header not in messages[0]["Body"] and MASKED_SECRET not in messages[0]["Body"]
    assert queued["callbacks"]["auth_header"] is None and queued["callbacks"]["auth_header_sealed"].startswith(
        "kms:v1:"
    )

    pipeline.start_worker()
    done, _ = wait_for_job(api, job_id, {"succeeded", "failed"}, pipeline=pipeline)
    assert done["status"] == "succeeded", done
    events = pipeline.wait_events(job_id, "job.succeeded")
    assert events == ["job.started", "job.succeeded"]
    bodies = [json.dumps(e) for e in pipeline.seen_events if e["job_id"] == job_id]

    response = handler({"Records": [sqs_record(b) for b in bodies]}, None)

    assert response == {"batchItemFailures": []}
    got = receiver.to(hook)
    assert len(got) == 1, "only the final event is delivered"
    request = got[0]
    headers = {k.lower(): v for k, v in request["headers"].items()}
    assert headers["authorization"] == header
    assert verify_signature(SIGNING_SECRET, headers["avatune-signature"], request["body"])
    assert not verify_signature("another-secret", headers["avatune-signature"], request["body"])
    assert not verify_signature(SIGNING_SECRET, headers["avatune-signature"], request["body"] + b" ")
    assert headers["avatune-event-id"] == f"{job_id}:job.succeeded"
    assert headers["content-type"] == "application/json"
    delivered = json.loads(request["body"])
    assert delivered["event"] == "job.succeeded" and delivered["job_id"] == job_id
    assert delivered["adapter_version"] == done["adapter_version"]

    # The record holds the KMS-sealed value; nothing shows the header in plain text.
    record = JobRecord.model_validate_json(
        s3.get_object(Bucket=TEST_BUCKET, Key=job_key(api.user_id, api.avatar_id, job_id))["Body"].read()
    )
    assert record.spec.callbacks is not None and record.spec.callbacks.auth_header is None
    assert record.spec.callbacks.auth_header_sealed.startswith("kms:v1:")
    shown = api.get(f"{api.base}/training-jobs/{job_id}")
    assert shown.status_code == 200 and header not in shown.text and "auth_header" not in shown.text
    listed = api.get(f"{api.base}/training-jobs")
    assert header not in listed.text and "auth_header" not in listed.text
    assert header not in objects_text(s3, f"users/{api.user_id}/")
    logs = all_logs(caplog, pipeline)
    assert "webhook delivered" in logs  # the capture works: the delivery's own line is there
    assert header not in logs and header.split()[-1] not in logs


def test_api_refuses_bad_webhook_targets(sealing_pipeline: Pipeline, s3) -> None:
    api = sealing_pipeline.client()
    assert api.put_doc("chat.jsonl", chat_document(8)).status_code == 201
    for url, why in [
        ("ftp://hooks.example.com/x", "http"),
        ("http://10.1.2.3/hook", "non-public"),
        ("http://[::ffff:127.0.0.1]:8080/", "non-public"),
        ("http://169.254.169.254/latest", "non-public"),
        ("https://user:pw@hooks.example.com/", "credentials"),
    ]:
        r = api.post(f"{api.base}/training-jobs", json={**FAST, "callbacks": {"webhook_url": url}})
        assert r.status_code == 422, (url, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert why in r.json()["detail"], r.json()
    r = api.post(
        f"{api.base}/training-jobs",
        json={**FAST, "callbacks": {"webhook_url": "https://hooks.example.com/x", "auth_header": MASKED_SECRET}},
    )
    assert r.status_code == 422 and "masked" in r.json()["detail"], r.text
    r = api.post(
        f"{api.base}/training-jobs",
        json={
            **FAST,
            "callbacks": {"webhook_url": "https://hooks.example.com/x", "signing_secret_ref": "AWS_SECRET_ACCESS_KEY"},
        },
    )
    assert r.status_code == 422, r.text
    assert api.get(f"{api.base}/training-jobs").json()["items"] == []
    assert keys_under(s3, f"users/{api.user_id}/avatars/{api.avatar_id}/adapters/jobs/") == []


def test_api_without_a_sealer_refuses_an_auth_header(api) -> None:
    """The session's API has no CALLBACK_SEALER: a header it cannot encrypt is not stored."""
    assert api.put_doc("chat.jsonl", chat_document(8)).status_code == 201
    header = secret_header()
    r = api.post(
        f"{api.base}/training-jobs",
        json={**FAST, "callbacks": {"webhook_url": "https://hooks.example.com/x", "auth_header": header}},
    )
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "callbacks.auth_header" and header not in r.text
    assert api.get(f"{api.base}/training-jobs").json()["items"] == []


# --------------------------------------------------------------------------------------------
# the events handler on records in S3: retries, refusals, partial batches
# --------------------------------------------------------------------------------------------


def test_a_500_is_retried_and_then_delivered(receiver: Receiver, events_env, kms_key, s3) -> None:
    hook = f"/flaky/{uuid.uuid4().hex}"
    receiver.script[hook] = [500, 429]
    header = secret_header()
    record = finished_job(
        s3, {"webhook_url": receiver.url(hook), "auth_header": header, "allow_private": True}, KmsSealer(kms_key)
    )
    event = final_event(record, "job.failed")
    response = handler({"Records": [sqs_record(event.to_message_body(), "m1")]}, None)
    assert response == {"batchItemFailures": []}
    got = receiver.to(hook)
    assert len(got) == 3
    assert {r["headers"]["Avatune-Event-Id"] for r in got} == {f"{record.id}:job.failed"}
    assert all(r["headers"]["Authorization"] == header and r["body"] == got[0]["body"] for r in got)
    # no signing_secret_ref and no WEBHOOK_SIGNING_SECRET: unsigned
    assert all("Avatune-Signature" not in r["headers"] for r in got)


def test_a_receiver_still_failing_fails_only_its_record(receiver: Receiver, events_env, kms_key, s3, caplog) -> None:
    caplog.set_level(logging.INFO)
    ok_hook, down_hook, refusing_hook = (f"/{name}/{uuid.uuid4().hex}" for name in ("ok", "down", "refusing"))
    receiver.script[down_hook] = [503] * 10
    receiver.script[refusing_hook] = [404]
    sealer = KmsSealer(kms_key)
    ok = finished_job(
        s3, {"webhook_url": receiver.url(ok_hook), "allow_private": True, "signing_secret_ref": SIGNING_ENV}, sealer
    )
    down = finished_job(s3, {"webhook_url": receiver.url(down_hook), "allow_private": True}, sealer)
    refusing = finished_job(s3, {"webhook_url": receiver.url(refusing_hook), "allow_private": True}, sealer)
    no_hook = finished_job(s3, {}, sealer)
    records = [
        sqs_record(final_event(ok).to_message_body(), "ok"),
        sqs_record(final_event(down, "job.cancelled").to_message_body(), "down"),
        sqs_record("{not json", "malformed"),
        sqs_record(final_event(refusing).to_message_body(), "refusing"),
        sqs_record(final_event(no_hook).to_message_body(), "no-hook"),
    ]
    response = handler({"Records": records}, None)
    assert response == {"batchItemFailures": [{"itemIdentifier": "down"}, {"itemIdentifier": "malformed"}]}
    assert len(receiver.to(ok_hook)) == 1
    assert verify_signature(
        SIGNING_SECRET, receiver.to(ok_hook)[0]["headers"]["Avatune-Signature"], receiver.to(ok_hook)[0]["body"]
    )
    assert len(receiver.to(down_hook)) == 3  # WEBHOOK_ATTEMPTS (default 3), then SQS redelivers
    assert len(receiver.to(refusing_hook)) == 1  # a 4xx is the receiver's answer: not retried
    assert "webhook rejected by the receiver" in caplog.text


def test_private_addresses_are_refused_unless_both_sides_allow(
    receiver: Receiver, events_env, monkeypatch, s3, caplog
) -> None:
    caplog.set_level(logging.INFO)
    hook = f"/private/{uuid.uuid4().hex}"
    # a name that resolves to loopback, the job not allowing private targets
    by_name = finished_job(s3, {"webhook_url": receiver.url(hook, host="localhost")})
    # the job allows it but the events function does not (WEBHOOK_ALLOW_PRIVATE unset)
    by_ip = finished_job(s3, {"webhook_url": receiver.url(hook), "allow_private": True})
    monkeypatch.delenv("WEBHOOK_ALLOW_PRIVATE")
    webhooks.reset()
    response = handler({"Records": [sqs_record(final_event(r).to_message_body()) for r in (by_name, by_ip)]}, None)
    assert response == {"batchItemFailures": []}  # refused: logged and dropped, never retried
    assert receiver.to(hook) == []
    assert caplog.text.count("webhook refused") == 2 and "non-public address" in caplog.text

    # the job allows it but the function only does with WEBHOOK_ALLOW_PRIVATE=true
    monkeypatch.setenv("WEBHOOK_ALLOW_PRIVATE", "true")
    webhooks.reset()
    assert handler({"Records": [sqs_record(final_event(by_name).to_message_body())]}, None) == {"batchItemFailures": []}
    assert receiver.to(hook) == []  # the job itself did not allow private targets
    assert handler({"Records": [sqs_record(final_event(by_ip).to_message_body())]}, None) == {"batchItemFailures": []}
    assert len(receiver.to(hook)) == 1


def test_the_connection_is_pinned_to_the_checked_address(receiver: Receiver) -> None:
    """The name is resolved once, checked, and the POST goes to that address with the URL's
    Host: a second DNS answer (rebinding) is never asked for."""
    answers = [["127.0.0.1"], ["10.9.9.9"]]
    asked: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        asked.append(host)
        return answers.pop(0)

    target = webhooks.checked_target(receiver.url("/pinned", host="hooks.example.test"), True, resolver)
    assert target.address == "127.0.0.1" and asked == ["hooks.example.test"]
    status = webhooks.post(target, b"{}", {"Content-Type": "application/json"}, webhooks.Deadline(5))
    assert status == 200 and asked == ["hooks.example.test"]
    assert receiver.to("/pinned")[-1]["headers"]["Host"] == f"hooks.example.test:{receiver.port}"

    for addresses in (
        ["93.184.216.34", "10.0.0.1"],
        ["::ffff:127.0.0.1"],
        ["fe80::1"],
        ["0.0.0.0"],
        ["224.0.0.1"],
        ["100.64.0.1"],
        ["2002:7f00:1::1"],
        ["64:ff9b::a00:1"],
    ):
        with pytest.raises(webhooks.WebhookRefused):
            webhooks.checked_target("https://hooks.example.test/x", False, lambda h, p, a=addresses: a)
    assert (
        webhooks.checked_target("https://hooks.example.test/x?a=1", False, lambda h, p: ["93.184.216.34"]).path
        == "/x?a=1"
    )


def test_url_and_address_checks() -> None:
    for ip in (
        "127.0.0.1",
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "0.0.0.0",
        "::1",
        "::",
        "fc00::1",
        "fe80::1",
        "ff02::1",
        "::ffff:10.0.0.1",
        "240.0.0.1",
        "100.64.0.1",
    ):
        assert not is_public_address(literal_ip(ip)), ip
    for ip in ("93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"):
        assert is_public_address(literal_ip(ip)), ip
    assert check_webhook_url("https://hooks.example.com/a?b=c") == "https://hooks.example.com/a?b=c"
    assert check_webhook_url("http://127.0.0.1:9000/", allow_private=True)
    for bad in (
        "file:///etc/passwd",
        "gopher://x",
        "http:///nohost",
        "http://[::1]/",
        "http://a b.com/",
        "https://x.com:99999/",
    ):
        with pytest.raises(ValueError):
            check_webhook_url(bad)


# --------------------------------------------------------------------------------------------
# sealing
# --------------------------------------------------------------------------------------------


def test_kms_sealing_on_moto(kms_key: str) -> None:
    sealer = KmsSealer(kms_key)
    header = secret_header()
    context = job_context("alice", "a1", "job-1")
    sealed = sealer.seal(header, context)
    assert sealed.startswith("kms:v1:") and header not in sealed
    assert sealer.unseal(sealed, context) == header
    with pytest.raises(SealError):  # bound to its job: the encryption context
        sealer.unseal(sealed, job_context("alice", "a1", "job-2"))
    with pytest.raises(SealError):
        LocalSealer(DEV_SEAL_KEY).unseal(sealed, context)


def test_local_sealing() -> None:
    from cryptography.fernet import Fernet

    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    header = secret_header()
    context = job_context("alice", "a1", "job-1")
    sealed = LocalSealer(old).seal(header, context)
    assert sealed.startswith("local:v1:") and header not in sealed
    assert LocalSealer(old).unseal(sealed, context) == header
    assert LocalSealer(f"{new},{old}").unseal(sealed, context) == header  # rotation: new seals, both open
    with pytest.raises(SealError):
        LocalSealer(new).unseal(sealed, context)
    with pytest.raises(SealError):
        LocalSealer(old).unseal(sealed, job_context("alice", "a1", "job-2"))
    with pytest.raises(SealError):
        LocalSealer(old).unseal(sealed[:-4] + "AAAA", context)


def test_sealer_from_env() -> None:
    assert sealer_from_env({}) is None
    assert isinstance(sealer_from_env({"DEV_MODE": "true"}), LocalSealer)
    assert isinstance(sealer_from_env({"CALLBACK_SEAL_KEY": DEV_SEAL_KEY}), LocalSealer)
    assert isinstance(sealer_from_env({"CALLBACK_KMS_KEY_ID": "alias/x", "AWS_DEFAULT_REGION": "us-east-1"}), KmsSealer)
    for env in (
        {"CALLBACK_SEALER": "kms"},
        {"CALLBACK_SEALER": "local"},
        {"CALLBACK_SEALER": "rot13"},
        {"CALLBACK_SEALER": "local", "CALLBACK_SEAL_KEY": "not-a-key"},
    ):
        with pytest.raises(SealError):
            sealer_from_env(env)


def test_a_masked_dump_is_never_taken_for_a_header() -> None:
    """pydantic dumps a SecretStr as '**********': such a dump cannot pass for a header."""
    header = secret_header()
    request = TrainRequest(
        schema_=TRAIN_REQUEST_SCHEMA,
        job_id="job-1",
        user_id="alice",
        avatar_id="a1",
        callbacks=Callbacks(webhook_url="https://hooks.example.com/x", auth_header=header),
    )
    body = request.to_message_body()
    assert header not in body and MASKED_SECRET in body
    with pytest.raises(InvalidMessage, match="masked"):
        parse_train_queue_message(body)
    with pytest.raises(ValueError):
        Callbacks(auth_header=MASKED_SECRET)
    with pytest.raises(ValueError):
        Callbacks(auth_header="Token a\r\nX-Injected: 1")


def test_trainer_seals_a_queued_requests_header() -> None:
    """A train request sent straight to the queue with a plaintext header: the record the trainer
    creates holds it sealed; with no sealer the job is refused rather than stored in the clear."""

    header = secret_header()
    body = json.dumps(
        {
            "schema": TRAIN_REQUEST_SCHEMA,
            "job_id": "job-1",
            "user_id": "alice",
            "avatar_id": "a1",
            "callbacks": {"webhook_url": "https://hooks.example.com/x", "auth_header": header},
        }
    )
    request = parse_train_queue_message(body)
    sealer = LocalSealer(DEV_SEAL_KEY)
    record = record_of(request, sealer)
    stored = record.to_json().decode()
    assert header not in stored and MASKED_SECRET not in stored and record.status == "queued"
    assert record.spec.callbacks.auth_header is None
    assert sealer.unseal(record.spec.callbacks.auth_header_sealed, job_context("alice", "a1", "job-1")) == header

    refused = record_of(request, None)
    assert refused.status == "failed" and "CALLBACK_SEALER" in refused.error
    assert header not in refused.to_json().decode() and MASKED_SECRET not in refused.to_json().decode()
    with pytest.raises(SealingUnavailable):
        seal_callbacks(request.job_spec(), None, job_context("alice", "a1", "job-1"))


class DripReceiver:
    """A receiver that accepts and then answers one byte every `interval` seconds for ever (a
    per-socket timeout never fires on it)."""

    def __init__(self, interval: float = 0.2) -> None:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.interval = interval
        self.stopped = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn) -> None:
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"x" * 10_000:
                if self.stopped.wait(self.interval):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    def close(self) -> None:
        self.stopped.set()
        self.sock.close()


class LambdaContext:
    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def get_remaining_time_in_millis(self) -> int:
        return int((self._end - time.monotonic()) * 1000)


def test_a_dripping_receiver_fails_only_its_record_within_one_deadline(
    receiver: Receiver, events_env, monkeypatch, s3
) -> None:
    """A receiver dripping a byte every 0.2 s (its response would take half an hour) holds a
    delivery no longer than the delivery's deadline: the batch answers in time, the other
    record is delivered, only the dripping one is retried."""
    monkeypatch.setenv("WEBHOOK_TIMEOUT_SECONDS", "1.5")
    webhooks.reset()
    drip = DripReceiver()
    try:
        hook = f"/ok/{uuid.uuid4().hex}"
        slow = finished_job(s3, {"webhook_url": f"http://127.0.0.1:{drip.port}/hook", "allow_private": True})
        fine = finished_job(s3, {"webhook_url": receiver.url(hook), "allow_private": True})
        records = [
            sqs_record(final_event(slow).to_message_body(), "slow"),
            sqs_record(final_event(fine).to_message_body(), "fine"),
        ]
        started = time.monotonic()
        response = handler({"Records": records}, LambdaContext(60))
        elapsed = time.monotonic() - started
        assert response == {"batchItemFailures": [{"itemIdentifier": "slow"}]}
        assert len(receiver.to(hook)) == 1
        assert elapsed < 15, elapsed  # bounded by the deadline, not by the receiver (minutes)
        # Little time left in the invocation: the records are left for the next one, not started.
        late = handler({"Records": records}, LambdaContext(1))
        assert late == {"batchItemFailures": [{"itemIdentifier": "slow"}, {"itemIdentifier": "fine"}]}
    finally:
        drip.close()


def test_a_slow_resolver_is_bounded_by_the_deadline(events_env, s3) -> None:
    from handlers.webhooks import DeliveryFailed, WebhookDeliverer, WebhookSettings

    def slow_resolver(host: str, port: int) -> list[str]:
        time.sleep(30)
        return ["127.0.0.1"]

    settings = WebhookSettings.from_env({"S3_BUCKET": TEST_BUCKET, "WEBHOOK_TIMEOUT_SECONDS": "1"})
    deliverer = WebhookDeliverer(settings, s3=s3, resolver=slow_resolver)
    record = finished_job(s3, {"webhook_url": "http://slow-dns.example.test/hook"})
    started = time.monotonic()
    with pytest.raises(DeliveryFailed, match="deadline"):
        deliverer.deliver(final_event(record))
    assert time.monotonic() - started < 10
