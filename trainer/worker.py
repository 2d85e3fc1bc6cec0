"""The worker loop: long-poll the train queue, run each request, never die on a bad message.

Requests are dispatched by their `schema` through the job-kind registry
(`contracts.job_kinds`): each kind's recipe (`trainer/jobs/`) is imported and built on first
use and run by the job runtime (`trainer.runtime`); a message no kind accepts goes to the
dead-letter queue with the reason.

Shutdown: SIGTERM/SIGINT while idle ends the long poll at once; during a job the training
loop stops at the next step, checkpoints to S3 and hands the message back to the queue.

Start-up: with WARM_UP the worker imports the recipes and loads its base before it polls;
once it polls it logs so and creates READY_FILE (`contracts.readiness`), which `make dev`
and readiness probes wait for.
"""

from __future__ import annotations

import importlib
import json
import logging
import signal
import threading
import time
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from contracts import logs, readiness
from contracts.job_kinds import JOB_KINDS, kind_of, parse_train_queue_message
from contracts.jobs import JobType, utcnow
from contracts.messages import InvalidMessage, QueueRequest
from trainer import aws, metrics
from trainer.base_model import BaseModelCache, QuantOptions
from trainer.events import EventPublisher
from trainer.library_warnings import quiet_known_warnings
from trainer.runtime.context import JobWork
from trainer.runtime.dead_letters import DeadLetterSweep
from trainer.runtime.heartbeat import Delivery
from trainer.runtime.runner import JobRunner, Outcome
from trainer.settings import TrainerSettings, get_settings

log = logging.getLogger("avatune.trainer")

LONG_POLL_SECONDS = 20


class _Interrupted(BaseException):
    """Raised by the signal handler to leave an idle long poll (a BaseException, like
    KeyboardInterrupt, so no library retry loop catches it as an ordinary error)."""


PoisonMessage = InvalidMessage


def parse_request(body: str) -> QueueRequest:
    """Any request the train queue carries, by its `schema`; PoisonMessage when none fits."""
    return parse_train_queue_message(body)


class Worker:
    def __init__(self, settings: TrainerSettings | None = None) -> None:
        self.settings = settings or get_settings()
        self.shutdown = threading.Event()
        self._idle = False
        self.sqs = aws.sqs()
        self.s3 = aws.s3()
        self.train_queue_url = aws.queue_url(self.settings.train_queue_name)
        self.dlq_url = self._dead_letter_queue_url()
        token = self.settings.hf_token.get_secret_value() if self.settings.hf_token else None
        self.models = BaseModelCache(self.settings.model_cache_dir, token)
        events = EventPublisher(self.sqs, aws.queue_url(self.settings.events_queue_name))
        self.runner = JobRunner(self.settings, self.s3, self.sqs, events, self.models, self.shutdown)
        self.dead_letters = DeadLetterSweep(self.sqs, self.dlq_url, self.runner)
        self._swept_at = 0.0
        self._works: dict[JobType, JobWork] = {}

    def work_for(self, request: QueueRequest) -> JobWork:
        """What the request's job does once claimed: its kind's recipe, built once."""
        return self._work_of(kind_of(request).type)

    def _work_of(self, job_type: JobType) -> JobWork:
        if job_type not in self._works:
            module, _, name = JOB_KINDS[job_type].work.partition(":")
            self._works[job_type] = getattr(importlib.import_module(module), name)()
        return self._works[job_type]

    def _dead_letter_queue_url(self) -> str:
        attrs = self.sqs.get_queue_attributes(QueueUrl=self.train_queue_url, AttributeNames=["RedrivePolicy"])
        policy = json.loads(attrs.get("Attributes", {}).get("RedrivePolicy", "{}") or "{}")
        arn = policy.get("deadLetterTargetArn")
        if not arn:
            raise RuntimeError(f"{self.settings.train_queue_name} has no dead-letter queue (RedrivePolicy)")
        return aws.queue_url(arn.rsplit(":", 1)[-1])

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("signal %s: shutting down", signal.Signals(signum).name)
            self.shutdown.set()
            if self._idle:
                raise _Interrupted()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def warm_up(self) -> None:
        """Pay the first job's one-time costs now: import the training and generation recipes
        (transformers' Trainer, peft, ...) and load BASE_MODEL as a job with the worker's
        defaults would. A base that cannot be loaded is logged; the job that needs it fails
        with the reason later, as it would without warm-up."""
        started = time.monotonic()
        for kind in ("train", "generate"):
            self._work_of(kind)
        method = self.settings.default_method if self.settings.default_method in ("lora", "qlora") else "lora"
        try:
            self.models.get(self.settings.base_model, method, QuantOptions())
        except Exception as exc:  # reported here, and again by the job that needs it
            log.warning("warm-up could not load %s: %s", self.settings.base_model, exc)
        log.info(
            "warmed up in %.1f s (recipes imported, %s loaded for %s)",
            time.monotonic() - started,
            self.settings.base_model,
            method,
        )

    def run_forever(self) -> None:
        if self.settings.warm_up:
            self.warm_up()
        log.info(
            "worker %s polling %s (base model %s, default method %s)",
            self.settings.worker_id,
            self.train_queue_url,
            self.settings.base_model,
            self.settings.default_method,
        )
        readiness.mark_ready()
        try:
            while not self.shutdown.is_set():
                try:
                    self.poll_once()
                    self._sweep_dead_letters()
                except _Interrupted:
                    break
                except Exception:  # S3/SQS trouble beyond botocore's retries: back off, keep serving
                    log.exception("poll failed; retrying")
                    self.shutdown.wait(5)
        finally:
            readiness.mark_stopped()
        log.info("worker %s stopped", self.settings.worker_id)

    def _sweep_dead_letters(self) -> None:
        """Between polls, every DEAD_LETTER_SWEEP_SECONDS: fail the jobs of dead-lettered requests."""
        every = self.settings.dead_letter_sweep_seconds
        if not every or time.monotonic() - self._swept_at < every:
            return
        self._swept_at = time.monotonic()
        self.dead_letters.sweep()

    def poll_once(self) -> None:
        self._idle = True
        try:
            if self.shutdown.is_set():
                return
            resp = self.sqs.receive_message(
                QueueUrl=self.train_queue_url,
                MaxNumberOfMessages=1,
                WaitTimeSeconds=LONG_POLL_SECONDS,
                VisibilityTimeout=self.settings.visibility_timeout_seconds,
                MessageSystemAttributeNames=[
                    "ApproximateReceiveCount",
                    "ApproximateFirstReceiveTimestamp",
                    "MessageGroupId",
                ],
            )
        finally:
            self._idle = False
        for message in resp.get("Messages", []):
            self.handle(message)

    def handle(self, message: dict[str, Any]) -> None:
        delivery = delivery_of(self.train_queue_url, message)
        try:
            request = parse_request(message["Body"])
        except PoisonMessage as exc:
            self._dead_letter(message, str(exc))
            return
        with logs.log_context(job_id=request.job_id, user_id=request.user_id, avatar_id=request.avatar_id):
            outcome = self.runner.run(request, delivery, self.work_for(request))
        # The message the job holds now: the heartbeat may have handed it over or adopted another.
        if outcome == Outcome.DONE and delivery.receipt_handle is not None:
            self.sqs.delete_message(QueueUrl=self.train_queue_url, ReceiptHandle=delivery.receipt_handle)

    def _dead_letter(self, message: dict[str, Any], reason: str) -> None:
        metrics.POISON_MESSAGES.inc()
        log.error("message %s sent to the dead-letter queue: %s", message["MessageId"], reason)
        self.sqs.send_message(
            QueueUrl=self.dlq_url,
            MessageBody=message["Body"] or "<empty>",
            MessageGroupId="poison",
            MessageDeduplicationId=message["MessageId"],
            MessageAttributes={
                "avatune-reason": {"DataType": "String", "StringValue": reason[:1000]},
                "avatune-source-message-id": {"DataType": "String", "StringValue": message["MessageId"]},
            },
        )
        self.sqs.delete_message(QueueUrl=self.train_queue_url, ReceiptHandle=message["ReceiptHandle"])


def delivery_of(queue_url: str, message: dict[str, Any]) -> Delivery:
    """The Delivery of a received message (its first receive starts SQS's 12-hour clock)."""
    attributes = message.get("Attributes", {})
    first = attributes.get("ApproximateFirstReceiveTimestamp")
    return Delivery(
        queue_url,
        message["ReceiptHandle"],
        body=message["Body"],
        group_id=attributes.get("MessageGroupId"),
        first_received_at=datetime.fromtimestamp(int(first) / 1000, UTC) if first else utcnow(),
    )


def main() -> None:
    logs.configure("trainer")
    quiet_known_warnings()
    settings = get_settings()
    metrics.serve(settings.metrics_port)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    worker = Worker(settings)
    worker.install_signal_handlers()
    worker.run_forever()
