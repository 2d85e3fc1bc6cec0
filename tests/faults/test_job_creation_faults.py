"""Creating a job when queueing it fails: nothing is kept, unless a worker already claimed the
job (the send failed after SQS took the message: a timeout on the answer). Then the job lives,
its slot and Idempotency-Key stay, and the caller is answered with it rather than a 503 that
invites a duplicate retry. Runs the real service with real aiobotocore clients against moto; the
fault is a queue whose send really sends, lets a worker claim the job, then raises."""

from __future__ import annotations

import asyncio
import os
import uuid
from datetime import timedelta

import pytest

from contracts.jobs import JobLease, JobRecord, utcnow
from contracts.keys import active_job_key, job_key
from handlers.avatar_ref import AvatarRef
from handlers.idempotency import Idempotency
from handlers.job_store import JobStore
from handlers.problems import Problem
from handlers.services.jobs import JobIntake, api_request, queue_job
from handlers.settings import Settings
from handlers.train_queue import TrainQueue
from tests.conftest import TEST_BUCKET, keys_under


class SendThenFail(TrainQueue):
    """Sends for real; then (when `claimed`) a worker claims the job; then the send "fails"."""

    def __init__(self, sqs, jobs: JobStore, avatar: AvatarRef, claimed: bool) -> None:
        super().__init__(sqs, os.environ["TRAIN_QUEUE_NAME"], os.environ["EVENTS_QUEUE_NAME"])
        self._jobs, self._avatar, self._claimed = jobs, avatar, claimed

    async def send(self, request, deduplication_id=None) -> str:
        await super().send(request, deduplication_id)
        if self._claimed:

            def claim(record: JobRecord) -> JobRecord:
                record.status = "running"
                record.lease = JobLease(owner="w1", expires_at=utcnow() + timedelta(seconds=60))
                return record

            await self._jobs.update(self._avatar, request.job_id, claim)
        raise TimeoutError("the answer to SendMessage never came")


def create(avatar: AvatarRef, claimed: bool) -> JobRecord | Problem:
    from aiobotocore.session import get_session

    from contracts.messages import FuseRequest

    async def main() -> JobRecord | Problem:
        session = get_session()
        endpoint = os.environ["AWS_ENDPOINT_URL"]
        async with (
            session.create_client("s3", endpoint_url=endpoint) as s3,
            session.create_client("sqs", endpoint_url=endpoint) as sqs,
        ):
            jobs = JobStore(s3, TEST_BUCKET)
            queue = SendThenFail(sqs, jobs, avatar, claimed)

            async def prepare():
                return lambda job_id: api_request(FuseRequest, avatar, job_id, adapter_version=1)

            try:
                key = Idempotency.of("key-1", "POST", "/fuse-jobs", b"{}")
                return await queue_job(avatar, JobIntake(jobs, queue, Settings(), key), prepare)
            except Problem as problem:
                return problem

    return asyncio.run(main())


@pytest.mark.parametrize("claimed", [False, True], ids=["nothing-claimed", "worker-claimed"])
def test_a_failed_send_rolls_back_unless_a_worker_claimed_the_job(stack, s3, claimed: bool) -> None:
    avatar = AvatarRef("u-" + uuid.uuid4().hex[:10], "avatar-1")
    result = create(avatar, claimed)
    if not claimed:
        assert isinstance(result, Problem) and result.status == 503
        assert keys_under(s3, f"users/{avatar.user_id}/") == []  # slot, record, key: all gone
        return
    assert isinstance(result, JobRecord) and result.status == "running"
    keys = keys_under(s3, f"users/{avatar.user_id}/")
    assert job_key(avatar.user_id, avatar.avatar_id, result.id) in keys
    assert active_job_key(avatar.user_id, avatar.avatar_id) in keys  # the slot is still the job's
    again = create(avatar, claimed=False)  # the client's retry with the same key: the same job
    assert isinstance(again, JobRecord) and again.id == result.id
