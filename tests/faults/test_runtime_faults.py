"""The job runtime under the faults production brings, with real workers, a real API server and
moto over HTTP: graceful hand-backs, a final event lost in a crash, jobs longer than SQS's
visibility cap, a configuration changed under a running job, a record deleted under it, cancels
that meet a dead worker, requests in the dead-letter queue, leases nobody renews."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import boto3
import pytest

from contracts.jobs import JobLease, JobRecord, utcnow
from contracts.keys import adapter_versions_prefix, checkpoint_prefix, job_key
from contracts.messages import TRAIN_REQUEST_SCHEMA, TrainRequest, message_group_id
from tests.conftest import TEST_BUCKET, Api, keys_under
from tests.pipeline import Pipeline, chat_document, start_pipeline, wait_for_job

LONG = {"num_epochs": 6, "batch_size": 1, "r": 4}
FAST = {"num_epochs": 1, "batch_size": 4, "learning_rate": 0.01, "r": 4}
STALE_LEASE_SECONDS = 4


@pytest.fixture(scope="module")
def pipeline(stack, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """This module's API settles a lease after STALE_LEASE_SECONDS and gives up after 2 failures."""
    api_env = {"STALE_LEASE_SECONDS": str(STALE_LEASE_SECONDS), "MAX_JOB_ATTEMPTS": "2"}
    p = start_pipeline(tmp_path_factory.mktemp("faults"), tiny_model_dir, api_env=api_env)
    try:
        yield p
    finally:
        p.stop_workers()


def stored_record(s3, api: Api, job_id: str) -> JobRecord:
    body = s3.get_object(Bucket=TEST_BUCKET, Key=job_key(api.user_id, api.avatar_id, job_id))["Body"].read()
    return JobRecord.model_validate_json(body)


def write_record(s3, record: JobRecord) -> None:
    s3.put_object(Bucket=TEST_BUCKET, Key=job_key(record.user_id, record.avatar_id, record.id), Body=record.to_json())


def start(api: Api, spec: dict) -> str:
    api.put_doc("chat.jsonl", chat_document())
    r = api.post(f"{api.base}/training-jobs", json=spec)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def running(pipeline: Pipeline, api: Api, job_id: str, step: int = 1) -> dict:
    job, _ = wait_for_job(
        api, job_id, {"running"}, pipeline=pipeline, condition=lambda j: j["progress"]["step"] >= step
    )
    return job


def stop(proc, sig=signal.SIGTERM) -> None:
    proc.send_signal(sig)
    proc.wait(60)


def take_message(sqs, pipeline: Pipeline, job_id: str) -> dict:
    """Receive the job's own message from the train queue (others are put back)."""
    for _ in range(20):
        for msg in sqs.receive_message(
            QueueUrl=pipeline.train_queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=2
        ).get("Messages", []):
            if json.loads(msg["Body"])["job_id"] == job_id:
                return msg
            sqs.change_message_visibility(
                QueueUrl=pipeline.train_queue_url, ReceiptHandle=msg["ReceiptHandle"], VisibilityTimeout=0
            )
    raise AssertionError(f"no message of {job_id} on the train queue")


def wait_checkpoint(s3, api: Api, job_id: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(k.endswith("/_COMPLETE") for k in keys_under(s3, checkpoint_prefix(api.user_id, api.avatar_id, job_id))):
            return
        time.sleep(0.2)
    raise TimeoutError("no checkpoint")


def test_graceful_hand_backs_are_not_failed_attempts(pipeline: Pipeline) -> None:
    """Three SIGTERM hand-backs with MAX_JOB_ATTEMPTS=1: the job still succeeds (only failures count)."""
    with pipeline.client() as api:
        job_id = start(api, LONG)
        for _ in range(3):
            worker = pipeline.start_worker(MAX_JOB_ATTEMPTS="1")
            running(pipeline, api, job_id)
            stop(worker)
            assert api.get(f"{api.base}/training-jobs/{job_id}").json()["status"] == "queued"
        worker = pipeline.start_worker(MAX_JOB_ATTEMPTS="1")
        try:
            done, _ = wait_for_job(api, job_id, {"succeeded", "failed"}, pipeline=pipeline, timeout=300)
            assert done["status"] == "succeeded", done["error"]
            assert done["attempts"] == 4 and done["failures"] == 0
        finally:
            stop(worker)


def test_a_final_event_lost_in_a_crash_is_published_on_redelivery(pipeline: Pipeline, s3) -> None:
    """The worker wrote the final record and died before publishing: the message comes back, the
    event goes out once (stable id), and a duplicate delivery sends nothing more."""
    sqs = boto3.client("sqs")
    with pipeline.client() as api:
        job_id = "job-crashed-before-publishing"
        request = TrainRequest(
            schema_=TRAIN_REQUEST_SCHEMA, job_id=job_id, user_id=api.user_id, avatar_id=api.avatar_id
        )
        record = JobRecord(id=job_id, user_id=api.user_id, avatar_id=api.avatar_id, source="queue", status="succeeded")
        record.events_published = [f"{job_id}:job.started"]
        record.finished_at = utcnow()
        write_record(s3, record)
        worker = pipeline.start_worker()
        try:
            for dedup in ("first", "second"):
                sqs.send_message(
                    QueueUrl=pipeline.train_queue_url,
                    MessageBody=request.to_message_body(),
                    MessageGroupId=message_group_id(api.user_id, api.avatar_id),
                    MessageDeduplicationId=f"{job_id}-{dedup}",
                )
            pipeline.wait_events(job_id, "job.succeeded")
            time.sleep(3)  # the duplicate delivery too
            assert pipeline.events_for(job_id) == ["job.succeeded"]
            event = next(e for e in pipeline.seen_events if e["job_id"] == job_id)
            assert event["event_id"] == f"{job_id}:job.succeeded"
            assert stored_record(s3, api, job_id).events_published[-1] == f"{job_id}:job.succeeded"
        finally:
            stop(worker)


def test_a_job_outlives_the_sqs_visibility_cap(pipeline: Pipeline, s3) -> None:
    """With the cap made small (SQS_MAX_VISIBILITY_SECONDS=8), the owner hands its message over
    to a fresh one before it; another worker receives that one and leaves it to the owner, which
    adopts it: one attempt, one final event, nothing in the dead-letter queue."""
    short = {"SQS_MAX_VISIBILITY_SECONDS": "8", "LEASE_SECONDS": "6"}
    with pipeline.client() as api:
        owner = pipeline.start_worker(**short)
        job_id = start(api, {**LONG, "num_epochs": 10})
        running(pipeline, api, job_id)
        other = pipeline.start_worker(**short)
        try:
            done, _ = wait_for_job(api, job_id, {"succeeded", "failed"}, pipeline=pipeline, timeout=400)
            assert done["status"] == "succeeded", done["error"]
            assert done["attempts"] == 1 and done["failures"] == 0
            log = "\n".join(path.read_text() for path in pipeline.logs.glob("worker-*.log"))
            assert log.count("handed over to a fresh one") >= 2, log[-3000:]
            assert "adopted a redelivered message" in log, log[-3000:]
            assert pipeline.wait_events(job_id, "job.succeeded").count("job.succeeded") == 1
            dead = boto3.client("sqs").receive_message(QueueUrl=pipeline.train_dlq_url, WaitTimeSeconds=0)
            assert not dead.get("Messages")
        finally:
            stop(owner)
            stop(other)


def test_a_retry_trains_with_the_configuration_of_its_first_attempt(pipeline: Pipeline, s3) -> None:
    with pipeline.client() as api:
        assert api.put(f"{api.base}/adapter", json={"r": 4, "max_seq_length": 256}).status_code == 200
        job_id = start(api, {"num_epochs": 6, "batch_size": 1})
        worker = pipeline.start_worker()
        running(pipeline, api, job_id, step=6)
        wait_checkpoint(s3, api, job_id)
        # Changed while the job runs: its retry must not pick this up.
        assert api.put(f"{api.base}/adapter", json={"r": 8, "max_seq_length": 64}).status_code == 200
        stop(worker)
        worker = pipeline.start_worker()
        try:
            done, _ = wait_for_job(api, job_id, {"succeeded", "failed"}, pipeline=pipeline, timeout=300)
            assert done["status"] == "succeeded", done["error"]
            assert done["metrics"]["resumed_from_step"] >= 5
            pinned = stored_record(s3, api, job_id).resolved_config
            assert pinned is not None and pinned.r == 4 and pinned.max_seq_length == 256, pinned
        finally:
            stop(worker)


def test_a_job_whose_record_is_deleted_writes_nothing(pipeline: Pipeline, s3) -> None:
    with pipeline.client() as api:
        worker = pipeline.start_worker()
        try:
            job_id = start(api, LONG)
            running(pipeline, api, job_id, step=3)
            s3.delete_object(Bucket=TEST_BUCKET, Key=job_key(api.user_id, api.avatar_id, job_id))
            time.sleep(8)  # the heartbeat notices within a beat; training stops at the next step
            assert keys_under(s3, adapter_versions_prefix(api.user_id, api.avatar_id)) == []
            assert worker.poll() is None
            assert "its record was deleted" in pipeline.worker_log() or "lease lost" in pipeline.worker_log()
        finally:
            stop(worker)


def test_cancel_meets_a_dead_worker(pipeline: Pipeline, s3) -> None:
    """Cancelled while its worker was being killed: the next claim ends it without training
    again; a preempted (queued) job cancelled loses its checkpoints at once."""
    with pipeline.client() as api:
        worker = pipeline.start_worker()
        job_id = start(api, LONG)
        running(pipeline, api, job_id, step=2)
        stop(worker, signal.SIGKILL)
        assert api.post(f"{api.base}/training-jobs/{job_id}/cancel").status_code == 202
        worker = pipeline.start_worker()
        try:
            done, _ = wait_for_job(api, job_id, {"cancelled", "succeeded", "failed"}, pipeline=pipeline)
            assert done["status"] == "cancelled" and done["attempts"] == 1, done
            assert pipeline.wait_events(job_id, "job.cancelled")[-1] == "job.cancelled"
        finally:
            stop(worker)

    with pipeline.client() as api:
        worker = pipeline.start_worker()
        job_id = start(api, LONG)
        running(pipeline, api, job_id, step=6)
        wait_checkpoint(s3, api, job_id)
        stop(worker)  # handed back: queued, with its checkpoint
        assert keys_under(s3, checkpoint_prefix(api.user_id, api.avatar_id, job_id))
        assert api.post(f"{api.base}/training-jobs/{job_id}/cancel").json()["status"] == "cancelled"
        assert keys_under(s3, checkpoint_prefix(api.user_id, api.avatar_id, job_id)) == []
        assert pipeline.wait_events(job_id, "job.cancelled").count("job.cancelled") == 1


def test_a_dead_lettered_request_fails_its_job(pipeline: Pipeline, s3) -> None:
    sqs = boto3.client("sqs")
    with pipeline.client() as api:
        job_id = start(api, FAST)
        # Its message is gone from the train queue and sits in the DLQ (maxReceiveCount reached).
        msg = take_message(sqs, pipeline, job_id)
        sqs.send_message(
            QueueUrl=pipeline.train_dlq_url, MessageBody=msg["Body"], MessageGroupId="g", MessageDeduplicationId="d1"
        )
        sqs.delete_message(QueueUrl=pipeline.train_queue_url, ReceiptHandle=msg["ReceiptHandle"])
        worker = pipeline.start_worker(DEAD_LETTER_SWEEP_SECONDS="1")
        try:
            done, _ = wait_for_job(api, job_id, {"failed", "succeeded"}, pipeline=pipeline)
            assert done["status"] == "failed" and "dead-letter queue" in done["error"], done
            assert pipeline.wait_events(job_id, "job.failed")[-1] == "job.failed"
            assert api.post(f"{api.base}/training-jobs", json=FAST).status_code == 202  # the avatar is free
        finally:
            stop(worker)


def test_a_lease_nobody_renews_is_queued_again_then_given_up(pipeline: Pipeline, s3) -> None:
    """A running job whose worker and message are both gone: the API queues it again when it
    meets it; at MAX_JOB_ATTEMPTS it fails it and frees the avatar."""
    sqs = boto3.client("sqs")
    with pipeline.client() as api:
        job_id = start(api, FAST)
        msg = take_message(sqs, pipeline, job_id)
        sqs.delete_message(QueueUrl=pipeline.train_queue_url, ReceiptHandle=msg["ReceiptHandle"])  # lost
        record = stored_record(s3, api, job_id)
        record.status = "running"
        record.attempts = 1
        record.lease = JobLease(owner="vanished", expires_at=utcnow() - timedelta(seconds=STALE_LEASE_SECONDS + 5))
        write_record(s3, record)

        again = api.get(f"{api.base}/training-jobs/{job_id}").json()
        assert again["status"] == "queued" and again["failures"] == 1
        worker = pipeline.start_worker()
        try:
            done, _ = wait_for_job(api, job_id, {"succeeded", "failed"}, pipeline=pipeline)
            assert done["status"] == "succeeded" and done["attempts"] == 2
        finally:
            stop(worker)

        job_id = api.post(f"{api.base}/training-jobs", json=FAST).json()["id"]
        msg = take_message(sqs, pipeline, job_id)
        sqs.delete_message(QueueUrl=pipeline.train_queue_url, ReceiptHandle=msg["ReceiptHandle"])
        record = stored_record(s3, api, job_id)
        record.status, record.failures = "running", 1
        record.lease = JobLease(owner="vanished", expires_at=utcnow() - timedelta(seconds=STALE_LEASE_SECONDS + 5))
        write_record(s3, record)
        # Creating another job meets the dead one holding the slot: settled (given up), then queued.
        r = api.post(f"{api.base}/training-jobs", json=FAST)
        assert r.status_code == 202, r.text
        given_up = api.get(f"{api.base}/training-jobs/{job_id}").json()
        assert given_up["status"] == "failed" and "gave up after 2 failed attempts" in given_up["error"]
        assert pipeline.wait_events(job_id, "job.failed")[-1] == "job.failed"


def test_an_attempt_that_raises_is_a_failure(pipeline: Pipeline, s3) -> None:
    """A version whose file does not match its recorded sha256 makes every fuse attempt raise:
    each is one failed attempt, retried, and at MAX_JOB_ATTEMPTS the job fails saying so."""
    from contracts.keys import adapter_version_prefix

    with pipeline.client() as api:
        prefix = adapter_version_prefix(api.user_id, api.avatar_id, 1)
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            s3.put_object(Bucket=TEST_BUCKET, Key=prefix + name, Body=b"torn")
        meta = {"version": 1, "job_id": "job-x", "metrics": {}, "files": {"adapter_config.json": "0" * 64}}
        s3.put_object(Bucket=TEST_BUCKET, Key=prefix + "metrics.json", Body=json.dumps(meta).encode())
        manifest = {"current_version": 1, "files": meta["files"], "metrics": {}}
        s3.put_object(
            Bucket=TEST_BUCKET, Key=f"users/{api.user_id}/avatars/{api.avatar_id}/adapters/manifest.json",
            Body=json.dumps(manifest).encode(),
        )  # fmt: skip
        r = api.post(f"{api.base}/fuse-jobs", json={"adapter_version": 1})
        assert r.status_code == 202, r.text
        worker = pipeline.start_worker(MAX_JOB_ATTEMPTS="2", VISIBILITY_TIMEOUT_SECONDS="2")
        try:
            done, _ = wait_for_job(api, r.json()["id"], {"failed", "succeeded"}, pipeline=pipeline, timeout=120)
            assert done["status"] == "failed" and done["failures"] == 2, done
            assert done["error"] == "internal error after 2 failed attempts: RuntimeError"
            assert pipeline.wait_events(done["id"], "job.failed").count("job.failed") == 1
        finally:
            stop(worker)


def test_contention_hands_the_job_back_without_a_failure(stack, s3, sqs) -> None:
    """A job whose work meets a lock held too long by someone else (CurrentAdapterBusy, a
    RetryLater) is handed back to be retried later: it does not count towards MAX_JOB_ATTEMPTS."""
    import threading
    import uuid

    from contracts.messages import FuseRequest
    from trainer.base_model import BaseModelCache
    from trainer.current_lock import CurrentAdapterBusy
    from trainer.events import EventPublisher
    from trainer.runtime.heartbeat import Delivery
    from trainer.runtime.runner import JobRunner, Outcome
    from trainer.settings import TrainerSettings

    user_id = "u-" + uuid.uuid4().hex[:10]
    settings = TrainerSettings(MAX_JOB_ATTEMPTS=1, WORKER_ID="w-contended")
    events_url = sqs.get_queue_url(QueueName=settings.events_queue_name)["QueueUrl"]
    runner = JobRunner(settings, s3, sqs, EventPublisher(sqs, events_url), BaseModelCache(), threading.Event())
    request = FuseRequest(schema="avatune.fuse-request/v1", job_id="job-contended", user_id=user_id, avatar_id="a1")

    def contended(ctx) -> None:
        raise CurrentAdapterBusy("the current adapter of 'a1' is being changed by someone else")

    delivery = Delivery(queue_url=events_url, receipt_handle=None, body=request.to_message_body())
    assert runner.run(request, delivery, contended) == Outcome.RETRY
    record = stored_record(s3, Api("http://unused", user_id, "a1"), "job-contended")
    assert record.status == "queued" and record.failures == 0 and record.attempts == 1
