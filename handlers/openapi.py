"""What `/openapi.json` (and so Swagger UI at `/docs`) says beyond the routes' signatures, in
one place:

- `BEARER`: the bearer-token security scheme (FastAPI's `HTTPBearer`, so Swagger UI has an
  Authorize button). It only declares the scheme: `handlers.auth` verifies the token and
  answers 401 itself (problem+json), in `jwt` and `apigateway` mode alike;
- `problems(...)`: the problem+json answers a route can give, by status, with the shared
  `Problem` schema (`handlers.problems` writes them) and an example each. A route declares
  its own; `AUTHORIZED` is what every route behind the bearer token can answer;
- the path parameters' rules (ids, document names), declared for clients and fuzzers: the
  routes check them (`contracts.ids`) and answer 400, not FastAPI's 422;
- `raw_document_body(...)`: the request body of the PUTs that take a document's raw bytes
  (FastAPI sees no body parameter there: the route reads the stream itself, capped);
- request examples (`examples`), shown in Swagger UI's "Try it out";
- `install(app)`: adds the `Problem` schema to the document's components (the responses
  refer to it by `$ref`; FastAPI only collects models that routes return).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Annotated, Any

from fastapi import FastAPI, Path
from fastapi.openapi.utils import get_openapi
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from contracts.ids import CONTEXT_DOCUMENT_EXTENSIONS, DOCUMENT_EXTENSIONS, MAX_DOCUMENT_NAME_LENGTH, MAX_ID_LENGTH
from handlers.idempotency import MAX_IDEMPOTENCY_KEY_LENGTH
from handlers.problems import PROBLEM_JSON

BEARER = HTTPBearer(
    auto_error=False,  # handlers.auth answers the 401 (problem+json), not FastAPI
    scheme_name="bearer",
    bearerFormat="JWT",
    description='A JWT whose `sub` is the `{user_id}` of the path (`"role": "service"` may act for any user). '
    "Locally: `avatune token alice` (or `python -m handlers.devtoken alice`) prints one for `make dev`.",
)


class ProblemDocument(BaseModel):
    """An error (RFC 9457 problem details), `application/problem+json`. Some carry more
    members: `field` (the first invalid field's dotted path), `errors` (every invalid field),
    `line` (a malformed document's line), `active_job_id`, `job_id`, `version`."""

    model_config = ConfigDict(extra="allow", title="Problem")

    type: str = Field(default="about:blank", examples=["about:blank"])
    title: str = Field(description="the status's phrase, or a short title", examples=["Not Found"])
    status: int = Field(description="the HTTP status", examples=[404])
    detail: str = Field(description="what went wrong, for a person", examples=["no training document named 'x.txt'"])
    instance: str | None = Field(default=None, description="the request's path")
    field: str | None = Field(default=None, description="422: the first invalid field's dotted path")
    line: int | None = Field(default=None, description="422: a malformed document's line (1-based)")
    errors: list[dict[str, Any]] | None = Field(default=None, description="422: every invalid field: `loc`, `msg`")


# What each status means in this API, and an example detail.
_MEANINGS: dict[int, tuple[str, str]] = {
    400: ("a bad id, name, cursor or Idempotency-Key", "avatar_id: must be 1-64 letters, digits, '-', '_' or '.'"),
    401: ("no, an expired or an invalid bearer token", "missing bearer token: send 'Authorization: Bearer <JWT>'"),
    403: ("the token may not act for this user", "this token may not act for another user's data"),
    404: ("no such thing", "avatar 'my-avatar' has no job job-0193a1b2c3d4e-1a2b3c4d"),
    409: (
        "a conflict: the avatar already has an active job, or what the request needs is missing",
        "avatar 'my-avatar' already has an active job job-0193a1b2c3d4e-1a2b3c4d; cancel it or wait for it to end",
    ),
    413: (
        "the body is larger than MAX_UPLOAD_BYTES: use the presigned `uploads` route",
        "the document is larger than 5242880 bytes (MAX_UPLOAD_BYTES): POST .../training-data/uploads",
    ),
    422: ("an invalid body, query or document; `field` names the field", "num_epochs: Input should be greater than 0"),
    431: (
        "request headers larger than MAX_HEADER_BYTES",
        "request headers of 1048700 bytes exceed MAX_HEADER_BYTES (16384)",
    ),
    429: (
        "the user is at MAX_ACTIVE_JOBS_PER_USER (see Retry-After)",
        "this user already has 4 queued or running jobs (MAX_ACTIVE_JOBS_PER_USER); retry when one ends",
    ),
    500: ("an unexpected error (never a stack trace)", "an internal error occurred; retry later"),
    503: (
        "S3 or SQS could not be reached, nothing was kept: retry (see Retry-After)",
        "could not queue the job; retry",
    ),
}


def problems(*statuses: int, **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route for these problem statuses; `descriptions` (`_404="..."`)
    say what a status means on this route in place of the general meaning."""
    answers: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        meaning, example = _MEANINGS[status]
        answers[status] = {
            "description": descriptions.get(f"_{status}", meaning),
            "content": {
                PROBLEM_JSON: {
                    "schema": {"$ref": "#/components/schemas/Problem"},
                    "example": {
                        "type": "about:blank",
                        "title": HTTPStatus(status).phrase,
                        "status": status,
                        "detail": example,
                    },
                }
            },
        }
    return answers


# Every route behind the bearer token (router-level `responses=`); 413 is a JSON body over
# MAX_JSON_BODY_BYTES (or a document over MAX_UPLOAD_BYTES), 431 headers over MAX_HEADER_BYTES.
AUTHORIZED = problems(
    400,
    401,
    403,
    413,
    422,
    431,
    500,
    _413="a body larger than MAX_JSON_BODY_BYTES (JSON) or MAX_UPLOAD_BYTES (a document)",
)
# A route that creates a job (training, fuse, generation, index, retrieval).
JOB_CREATED = (409, 422, 429, 503)


def raw_document_body(formats: str, example: str) -> dict[str, Any]:
    """`openapi_extra` of a PUT whose body is a document's raw bytes (`--data-binary @file`):
    any Content-Type is accepted (the name's extension picks the format)."""
    return {
        "requestBody": {
            "required": True,
            "description": f"the document's bytes ({formats}); the name's extension picks the format, "
            "the Content-Type is not looked at",
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                "text/plain": {"schema": {"type": "string"}, "example": example},
            },
        }
    }


def document_download(*media_types: str) -> dict[int | str, dict[str, Any]]:
    """The 200 of a route that streams a stored document: its bytes in the type it was stored
    with (by its extension; `application/octet-stream` for an object written behind the API)."""
    binary = {"schema": {"type": "string", "format": "binary"}}
    content = {media_type: binary for media_type in (*media_types, "application/octet-stream")}
    return {200: {"description": "the document's bytes, with its ETag", "content": content}}


IDEMPOTENCY_KEY_SCHEMA = {"minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY_LENGTH}

# The rules of `contracts.ids`, declared (not enforced: the routes check them and answer 400).
# No '..' anywhere: dots only between other characters (a lone trailing one aside, for ids).
ID_SCHEMA = {"pattern": r"^[A-Za-z0-9][A-Za-z0-9_@-]*(\.[A-Za-z0-9_@-]+)*\.?$", "maxLength": MAX_ID_LENGTH}


def _any_case(extension: str) -> str:
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in extension.lstrip("."))


def document_name_schema(extensions: tuple[str, ...]) -> dict[str, Any]:
    """A document name as `contracts.ids.validate_document_name` accepts it, ending in `extensions`."""
    ends = "|".join(_any_case(e) for e in extensions)
    char = r"[A-Za-z0-9_@ ()+-]"
    return {"pattern": rf"^[A-Za-z0-9]{char}*(\.{char}+)*\.({ends})$", "maxLength": MAX_DOCUMENT_NAME_LENGTH}


JobIdPath = Annotated[str, Path(description="the job's id", json_schema_extra=ID_SCHEMA)]
TrainingDocumentName = Annotated[
    str,
    Path(
        description=f"the document's name: letters, digits, spaces and _ - . @ ( ) +, ending in "
        f"{', '.join(DOCUMENT_EXTENSIONS)}",
        json_schema_extra=document_name_schema(DOCUMENT_EXTENSIONS),
    ),
]
ContextDocumentName = Annotated[
    str,
    Path(
        description=f"the document's name: letters, digits, spaces and _ - . @ ( ) +, ending in "
        f"{', '.join(CONTEXT_DOCUMENT_EXTENSIONS)}",
        json_schema_extra=document_name_schema(CONTEXT_DOCUMENT_EXTENSIONS),
    ),
]

# Request examples (`openapi_examples` of a body): what Swagger UI's "Try it out" offers.
TRAINING_DOCUMENT_EXAMPLE = (
    '{"messages": [{"role": "user", "content": "How was the trip?"}, '
    '{"role": "assistant", "content": "Long, but the food was great."}]}\n'
)
CONTEXT_DOCUMENT_EXAMPLE = '{"text": "The museum opens at 9 on weekdays.", "metadata": {"lang": "en"}}\n'
TRAIN_JOB_EXAMPLES: dict[str, dict[str, Any]] = {
    "defaults": {"summary": "the avatar's configuration and the worker's defaults", "value": {}},
    "overrides": {"summary": "a few flat overrides", "value": {"r": 8, "num_epochs": 2, "learning_rate": 0.0002}},
    "if_better": {
        "summary": "keep the current adapter unless the new one is better, and call back",
        "value": {
            "promote": "if_better",
            "callbacks": {"webhook_url": "https://hooks.example.com/avatune", "auth_header": "Token s3cr3t"},
        },
    },
    "inline": {
        "summary": "inline training data",
        "value": {
            "training_data": [
                {
                    "messages": [
                        {"role": "user", "content": "How was the trip?"},
                        {"role": "assistant", "content": "Long, but the food was great."},
                    ]
                }
            ],
            "num_epochs": 2,
        },
    },
}
GENERATION_EXAMPLES: dict[str, dict[str, Any]] = {
    "current": {"summary": "the current adapter", "value": {"prompt": "How was the trip?", "max_new_tokens": 64}},
    "base": {"summary": "the base model alone", "value": {"prompt": "How was the trip?", "adapter_version": 0}},
    "rag": {
        "summary": "with passages from the avatar's index",
        "value": {"prompt": "When can I visit?", "rag": {"top_k": 3}},
    },
}
RETRIEVAL_EXAMPLES: dict[str, dict[str, Any]] = {
    "query": {
        "summary": "the 3 closest chunks in English",
        "value": {"query": "When does the museum open?", "top_k": 3, "filters": {"lang": "en"}},
    }
}
ADAPTER_CONFIG_EXAMPLES: dict[str, dict[str, Any]] = {
    "rank": {"summary": "rank and epochs", "value": {"r": 8, "num_epochs": 2}},
    "reset": {"summary": "all linear projections again", "value": {"target_modules": None}},
}


def install(app: FastAPI) -> None:
    """Serve the document with the `Problem` schema the responses refer to (built once)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
                tags=app.openapi_tags,
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components["Problem"] = ProblemDocument.model_json_schema(ref_template="#/components/schemas/{model}")
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
