"""The FastAPI application. `uvicorn handlers.app:app` locally; `handlers.lambda_handler.handler` on Lambda."""

from __future__ import annotations

from fastapi import FastAPI

from contracts import logs
from contracts.api_paths import OPENAI_PREFIX
from handlers import openapi
from handlers.lazy_app import LazyApp
from handlers.limits import RequestLimits
from handlers.problems import install_problem_handlers
from handlers.routes import (
    adapters,
    context,
    exports,
    feedback,
    fuse,
    generations,
    health,
    jobs,
    models,
    training_data,
)
from handlers.settings import get_settings

DESCRIPTION = """Per-avatar LoRA adapter training: documents, adapters, jobs.

Every route under `/v1` needs `Authorization: Bearer <JWT>` whose `sub` is the path's `{user_id}`:
press **Authorize** and paste one (`avatune token alice` prints one for `make dev`). Every error is
`application/problem+json` (RFC 9457). Jobs (training, fuse, generations, index, retrievals) answer
202 with the job; follow it with `GET .../training-jobs/{job_id}` until its `status` is final.
Guide: the README's Quickstart and `docs/` (`make docs`)."""


def create_app() -> FastAPI:
    settings = get_settings()
    settings.check_startable()
    app = FastAPI(
        title="avatune",
        version="1",
        description=DESCRIPTION,
    )
    install_problem_handlers(app)
    app.add_middleware(
        RequestLimits,
        max_header_bytes=settings.max_header_bytes,
        max_json_body_bytes=settings.max_json_body_bytes,
    )
    openapi.install(app)
    app.include_router(health.router)
    app.include_router(training_data.router)
    app.include_router(adapters.router)
    app.include_router(jobs.router)
    app.include_router(fuse.router)
    app.include_router(models.router)
    app.include_router(generations.router)
    app.include_router(exports.router)
    app.include_router(context.router)
    app.include_router(feedback.router)
    # The OpenAI-compatible API, an application of its own built on its first request (cold start).
    app.mount(OPENAI_PREFIX, LazyApp("handlers.openai_app:create_openai_app"))
    return app


logs.configure("api")
app = create_app()
