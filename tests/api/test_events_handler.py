"""The events-queue Lambda (`handlers.events_handler.handler`): SQS batches in the shape Lambda
delivers them, partial batch responses (ReportBatchItemFailures), the `deliver` seam, and a
bundle that needs nothing but pydantic and `contracts`."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

from contracts.jobs import JobRecord
from contracts.messages import JOB_EVENT_SCHEMA, JobEvent
from handlers import events_handler
from handlers.events_handler import handler
from tests.conftest import ROOT
from tests.infra.test_infra_aws import sam_build

QUEUE_ARN = "arn:aws:sqs:us-east-1:123456789012:avatune-events"


def sqs_record(body: str, message_id: str | None = None, receive_count: int = 1) -> dict:
    """One record exactly as the SQS event source mapping hands it to Lambda."""
    return {
        "messageId": message_id or str(uuid.uuid4()),
        "receiptHandle": "AQEBwJnKyrHigUMZj6rYigCgxlaS3SLy0a" + uuid.uuid4().hex,
        "body": body,
        "attributes": {
            "ApproximateReceiveCount": str(receive_count),
            "SentTimestamp": "1732550000000",
            "SenderId": "AROAEXAMPLE:avatune-trainer",
            "ApproximateFirstReceiveTimestamp": "1732550000100",
        },
        "messageAttributes": {},
        "md5OfBody": "0" * 32,
        "eventSource": "aws:sqs",
        "eventSourceARN": QUEUE_ARN,
        "awsRegion": "us-east-1",
    }


def sqs_event(*records: dict) -> dict:
    return {"Records": list(records)}


def job_event(event: str = "job.succeeded", **overrides) -> JobEvent:
    status = {
        "job.started": "running",
        "job.succeeded": "succeeded",
        "job.failed": "failed",
        "job.cancelled": "cancelled",
    }[event]
    fields = dict(
        event=event, job_id="job-018f2a3b4c5d-0a1b2c3d", user_id="alice", avatar_id="my-avatar", status=status
    )
    fields.update(overrides)
    return JobEvent(**fields)


def logged_events(caplog) -> list[dict]:
    out = []
    for record in caplog.records:
        if record.name == "avatune.events" and record.levelno == logging.INFO:
            out.append(json.loads(record.getMessage()))
    return out


# --------------------------------------------------------------------------------------------
# partial batch responses
# --------------------------------------------------------------------------------------------

MALFORMED_BODIES = {
    "not-json": "{not json",
    "json-array": json.dumps([1, 2]),
    "no-schema": json.dumps(
        {"event": "job.started", "job_id": "j", "user_id": "u", "avatar_id": "a", "status": "running"}
    ),
    "foreign-schema": json.dumps(
        {"schema": "avatune.train-request/v1", "job_id": "j", "user_id": "u", "avatar_id": "a"}
    ),
    "missing-job-id": json.dumps(
        {"schema": JOB_EVENT_SCHEMA, "event": "job.started", "user_id": "u", "avatar_id": "a", "status": "running"}
    ),
    "unknown-event": json.dumps(
        {
            "schema": JOB_EVENT_SCHEMA,
            "event": "job.exploded",
            "job_id": "j",
            "user_id": "u",
            "avatar_id": "a",
            "status": "failed",
        }
    ),
    "bad-status": json.dumps(
        {
            "schema": JOB_EVENT_SCHEMA,
            "event": "job.started",
            "job_id": "j",
            "user_id": "u",
            "avatar_id": "a",
            "status": "sleeping",
        }
    ),
    "empty": "",
}


def test_mixed_batch_fails_only_the_malformed_records(caplog):
    caplog.set_level(logging.INFO, logger="avatune.events")
    good = [
        sqs_record(job_event("job.started").to_message_body(), "good-1"),
        sqs_record(
            job_event("job.succeeded", adapter_version=3, metrics={"eval_loss": 1.2}).to_message_body(), "good-2"
        ),
        sqs_record(job_event("job.failed", error="out of memory").to_message_body(), "good-3"),
        sqs_record(job_event("job.cancelled", avatar_id="other").to_message_body(), "good-4"),
    ]
    bad = [sqs_record(body, f"bad-{name}") for name, body in MALFORMED_BODIES.items()]
    # interleave, so a failure in the middle of a batch does not stop the records after it
    records = [r for pair in zip(bad, good + [None] * len(bad)) for r in pair if r is not None]

    response = handler(sqs_event(*records), None)

    assert response == {"batchItemFailures": [{"itemIdentifier": r["messageId"]} for r in bad]}
    delivered = logged_events(caplog)
    assert [(e["event"], e["avatar_id"]) for e in delivered] == [
        ("job.started", "my-avatar"),
        ("job.succeeded", "my-avatar"),
        ("job.failed", "my-avatar"),
        ("job.cancelled", "other"),
    ]
    assert delivered[1]["adapter_version"] == 3 and delivered[2]["error"] == "out of memory"
    for entry in delivered:
        assert entry["job_id"] == "job-018f2a3b4c5d-0a1b2c3d" and entry["user_id"] == "alice"
        assert entry["message"] == "job event" and entry["occurred_at"]
    # the malformed ones are logged with their message id and why
    errors = [json.loads(r.getMessage()) for r in caplog.records if r.levelno == logging.ERROR]
    assert {e["message_id"] for e in errors} == {r["messageId"] for r in bad}
    assert all(e["reason"] for e in errors)


def test_good_batch_reports_no_failures(caplog):
    caplog.set_level(logging.INFO, logger="avatune.events")
    records = [sqs_record(job_event().to_message_body()) for _ in range(10)]
    assert handler(sqs_event(*records), None) == {"batchItemFailures": []}
    assert len(logged_events(caplog)) == 10


@pytest.mark.parametrize("event", [{}, {"Records": []}, None])
def test_empty_invocations(event):
    assert handler(event, None) == {"batchItemFailures": []}


def test_extra_fields_from_a_newer_producer_are_accepted():
    """JobEvent ignores unknown fields: a newer trainer adding one must not dead-letter events."""
    body = json.loads(job_event().to_message_body())
    body["new_field"] = {"anything": True}
    assert handler(sqs_event(sqs_record(json.dumps(body), "m1")), None) == {"batchItemFailures": []}


def test_delivery_failure_retries_only_that_record(monkeypatch):
    delivered = []

    def flaky_deliver(event: JobEvent, budget: float | None = None) -> None:
        if event.avatar_id == "webhook-down":
            raise ConnectionError("webhook endpoint unreachable")
        delivered.append(event.avatar_id)

    monkeypatch.setattr(events_handler, "deliver", flaky_deliver)
    records = [
        sqs_record(job_event(avatar_id="a1").to_message_body(), "m1"),
        sqs_record(job_event(avatar_id="webhook-down").to_message_body(), "m2"),
        sqs_record(job_event(avatar_id="a3").to_message_body(), "m3"),
    ]
    assert handler(sqs_event(*records), None) == {"batchItemFailures": [{"itemIdentifier": "m2"}]}
    assert delivered == ["a1", "a3"]


def test_deliver_is_the_seam(monkeypatch):
    """Whatever `deliver` is at call time gets each parsed event (where webhooks plug in)."""
    seen: list[JobEvent] = []
    monkeypatch.setattr(events_handler, "deliver", lambda event, budget=None: seen.append(event))
    original = job_event("job.succeeded", adapter_version=7)
    handler(sqs_event(sqs_record(original.to_message_body())), None)
    assert seen == [original]


# --------------------------------------------------------------------------------------------
# wire compatibility with the real producers
# --------------------------------------------------------------------------------------------


class CapturingSQS:
    def __init__(self) -> None:
        self.bodies: list[str] = []

    def send_message(self, QueueUrl: str, MessageBody: str, **_: object) -> dict:
        self.bodies.append(MessageBody)
        return {"MessageId": str(uuid.uuid4())}

    async def get_queue_url(self, QueueName: str) -> dict:
        return {"QueueUrl": f"https://sqs.us-east-1.amazonaws.com/123456789012/{QueueName}"}


def test_events_published_by_the_trainer_are_accepted(caplog):
    pytest.importorskip("pydantic_settings")
    from trainer.events import EventPublisher

    caplog.set_level(logging.INFO, logger="avatune.events")
    sqs = CapturingSQS()
    publisher = EventPublisher(sqs, "https://sqs.us-east-1.amazonaws.com/123456789012/avatune-events")
    job = JobRecord(
        id="job-018f2a3b4c5d-0a1b2c3d", user_id="alice", avatar_id="my-avatar", status="succeeded", adapter_version=2
    )
    publisher.publish("job.started", job.model_copy(update={"status": "running"}))
    publisher.publish("job.succeeded", job)
    response = handler(sqs_event(*(sqs_record(b) for b in sqs.bodies)), None)
    assert response == {"batchItemFailures": []}
    assert [e["event"] for e in logged_events(caplog)] == ["job.started", "job.succeeded"]


def test_job_cancelled_published_by_the_api_is_accepted():
    pytest.importorskip("fastapi")
    from handlers.train_queue import TrainQueue

    class AsyncSQS(CapturingSQS):
        async def send_message(self, QueueUrl: str, MessageBody: str, **kw: object) -> dict:  # type: ignore[override]
            return CapturingSQS.send_message(self, QueueUrl, MessageBody, **kw)

    sqs = AsyncSQS()
    queue = TrainQueue(sqs, "avatune-train.fifo", "avatune-events", endpoint="test-events-handler")
    asyncio.run(queue.publish(job_event("job.cancelled")))
    assert handler(sqs_event(sqs_record(sqs.bodies[0])), None) == {"batchItemFailures": []}


# --------------------------------------------------------------------------------------------
# a light function: no torch, no FastAPI, no boto
# --------------------------------------------------------------------------------------------

HEAVY = ("torch", "transformers", "peft", "fastapi", "starlette", "mangum", "boto3", "botocore", "aiobotocore")


def test_import_pulls_in_nothing_heavy():
    code = textwrap.dedent(
        f"""
        import sys
        import handlers.events_handler
        heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})
        print(",".join(heavy))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"handlers.events_handler imports {proc.stdout.strip()}"


def test_the_events_bundle_runs_on_its_own(tmp_path):
    """Build the events function's code exactly as `sam build` does (infra/aws/Makefile, with the
    pip step switched off: pydantic comes from this environment), then invoke the handler from
    that folder with every heavy package made unimportable."""
    artifacts = sam_build("EventsFunction", tmp_path)
    assert sorted(p.name for p in (artifacts / "handlers").iterdir()) == [
        "__init__.py",
        "events_handler.py",
        "webhooks.py",
    ]
    assert (artifacts / "contracts" / "messages.py").is_file()
    assert not (artifacts / "trainer").exists()

    body = job_event().to_message_body()
    code = textwrap.dedent(
        f"""
        import importlib.abc, json, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in {HEAVY!r} or name in ('handlers.app', 'handlers.aws', 'trainer'):
                    raise ImportError('not in the events bundle: ' + name)
        sys.meta_path.insert(0, Block())
        sys.path.insert(0, {str(artifacts)!r})
        import handlers.events_handler as eh
        assert eh.__file__.startswith({str(artifacts)!r}), eh.__file__
        event = {{"Records": [{{"messageId": "m1", "body": {body!r}, "eventSource": "aws:sqs"}},
                              {{"messageId": "m2", "body": "nope", "eventSource": "aws:sqs"}}]}}
        print(json.dumps(eh.handler(event, None)))
        """
    )
    # No S3_BUCKET: webhook delivery is off, so a final event needs no boto3 (tests/api/test_webhooks.py
    # delivers them).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "S3_BUCKET")}
    run = subprocess.run(
        [sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"batchItemFailures": [{"itemIdentifier": "m2"}]}
