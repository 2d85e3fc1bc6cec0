"""Retrieve jobs: a query against the avatar's vector index; the passages land in the job's
`result` as `{"passages": [...], "seconds", "embedding_model"}` (see `trainer.rag.search`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from contracts.jobs import JobRecord
from contracts.messages import RETRIEVE_REQUEST_SCHEMA, RetrieveRequest
from trainer.errors import JobFailure
from trainer.job_runner import Delivery, JobRunner, Outcome
from trainer.rag.embeddings import canonical_name
from trainer.rag.search import search

log = logging.getLogger("avatune.trainer")


def request_of(job: JobRecord) -> RetrieveRequest:
    """The job's parameters, validated as the queue contract validates them."""
    try:
        return RetrieveRequest.model_validate(
            {
                **job.request,
                "schema": RETRIEVE_REQUEST_SCHEMA,
                "job_id": job.id,
                "user_id": job.user_id,
                "avatar_id": job.avatar_id,
            }
        )
    except ValueError as exc:
        raise JobFailure(f"invalid retrieve request: {exc}") from None


class RetrieveWork:
    """The `JobWork` of a retrieve job."""

    def __init__(self, runner: JobRunner) -> None:
        self.runner = runner

    def __call__(self, job: JobRecord, heartbeat: Any, scratch: Path, delivery: Delivery) -> str:
        runner = self.runner
        if job.result is not None:  # a retry of a job that already wrote its answer
            runner.finish(job, "succeeded", metrics={"passages": len(job.result.get("passages", []))})
            return Outcome.DONE
        request = request_of(job)
        started = time.monotonic()
        passages = search(
            runner, job.user_id, job.avatar_id, request.query, request.top_k, request.score_threshold, request.filters
        )
        seconds = round(time.monotonic() - started, 4)
        result = {
            "passages": passages,
            "seconds": seconds,
            "embedding_model": canonical_name(runner.settings.embedding_model),
        }
        runner.jobs.update(job.user_id, job.avatar_id, job.id, lambda r: _with_result(r, result))
        runner.finish(job, "succeeded", metrics={"passages": len(passages), "seconds": seconds})
        log.info("retrieve job %s: %d passages in %.3fs", job.id, len(passages), seconds)
        return Outcome.DONE


def _with_result(record: JobRecord, result: dict[str, Any]) -> JobRecord:
    record.result = result
    return record
