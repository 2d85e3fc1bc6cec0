"""The `index` job kind: (re)build the avatar's part of the user's vector index.

the request (chunk_size, chunk_overlap, full; the worker's defaults where unset)
-> `trainer.rag.indexing.build_index` (incremental: only new and changed documents are
   embedded; stops between batches when told to) -> Succeeded with the counts as `result`
"""

from __future__ import annotations

import logging
from typing import Any

from contracts.jobs import JobProgress
from contracts.messages import IndexRequest
from trainer.rag.indexing import BuildStopped, build_index
from trainer.runtime.context import JobContext, JobResult, Stopped, Succeeded

log = logging.getLogger("avatune.trainer")


class IndexWork:
    """The recipe of `index` jobs (see the module docstring)."""

    def __call__(self, ctx: JobContext) -> JobResult:
        settings = ctx.settings
        request = ctx.request()
        assert isinstance(request, IndexRequest)
        chunk_size = request.chunk_size or settings.chunk_size
        chunk_overlap = request.chunk_overlap if request.chunk_overlap is not None else settings.chunk_overlap
        try:
            result = build_index(
                ctx.stores.s3,
                settings,
                ctx.user_id,
                ctx.avatar_id,
                ctx.job.id,
                ctx.control,
                chunk_size=chunk_size,
                chunk_overlap=chunk_overlap,
                full=request.full,
            )
        except BuildStopped as stop:
            return Stopped(stop.reason or "stopped")
        log.info(
            "index job %s: %d documents (%d added, %d changed, %d removed, %d kept), %d chunks embedded in %.1fs",
            ctx.job.id,
            result["documents"],
            result["documents_added"],
            result["documents_changed"],
            result["documents_removed"],
            result["documents_kept"],
            result["chunks_added"],
            result["seconds"],
        )
        chunks = result["chunks_added"]
        return Succeeded(metrics=_metrics(result), result=result, progress=JobProgress(step=chunks, total_steps=chunks))


def _metrics(result: dict[str, Any]) -> dict[str, Any]:
    """The counts and timings of the result (job events carry metrics, not results)."""
    return {k: v for k, v in result.items() if isinstance(v, (int, float, bool)) and v is not None}
