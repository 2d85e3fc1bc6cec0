"""The SQS side of jobs: train and fuse requests to the FIFO train queue, job events to the
events queue. The only module of the API that sends to SQS."""

from __future__ import annotations

from typing import Any

from contracts.messages import AdapterEvent, JobEvent, QueueRequest

# Queue URLs never change for a name: resolve each once per process.
_queue_urls: dict[tuple[str | None, str], str] = {}


class TrainQueue:
    """Typed access to the train and events queues."""

    def __init__(self, sqs: Any, train_queue_name: str, events_queue_name: str, endpoint: str | None = None) -> None:
        self._sqs = sqs
        self._train_queue = train_queue_name
        self._events_queue = events_queue_name
        self._endpoint = endpoint

    async def _url(self, name: str) -> str:
        key = (self._endpoint, name)
        url = _queue_urls.get(key)
        if url is None:
            url = (await self._sqs.get_queue_url(QueueName=name))["QueueUrl"]
            _queue_urls[key] = url
        return url

    async def send(self, request: QueueRequest, deduplication_id: str | None = None) -> str:
        """Queue a request in the avatar's message group; the job id is the deduplication id
        (unless another is given: a job queued again), so a retried send within SQS's five-minute
        window never queues the job twice. Returns the message id."""
        resp = await self._sqs.send_message(
            QueueUrl=await self._url(self._train_queue),
            MessageBody=request.to_message_body(),
            MessageGroupId=request.message_group_id(),
            MessageDeduplicationId=deduplication_id or request.job_id,
        )
        return str(resp["MessageId"])

    async def publish(self, event: JobEvent | AdapterEvent) -> None:
        """Publish a job or adapter event on the (standard) events queue."""
        await self._sqs.send_message(QueueUrl=await self._url(self._events_queue), MessageBody=event.to_message_body())
