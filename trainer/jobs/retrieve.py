"""The `retrieve` job kind: a query against the avatar's vector index.

the request (query, top_k, score_threshold, filters) -> `trainer.rag.search.search`
-> Succeeded with `result` {"passages": [...], "seconds", "embedding_model"}
"""

from __future__ import annotations

import logging
import time

from contracts.messages import RetrieveRequest
from trainer.rag.embeddings import canonical_name
from trainer.rag.search import search
from trainer.runtime.context import JobContext, JobResult, Succeeded

log = logging.getLogger("avatune.trainer")


class RetrieveWork:
    """The recipe of `retrieve` jobs."""

    def __call__(self, ctx: JobContext) -> JobResult:
        request = ctx.request()
        assert isinstance(request, RetrieveRequest)
        started = time.monotonic()
        query = request.query, request.top_k, request.score_threshold, request.filters
        passages = search(ctx.settings, ctx.user_id, ctx.avatar_id, *query)
        seconds = round(time.monotonic() - started, 4)
        result = {
            "passages": passages,
            "seconds": seconds,
            "embedding_model": canonical_name(ctx.settings.embedding_model),
        }
        log.info("retrieve job %s: %d passages in %.3fs", ctx.job.id, len(passages), seconds)
        return Succeeded(metrics={"passages": len(passages), "seconds": seconds}, result=result)
