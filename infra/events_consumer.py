"""The events queue's consumer for local development: `python -m infra.events_consumer`.

In AWS an SQS event source mapping hands batches of the events queue to the events Lambda
(`handlers.events_handler.handler`, ReportBatchItemFailures). `make dev` and docker compose
have no Lambda, so this process plays the mapping: it long-polls the queue, hands each batch
to the same handler in the same record shape, deletes the records that succeeded and leaves
the failed ones to reappear after the visibility timeout (and reach the DLQ after the queue's
maxReceiveCount), as the mapping does. Webhooks are therefore delivered locally too.

Environment: AWS_ENDPOINT_URL, EVENTS_QUEUE_NAME (default avatune-events) and the events
function's own variables (S3_BUCKET, WEBHOOK_*, CALLBACK_*; see docs/configuration.md),
LOG_FORMAT, and READY_FILE (created once it polls: `contracts.readiness`).
SIGTERM or SIGINT stops it after the batch in hand.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import boto3

from contracts import logs, readiness
from handlers.events_handler import handler

log = logging.getLogger("avatune.events.consumer")

BATCH_SIZE = 10  # the mapping's default batch size for a standard queue
WAIT_SECONDS = 5


def lambda_records(messages: list[dict[str, Any]], queue_arn: str, region: str) -> list[dict[str, Any]]:
    """SQS messages in the shape Lambda's event source mapping gives the handler."""
    return [
        {
            "messageId": m["MessageId"],
            "receiptHandle": m["ReceiptHandle"],
            "body": m["Body"],
            "attributes": m.get("Attributes", {}),
            "messageAttributes": m.get("MessageAttributes", {}),
            "md5OfBody": m.get("MD5OfBody", ""),
            "eventSource": "aws:sqs",
            "eventSourceARN": queue_arn,
            "awsRegion": region,
        }
        for m in messages
    ]


class _Interrupted(BaseException):
    """Raised by the signal handler to leave an idle long poll at once (like KeyboardInterrupt,
    not an Exception, so no retry loop catches it)."""


class EventsConsumer:
    """Polls the events queue and runs the events Lambda's handler on each batch."""

    def __init__(self, sqs: Any, queue_url: str, region: str) -> None:
        self.sqs = sqs
        self.queue_url = queue_url
        self.region = region
        self.queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"
        ]
        self.stopping = False
        self.receiving = False

    def stop(self) -> None:
        """Stop after the batch in hand; at once while waiting for one."""
        self.stopping = True
        if self.receiving:
            raise _Interrupted

    def poll_once(self, wait_seconds: int = WAIT_SECONDS) -> tuple[int, int]:
        """Receive one batch, hand it to the handler, delete what succeeded: (handled, failed)."""
        self.receiving = True
        try:
            if self.stopping:
                return 0, 0
            messages = self.sqs.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=BATCH_SIZE,
                WaitTimeSeconds=wait_seconds,
                AttributeNames=["All"],
                MessageAttributeNames=["All"],
            ).get("Messages", [])
        finally:
            self.receiving = False
        if not messages:
            return 0, 0
        records = lambda_records(messages, self.queue_arn, self.region)
        try:
            failed = {f["itemIdentifier"] for f in handler({"Records": records})["batchItemFailures"]}
        except Exception:  # the whole invocation failed: the mapping retries the whole batch
            log.exception("events handler raised; the batch will be redelivered")
            return len(records), len(records)
        done = [
            {"Id": str(i), "ReceiptHandle": r["receiptHandle"]}
            for i, r in enumerate(records)
            if r["messageId"] not in failed
        ]
        if done:
            self.sqs.delete_message_batch(QueueUrl=self.queue_url, Entries=done)
        return len(records), len(failed)

    def run(self) -> None:
        while not self.stopping:
            try:
                self.poll_once()
            except _Interrupted:
                break
            except Exception:  # the queue endpoint hiccuped: wait and poll again
                log.exception("polling the events queue failed")
                time.sleep(2)


def main() -> None:
    logs.configure("events")
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    sqs = boto3.client("sqs", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None, region_name=region)
    queue_url = sqs.get_queue_url(QueueName=os.environ.get("EVENTS_QUEUE_NAME", "avatune-events"))["QueueUrl"]
    consumer = EventsConsumer(sqs, queue_url, region)

    def on_signal(*_: object) -> None:
        consumer.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("consuming %s", queue_url)
    readiness.mark_ready()
    try:
        consumer.run()
    finally:
        readiness.mark_stopped()


if __name__ == "__main__":
    main()
