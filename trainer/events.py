"""Job events on the events queue (`contracts.messages.JobEvent`)."""

from __future__ import annotations

import logging
from typing import Any

from contracts.jobs import JobRecord
from contracts.messages import EventType, JobEvent

log = logging.getLogger("avatune.trainer")


class EventPublisher:
    def __init__(self, sqs: Any, queue_url: str) -> None:
        self._sqs = sqs
        self._queue_url = queue_url

    def publish(self, event_type: EventType, job: JobRecord) -> str:
        """Send the event (at-least-once: a retry sends it again with the same id); its id."""
        event = JobEvent(
            event=event_type,
            job_id=job.id,
            user_id=job.user_id,
            avatar_id=job.avatar_id,
            status=job.status,
            job_type=job.type,
            adapter_version=job.adapter_version,
            metrics=job.metrics,
            error=job.error,
        )
        self._sqs.send_message(QueueUrl=self._queue_url, MessageBody=event.to_message_body())
        log.info("event %s job=%s", event_type, job.id)
        return event.event_id
