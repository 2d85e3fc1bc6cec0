"""Every FastAPI dependency of the API: the settings, the caller's authorisation, the typed
stores and queues, the `Idempotency-Key` header, and the bundles a service takes
(`JobIntakeDep`, `FeedbackIntakeDep`). Routes declare what they need with the aliases below
(`AuthorizedAvatar`, `JobStoreDep`, ...); nothing else in `handlers/` knows
about `Depends`, so stores, queues and services stay plain classes and functions that tests
and other entry points build directly.

Cheap on purpose: a provider only wraps the process's S3/SQS client (`handlers.aws`, created
on the first request that needs one) in a store object. aiobotocore is imported with the first
client, PyJWT with the first token (`handlers.auth`), so `/healthz` needs neither.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import Depends, Header, Path, Request
from fastapi.security import HTTPAuthorizationCredentials

from contracts import logs
from contracts.ids import InvalidIdentifier, validate_id
from handlers.adapter_store import AdapterStore
from handlers.auth import Principal, may_act_for, verified_principal
from handlers.avatar_ref import AvatarRef
from handlers.aws import s3_client, sqs_client
from handlers.context_store import ContextStore
from handlers.feedback_keys import FeedbackKeys
from handlers.file_store import FileStore
from handlers.fine_tuning_store import FineTuningStore
from handlers.idempotency import MAX_IDEMPOTENCY_KEY_LENGTH, Idempotency
from handlers.job_store import JobStore
from handlers.openapi import BEARER, ID_SCHEMA, IDEMPOTENCY_KEY_SCHEMA
from handlers.problems import Problem
from handlers.services.feedback import FeedbackIntake
from handlers.services.jobs import JobIntake
from handlers.settings import Settings, get_settings
from handlers.train_queue import TrainQueue
from handlers.training_data_store import TrainingDataStore

SettingsDep = Annotated[Settings, Depends(get_settings)]
S3ClientDep = Annotated[Any, Depends(s3_client)]
SqsClientDep = Annotated[Any, Depends(sqs_client)]


# -- the caller ------------------------------------------------------------------------------


def current_principal(
    request: Request,
    settings: SettingsDep,
    _bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
) -> Principal:
    """The verified caller (`handlers.auth`, which reads the header itself). `_bearer` only
    declares the bearer scheme in the OpenAPI document (`handlers.openapi.BEARER`)."""
    return verified_principal(request, settings)


def _checked_id(value: str, what: str) -> str:
    try:
        return validate_id(value, what)
    except InvalidIdentifier as exc:
        raise Problem(400, str(exc)) from None


async def authorized_user(
    user_id: Annotated[str, Path(description="the user's id", json_schema_extra=ID_SCHEMA)],
    principal: Annotated[Principal, Depends(current_principal)],
) -> str:
    """The path's `user_id`, once the caller is allowed to act for it."""
    if not may_act_for(principal, user_id):
        raise Problem(403, "this token may not act for another user's data")
    user_id = _checked_id(user_id, "user_id")
    logs.bind(user_id=user_id)  # async dependency: the binding lives in the request's task
    return user_id


async def authorized_avatar(
    user_id: Annotated[str, Depends(authorized_user)],
    avatar_id: Annotated[str, Path(description="the avatar's id", json_schema_extra=ID_SCHEMA)],
) -> AvatarRef:
    """The path's user and avatar, validated and authorised."""
    avatar = AvatarRef(user_id=user_id, avatar_id=_checked_id(avatar_id, "avatar_id"))
    logs.bind(avatar_id=avatar.avatar_id)
    return avatar


AuthorizedAvatar = Annotated[AvatarRef, Depends(authorized_avatar)]
AuthorizedUser = Annotated[str, Depends(authorized_user)]


async def openai_user(
    principal: Annotated[Principal, Depends(current_principal)],
    organization: Annotated[
        str | None,
        Header(
            alias="OpenAI-Organization",
            description="the user a service token acts for (the SDK's `organization`); a user's own id or absent",
        ),
    ] = None,
) -> str:
    """The user an `/openai/v1` request acts for: the token's own (the API key is the avatune
    token), or the one a service token names as its organization. 403 for a user token naming
    another user (the SDK sends OPENAI_ORG_ID from the environment as this header)."""
    if principal.is_service:
        if not organization:
            raise Problem(
                403, "a service token acts for a user: name it as the organization (OpenAI-Organization header)"
            )
        user_id = organization
    elif organization and organization != principal.subject:
        raise Problem(
            403,
            f"this API key acts for user {principal.subject!r} and may not act for organization "
            f"{organization!r} (unset OPENAI_ORG_ID or the client's organization)",
        )
    else:
        user_id = principal.subject
    user_id = _checked_id(user_id, "user_id")
    logs.bind(user_id=user_id)
    return user_id


OpenAIUser = Annotated[str, Depends(openai_user)]


# -- stores and queues -----------------------------------------------------------------------


async def training_data_store(settings: SettingsDep, s3: S3ClientDep) -> TrainingDataStore:
    return TrainingDataStore(s3, settings.s3_bucket, settings.s3_max_concurrency)


async def context_store(settings: SettingsDep, s3: S3ClientDep) -> ContextStore:
    return ContextStore(s3, settings.s3_bucket, settings.s3_max_concurrency)


async def adapter_store(settings: SettingsDep, s3: S3ClientDep) -> AdapterStore:
    return AdapterStore(s3, settings.s3_bucket, settings.s3_max_concurrency)


async def job_store(settings: SettingsDep, s3: S3ClientDep) -> JobStore:
    return JobStore(s3, settings.s3_bucket, settings.s3_max_concurrency)


async def file_store(settings: SettingsDep, s3: S3ClientDep) -> FileStore:
    return FileStore(s3, settings.s3_bucket, settings.s3_max_concurrency)


async def fine_tuning_store(settings: SettingsDep, s3: S3ClientDep) -> FineTuningStore:
    return FineTuningStore(s3, settings.s3_bucket, settings.s3_max_concurrency)


async def train_queue(settings: SettingsDep, sqs: SqsClientDep) -> TrainQueue:
    return TrainQueue(sqs, settings.train_queue_name, settings.events_queue_name, settings.aws_endpoint_url)


TrainingDataStoreDep = Annotated[TrainingDataStore, Depends(training_data_store)]
ContextStoreDep = Annotated[ContextStore, Depends(context_store)]
AdapterStoreDep = Annotated[AdapterStore, Depends(adapter_store)]
JobStoreDep = Annotated[JobStore, Depends(job_store)]
TrainQueueDep = Annotated[TrainQueue, Depends(train_queue)]
FileStoreDep = Annotated[FileStore, Depends(file_store)]
FineTuningStoreDep = Annotated[FineTuningStore, Depends(fine_tuning_store)]


# -- request headers -------------------------------------------------------------------------


async def idempotency(
    request: Request,
    key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="1 to 255 characters (400 otherwise): a retry with the same key and the same request "
            "answers what the first one created (the job, or the feedback item) and creates nothing; the key used "
            "for a different request: 422",
            json_schema_extra=IDEMPOTENCY_KEY_SCHEMA,  # declared, not enforced here: the dependency answers 400
            examples=["4f1c2a9e-7b3d-4e0a-9c55-2d8e6f1b0a37"],
        ),
    ] = None,
) -> Idempotency | None:
    """The request's Idempotency (None without the header); 400 for a key of a bad length."""
    if key is None:
        return None
    if not key or len(key) > MAX_IDEMPOTENCY_KEY_LENGTH:
        raise Problem(400, f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} characters")
    body = await request.body()  # cached by Starlette: the route's body parsing reads the same bytes
    return Idempotency.of(key, request.method, request.url.path, body)


IdempotencyDep = Annotated[Idempotency | None, Depends(idempotency)]


# -- creating jobs ---------------------------------------------------------------------------


async def job_intake(
    jobs: JobStoreDep, queue: TrainQueueDep, settings: SettingsDep, idempotency: IdempotencyDep
) -> JobIntake:
    """What every route that creates a job hands its service (`handlers.services.jobs.queue_job`)."""
    return JobIntake(jobs, queue, settings, idempotency)


JobIntakeDep = Annotated[JobIntake, Depends(job_intake)]


async def feedback_intake(
    documents: TrainingDataStoreDep, jobs: JobStoreDep, settings: SettingsDep, s3: S3ClientDep
) -> FeedbackIntake:
    """Where `POST {base}/feedback` stores its item and its Idempotency-Key record."""
    return FeedbackIntake(
        documents,
        jobs,
        FeedbackKeys(s3, settings.s3_bucket, settings.s3_max_concurrency),
        settings.max_upload_bytes,
        timedelta(hours=settings.idempotency_key_ttl_hours),
    )


FeedbackIntakeDep = Annotated[FeedbackIntake, Depends(feedback_intake)]
