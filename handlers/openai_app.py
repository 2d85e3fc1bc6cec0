"""The OpenAI-compatible API, mounted at `/openai/v1` (`contracts.api_paths.OPENAI_PREFIX`):
the `files` and `fine_tuning.jobs` surface of OpenAI's API, which the official `openai` SDK
drives with `OpenAI(base_url=".../openai/v1", api_key=<avatune token>)`.

An application of its own: its errors are OpenAI's body (`handlers.openai_errors`) while the
rest of the API keeps problem+json, its OpenAPI document is `/openai/v1/openapi.json`, and the
main application builds it on its first request (`handlers.lazy_app`), so its routes and models
cost the API's cold start nothing.
"""

from __future__ import annotations

from fastapi import FastAPI

from handlers.openai_errors import install_openai_error_handlers
from handlers.routes import openai_files, openai_fine_tuning


def create_openai_app() -> FastAPI:
    app = FastAPI(
        title="avatune (OpenAI-compatible)",
        version="1",
        description="OpenAI's files and fine-tuning jobs API over avatune: each fine-tuning job is an avatune "
        "training job. The API key is the avatune token.",
    )
    install_openai_error_handlers(app)
    app.include_router(openai_files.router)
    app.include_router(openai_fine_tuning.router)
    return app
