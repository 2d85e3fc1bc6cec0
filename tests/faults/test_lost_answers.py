"""Conditional writes whose answer is lost: S3 applied the write, the connection dropped before
the response came back, botocore sent the request again, and the retry met the write itself (412
on If-Match or If-None-Match). That is what `infra.faulty_proxy`'s cuts do to the trainer at
random, and what the fault soak (`make soak`) runs into. Here one chosen request loses its answer:
the request goes to moto over HTTP as sent, then the client is told the connection closed:
the runner's final write, and the current-adapter lock's create on both sides."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import boto3
from botocore.awsrequest import AWSPreparedRequest
from botocore.config import Config
from botocore.exceptions import ConnectionClosedError
from botocore.httpsession import URLLib3Session

from contracts.adapters import ActiveJobPointer
from contracts.jobs import JobLease, JobRecord, utcnow
from contracts.keys import active_job_key, current_adapter_lock_key, job_key
from tests.conftest import TEST_BUCKET


def _body(request: AWSPreparedRequest) -> bytes:
    body = request.body
    if hasattr(body, "read"):
        at = body.tell()
        data = body.read()
        body.seek(at)
        return data
    return body.encode() if isinstance(body, str) else (body or b"")


def lose_answer_once(client: Any, operation: str, matches: Callable[[AWSPreparedRequest, bytes], bool]) -> list[int]:
    """Send the first request of `operation` that `matches` to S3, then drop its answer; the
    statuses S3 gave the requests whose answers were lost."""
    lost: list[int] = []

    def hook(request: AWSPreparedRequest, **_: Any) -> None:
        if lost or not matches(request, _body(request)):
            return
        lost.append(URLLib3Session().send(request).status_code)
        raise ConnectionClosedError(endpoint_url=request.url)

    client.meta.events.register(f"before-send.s3.{operation}", hook)
    return lost


def _client() -> Any:
    return boto3.client("s3", config=Config(retries={"max_attempts": 3, "mode": "standard"}))


def _stored_job(s3, job: JobRecord) -> str:
    """`job`'s record and its avatar's active pointer in S3; the record's key."""
    key = job_key(job.user_id, job.avatar_id, job.id)
    s3.put_object(Bucket=TEST_BUCKET, Key=key, Body=job.to_json())
    pointer = ActiveJobPointer(job_id=job.id).model_dump_json().encode()
    s3.put_object(Bucket=TEST_BUCKET, Key=active_job_key(job.user_id, job.avatar_id), Body=pointer)
    return key


def _runner(client: Any, sqs: Any, worker: str, events_url: str) -> Any:
    """A worker's job runner on `client` (the S3 client whose answers the test loses)."""
    from trainer.base_model import BaseModelCache
    from trainer.events import EventPublisher
    from trainer.runtime.runner import JobRunner
    from trainer.settings import TrainerSettings

    settings = TrainerSettings(WORKER_ID=worker, S3_BUCKET=TEST_BUCKET)
    return JobRunner(settings, client, sqs, EventPublisher(sqs, events_url), BaseModelCache(), threading.Event())


def test_a_final_write_whose_answer_was_lost_still_completes_the_tail(s3, sqs) -> None:
    """The final record landed but the runner read the retry's 412 as someone else's write: the
    job's final event, its slot and its checkpoints are still the runner's to finish."""

    events_url = sqs.create_queue(QueueName=f"lost-answers-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    user_id, worker = f"u-{uuid.uuid4().hex[:10]}", "w-lost-answer"
    job = JobRecord(
        id=f"job-{uuid.uuid4().hex[:12]}",
        user_id=user_id,
        avatar_id="a1",
        status="running",
        lease=JobLease(owner=worker, expires_at=utcnow() + timedelta(seconds=60)),
        attempts=1,
    )
    key = _stored_job(s3, job)
    pointer = active_job_key(user_id, "a1")
    client = _client()
    lost = lose_answer_once(client, "PutObject", lambda r, body: r.url.endswith(key) and b'"succeeded"' in body)
    runner = _runner(client, sqs, worker, events_url)

    runner.finish(job, "succeeded")

    assert lost == [200]
    stored = JobRecord.model_validate_json(s3.get_object(Bucket=TEST_BUCKET, Key=key)["Body"].read())
    assert stored.status == "succeeded"
    assert stored.events_published == [f"{job.id}:job.succeeded"]
    messages = sqs.receive_message(QueueUrl=events_url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", [])
    assert [json.loads(m["Body"])["event_id"] for m in messages] == [f"{job.id}:job.succeeded"]
    assert s3.list_objects_v2(Bucket=TEST_BUCKET, Prefix=pointer).get("KeyCount") == 0


def test_a_current_adapter_lock_whose_create_answer_was_lost_is_held(s3) -> None:
    """The trainer's lock create landed but its answer was lost; the retry met the lock: it is
    this acquisition's own, so it is held (not waited for, and left to block the avatar)."""
    from trainer.current_lock import current_adapter_lock
    from trainer.s3_objects import S3Objects

    user_id = f"u-{uuid.uuid4().hex[:10]}"
    key = current_adapter_lock_key(user_id, "a1")
    client = _client()
    lost = lose_answer_once(client, "PutObject", lambda r, _: r.url.endswith(key))
    with current_adapter_lock(S3Objects(client, TEST_BUCKET), user_id, "a1", owner="job-1", wait=5):
        assert lost == [200]
        assert json.loads(s3.get_object(Bucket=TEST_BUCKET, Key=key)["Body"].read())["owner"].startswith("job-1:")
    assert s3.list_objects_v2(Bucket=TEST_BUCKET, Prefix=key).get("KeyCount") == 0


def test_an_api_lock_whose_create_answer_was_lost_is_held(s3) -> None:
    """The same on the API's side (aiobotocore): a promote does not wait out its own lock."""
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    from handlers.adapter_store import AdapterStore
    from handlers.avatar_ref import AvatarRef

    ref = AvatarRef(f"u-{uuid.uuid4().hex[:10]}", "a1")
    key = current_adapter_lock_key(ref.user_id, ref.avatar_id)

    async def hold() -> list[int]:
        config = AioConfig(retries={"max_attempts": 3, "mode": "standard"}, signature_version="s3v4")
        async with get_session().create_client("s3", region_name="us-east-1", config=config) as client:
            lost = lose_answer_once(client, "PutObject", lambda r, _: r.url.endswith(key))
            async with AdapterStore(client, TEST_BUCKET).current_lock(ref, owner="promote-1", wait=5):
                assert s3.list_objects_v2(Bucket=TEST_BUCKET, Prefix=key).get("KeyCount") == 1
            return lost

    assert asyncio.run(hold()) == [200]
    assert s3.list_objects_v2(Bucket=TEST_BUCKET, Prefix=key).get("KeyCount") == 0


def test_a_requeue_whose_answer_was_lost_still_sends_the_message(s3, sqs) -> None:
    """The API settles an abandoned job: its write (queued again) landed but the answer was lost,
    the retry found the job already queued and changed nothing. The fresh message goes out all
    the same, so the job is never left queued without one."""
    import os

    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    from handlers.avatar_ref import AvatarRef
    from handlers.job_store import JobStore
    from handlers.services.job_recovery import JobRecovery
    from handlers.settings import Settings
    from handlers.train_queue import TrainQueue

    ref = AvatarRef(f"u-{uuid.uuid4().hex[:10]}", "a1")
    expired = JobLease(owner="vanished", expires_at=utcnow() - timedelta(hours=1))
    record = JobRecord(id="job-requeue-lost", user_id=ref.user_id, avatar_id=ref.avatar_id, status="running")
    record.lease = expired
    key = job_key(ref.user_id, ref.avatar_id, record.id)
    s3.put_object(Bucket=TEST_BUCKET, Key=key, Body=record.to_json())
    queue_name = f"requeue-{uuid.uuid4().hex[:8]}.fifo"
    queue_url = sqs.create_queue(QueueName=queue_name, Attributes={"FifoQueue": "true"})["QueueUrl"]

    async def settle() -> JobRecord:
        config = AioConfig(retries={"max_attempts": 3, "mode": "standard"}, signature_version="s3v4")
        async with get_session().create_client("s3", region_name="us-east-1", config=config) as s3_client:
            async with get_session().create_client("sqs", region_name="us-east-1") as sqs_client:
                lose_answer_once(s3_client, "PutObject", lambda r, _: r.url.endswith(key))
                queue = TrainQueue(sqs_client, queue_name, os.environ["EVENTS_QUEUE_NAME"])
                recovery = JobRecovery(JobStore(s3_client, TEST_BUCKET), queue, Settings())
                return await recovery.settle(ref, record)

    settled = asyncio.run(settle())
    assert settled.status == "queued" and settled.failures == 1
    messages = sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=1).get("Messages", [])
    assert [json.loads(m["Body"])["job_id"] for m in messages] == [record.id]


def test_a_claim_whose_answer_was_lost_is_one_attempt_with_its_started_event(s3, sqs) -> None:
    """The claim (queued -> running under this worker's lease) landed but its answer was lost;
    the retried If-Match met the worker's own write. The job runs as attempt 1, not 2, and
    `job.started` goes out once."""
    from contracts.messages import FuseRequest
    from trainer.runtime.context import Succeeded
    from trainer.runtime.heartbeat import Delivery

    events_url = sqs.create_queue(QueueName=f"lost-claim-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    user_id, worker = f"u-{uuid.uuid4().hex[:10]}", "w-lost-claim"
    job = JobRecord(id=f"job-{uuid.uuid4().hex[:12]}", user_id=user_id, avatar_id="a1", type="fuse")
    key = _stored_job(s3, job)
    client = _client()
    lost = lose_answer_once(client, "PutObject", lambda r, body: r.url.endswith(key) and b'"running"' in body)
    runner = _runner(client, sqs, worker, events_url)
    request = FuseRequest(
        schema_="avatune.fuse-request/v1", job_id=job.id, user_id=user_id, avatar_id="a1", adapter_version=1
    )
    seen: list[int] = []

    def work(ctx) -> Succeeded:
        seen.append(ctx.job.attempts)
        return Succeeded()

    runner.run(request, Delivery(queue_url=events_url, receipt_handle=None), work)

    assert lost == [200] and seen == [1]
    stored = JobRecord.model_validate_json(s3.get_object(Bucket=TEST_BUCKET, Key=key)["Body"].read())
    assert (stored.status, stored.attempts, stored.failures) == ("succeeded", 1, 0)
    assert stored.events_published == [f"{job.id}:job.started", f"{job.id}:job.succeeded"]
