"""Requests that reached the train queue's dead-letter queue fail their job with the reason.

SQS moves a message to the dead-letter queue after `maxReceiveCount` receives without a delete,
silently: nothing tells the job's record. An idle worker looks at the DLQ every
DEAD_LETTER_SWEEP_SECONDS; for each request whose job is still active and has no live owner it
fails the job ("its request reached the dead-letter queue after N receives"), frees the avatar's
slot and publishes `job.failed`, like any other end. The message stays in the DLQ for operators
(hidden for 12 hours after each look, so the sweep does not read it again and again); poison
messages (not a request at all, sent there by the worker with their reason) are left alone.
"""

from __future__ import annotations

import logging
from typing import Any

from contracts.job_kinds import parse_train_queue_message
from contracts.jobs import FINAL_STATUSES, JobRecord, utcnow
from contracts.messages import InvalidMessage
from trainer.runtime.runner import JobRunner

log = logging.getLogger("avatune.trainer")

# How long a looked-at DLQ message stays hidden (SQS's maximum).
HIDE_SECONDS = 43200


class DeadLetterSweep:
    def __init__(self, sqs: Any, dlq_url: str, runner: JobRunner) -> None:
        self._sqs = sqs
        self._dlq_url = dlq_url
        self._runner = runner

    def sweep(self) -> int:
        """Look at up to 10 dead-lettered messages; how many jobs were failed."""
        resp = self._sqs.receive_message(
            QueueUrl=self._dlq_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=0,
            VisibilityTimeout=HIDE_SECONDS,
            MessageSystemAttributeNames=["ApproximateReceiveCount"],
        )
        failed = 0
        for message in resp.get("Messages", []):
            try:
                request = parse_train_queue_message(message.get("Body"))
            except InvalidMessage:
                continue  # poison: kept, with its reason, for operators
            receives = message.get("Attributes", {}).get("ApproximateReceiveCount", "?")
            reason = f"its request reached the train queue's dead-letter queue (seen {receives} times there)"
            loaded = self._runner.jobs.load(request.user_id, request.avatar_id, request.job_id)
            if loaded is not None and self._give_up(loaded[0], reason):
                failed += 1
        return failed

    def _give_up(self, job: JobRecord, reason: str) -> bool:
        """Fail `job` unless it is over or a live worker owns it."""
        if job.status in FINAL_STATUSES:
            return False

        def fail(record: JobRecord) -> JobRecord | None:
            lease = record.lease
            if record.status in FINAL_STATUSES or (lease is not None and lease.expires_at > utcnow()):
                return None
            record.status = "failed"
            record.error = reason
            record.finished_at = utcnow()
            record.lease = None
            return record

        final = self._runner.jobs.update(job.user_id, job.avatar_id, job.id, fail)
        if final.status != "failed" or final.error != reason:
            return False
        log.warning("job %s failed: %s", job.id, reason)
        self._runner.complete_tail(final)
        return True
