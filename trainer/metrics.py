"""Prometheus metrics of a trainer worker, served on METRICS_PORT (`/metrics`)."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

JOBS = Counter("avatune_jobs_total", "Jobs a worker ended, by outcome", ["outcome"])
JOB_DURATION = Histogram(
    "avatune_job_duration_seconds",
    "Wall time from claim to the end of a job",
    ["outcome"],
    buckets=(1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400, 43200),
)
QUEUE_WAIT = Histogram(
    "avatune_queue_wait_seconds",
    "Time from a job's creation to a worker claiming it",
    buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600),
)
TOKENS_PER_SECOND = Gauge("avatune_train_tokens_per_second", "Trained (assistant) tokens per second of the last job")
TRAINED_TOKENS = Counter("avatune_trained_tokens_total", "Assistant tokens trained on, all epochs")
POISON_MESSAGES = Counter("avatune_poison_messages_total", "Messages sent to the dead-letter queue")
BUSY = Gauge("avatune_worker_busy", "1 while the worker runs a job")


def serve(port: int) -> None:
    """Expose the metrics over HTTP (0 disables). A taken port costs the metrics, not the worker."""
    if not port:
        return
    try:
        start_http_server(port)
    except OSError as exc:
        logging.getLogger("avatune.trainer").error("cannot serve metrics on port %d: %s", port, exc)
