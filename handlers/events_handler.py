"""AWS Lambda entry point for the events queue: `handlers.events_handler.handler`.

The events queue carries `contracts.messages.JobEvent`s (`job.started`, `job.succeeded`,
`job.failed`, `job.cancelled`) published by the trainer and, for cancellations of queued jobs,
by the API, and `AdapterEvent`s (`adapter.promoted`) the API publishes when a kept version is
made current (logged; they have no job, so no webhook). An SQS event source mapping with
`FunctionResponseTypes: [ReportBatchItemFailures]` invokes `handler` with up to a batch of
records; the handler answers the partial batch response

    {"batchItemFailures": [{"itemIdentifier": "<messageId>"}, ...]}

so only the records that failed are retried (and, after the queue's maxReceiveCount, land in
the events DLQ); the others are deleted. A malformed record fails alone.

What is done with an event lives behind one seam, `deliver(event)`: a structured log line,
then, for a final event, the job's webhook (`handlers.webhooks`: signed POST, SSRF checks,
retries). A delivery that must be retried raises, and only its record is reported failed.

Deliberately light: this module imports pydantic, `contracts` and `handlers.webhooks` (standard
library) only; boto3 (in the Lambda runtime) is imported on the first final event, never
FastAPI or torch.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from contracts.messages import (
    ADAPTER_EVENT_SCHEMA,
    JOB_EVENT_SCHEMA,
    AdapterEvent,
    InvalidMessage,
    JobEvent,
    message_payload,
    parse_message,
)
from handlers import webhooks

log = logging.getLogger("avatune.events")
# The Lambda Python runtime leaves the root logger at WARNING: keep our INFO lines.
log.setLevel(logging.INFO)


MalformedEvent = InvalidMessage


def parse_event(body: Any) -> JobEvent | AdapterEvent:
    """Parse one SQS message body into a JobEvent or an AdapterEvent (by its `schema`), or raise
    MalformedEvent saying why."""
    if isinstance(body, str) and message_payload(body).get("schema") == ADAPTER_EVENT_SCHEMA:
        return parse_message(body, AdapterEvent, ADAPTER_EVENT_SCHEMA)
    return parse_message(body, JobEvent, JOB_EVENT_SCHEMA)


# Time kept back from the invocation's remaining time: the handler must answer before Lambda
# stops it, or the whole batch (other users' events included) is retried.
RESERVE_SECONDS = 2.0


def log_adapter_event(event: AdapterEvent) -> None:
    entry = {
        "message": "adapter event",
        "event": event.event,
        "user_id": event.user_id,
        "avatar_id": event.avatar_id,
        "adapter_version": event.adapter_version,
        "previous_version": event.previous_version,
        "occurred_at": event.occurred_at.isoformat(),
    }
    log.info(json.dumps(entry, default=str), extra={"user_id": event.user_id, "avatar_id": event.avatar_id})


def deliver(event: JobEvent, budget: float | None = None) -> None:
    """Act on one job event: return on success, raise to have the record retried (and
    dead-lettered after the queue's maxReceiveCount). One structured JSON log line, then the
    job's webhook for a final event (`handlers.webhooks.deliver`)."""
    entry = {
        "message": "job event",
        "event": event.event,
        "job_id": event.job_id,
        "user_id": event.user_id,
        "avatar_id": event.avatar_id,
        "status": event.status,
        "adapter_version": event.adapter_version,
        "error": event.error,
        "occurred_at": event.occurred_at.isoformat(),
    }
    log.info(
        json.dumps(entry, default=str),
        extra={"job_id": event.job_id, "user_id": event.user_id, "avatar_id": event.avatar_id},
    )
    webhooks.deliver(event, budget)


def process_record(record: dict[str, Any], budget: float | None = None) -> JobEvent | AdapterEvent:
    """Parse and deliver one SQS record within `budget` seconds; raises on any failure."""
    event = parse_event(record.get("body"))
    if isinstance(event, AdapterEvent):
        log_adapter_event(event)
    else:
        deliver(event, budget)
    return event


def _budget(context: Any, records_left: int) -> float | None:
    """A record's share of the invocation's remaining time (None outside Lambda)."""
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    if remaining is None:
        return None
    return max(0.0, (remaining() / 1000 - RESERVE_SECONDS) / max(records_left, 1))


def handler(event: dict[str, Any], context: Any = None) -> dict[str, list[dict[str, str]]]:
    """SQS batch handler with partial batch responses (ReportBatchItemFailures)."""
    failures: list[dict[str, str]] = []
    records = (event or {}).get("Records") or []
    for index, record in enumerate(records):
        message_id = record.get("messageId") if isinstance(record, dict) else None
        try:
            if not isinstance(record, dict):
                raise MalformedEvent("record is not an object")
            budget = _budget(context, len(records) - index)
            if budget is not None and budget <= 0:
                raise TimeoutError("the invocation is out of time: left for the next one")
            process_record(record, budget)
        except MalformedEvent as exc:
            log.error(json.dumps({"message": "malformed job event", "message_id": message_id, "reason": str(exc)}))
            failures.append({"itemIdentifier": str(message_id)})
        except Exception:  # delivery trouble: retry this record only
            log.exception(json.dumps({"message": "job event delivery failed", "message_id": message_id}))
            failures.append({"itemIdentifier": str(message_id)})
    return {"batchItemFailures": failures}
