"""The FastAPI application. `uvicorn handlers.app:app` locally; `handlers.lambda_handler.handler` on Lambda."""

from __future__ import annotations

from fastapi import FastAPI

from contracts import logs
from handlers.problems import install_problem_handlers
from handlers.routes import adapters, context, exports, fuse, generations, health, jobs, models, training_data
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
    app.include_router(health.router)
    app.include_router(training_data.router)
    app.include_router(adapters.router)
    app.include_router(jobs.router)
    app.include_router(fuse.router)
    app.include_router(models.router)
    app.include_router(generations.router)
    app.include_router(exports.router)
    app.include_router(context.router)
    return app


logs.configure("api")
app = create_app()
