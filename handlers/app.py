"""The FastAPI application. `uvicorn handlers.app:app` locally; `handlers.lambda_handler.handler` on Lambda."""

from __future__ import annotations

from fastapi import FastAPI

from contracts import logs
from contracts.api_paths import OPENAI_PREFIX
from handlers.lazy_app import LazyApp
from handlers.limits import RequestLimits
from handlers.problems import install_problem_handlers
from handlers.routes import adapters, context, fuse, generations, health, jobs, models, training_data
from handlers.settings import get_settings


def create_app() -> FastAPI:
    settings = get_settings()
    settings.check_startable()
    app = FastAPI(
        title="avatune",
        version="1",
        description="Per-avatar LoRA adapter training: documents, adapters, jobs.",
    )
    install_problem_handlers(app)
    app.add_middleware(
        RequestLimits,
        max_header_bytes=settings.max_header_bytes,
        max_json_body_bytes=settings.max_json_body_bytes,
    )
    app.include_router(health.router)
    app.include_router(training_data.router)
    app.include_router(adapters.router)
    app.include_router(jobs.router)
    app.include_router(fuse.router)
    app.include_router(models.router)
    app.include_router(generations.router)
    app.include_router(context.router)
    # The OpenAI-compatible API, an application of its own built on its first request (cold start).
    app.mount(OPENAI_PREFIX, LazyApp("handlers.openai_app:create_openai_app"))
    return app


logs.configure("api")
app = create_app()
