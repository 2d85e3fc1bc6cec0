"""Training jobs (`type: "train"`, `POST {base}/training-jobs`): the body's checks
(`handlers.job_spec`), then `queue_job` with what a training job adds to the common steps:

- step 2: 409 unless the avatar has a document flagged for training, the body names
  training `datasets`, or it brings inline `training_data`; a preference job (`objective` dpo or
  kto): 409 unless a flagged document holds preferences (`handlers.services.feedback`) or it
  names `datasets`;
- before the job is queued: its inline `training_data` stored as the flagged document
  `inline-{job_id}.jsonl`, and its `callbacks.auth_header` sealed for the job (the KMS
  encryption context names the job id), so the record and the queue message only ever hold
  the sealed header. Both are undone with the rest should the job not be queued.
"""

from __future__ import annotations

import asyncio
import logging

from contracts.jobs import JobRecord
from contracts.messages import TrainRequest
from contracts.sealing import SealError, job_context, seal_callbacks
from contracts.spec import JobSpec
from handlers.avatar_ref import AvatarRef
from handlers.documents import DocumentNotFound
from handlers.job_spec import TrainJobBody, check_job_body
from handlers.problems import Problem
from handlers.services.feedback import preference_documents_exist
from handlers.services.jobs import JobIntake, JobPlan, JobStage, Undo, api_request, queue_job
from handlers.settings import Settings
from handlers.training_data_store import TrainingDataStore

log = logging.getLogger("avatune.api")


def inline_document_name(job_id: str) -> str:
    """The training document a job's inline `training_data` is stored as."""
    return f"inline-{job_id}.jsonl"


async def queue_train_job(
    avatar: AvatarRef,
    body: TrainJobBody,
    documents: TrainingDataStore,
    intake: JobIntake,
    also: JobStage | None = None,
) -> JobRecord:
    """Check, create and queue a training job; its record. 422 for an impossible body (before
    anything else), then the problems of `queue_job`. `also` stores what the caller keeps beside
    the job (the OpenAI surface's entry), after the job's own stages, undone with them."""
    settings = intake.settings
    inline = check_job_body(
        body,
        user_id=avatar.user_id,
        bucket=settings.s3_bucket,
        max_gpus=settings.max_gpus_per_job,
        max_inline_bytes=settings.max_upload_bytes,
        base_model_prefixes=settings.base_model_prefixes(),
        serving=settings.serving_profile(),
    )
    config, spec = body.config(), body.spec()
    sealed: dict[str, JobSpec] = {}  # job id -> spec with callbacks.auth_header sealed (see _sealing_stage)

    def plan(job_id: str) -> TrainRequest:
        job_spec = sealed[job_id] if _has_auth_header(spec) else spec  # never the plaintext header
        return api_request(TrainRequest, avatar, job_id, config=config, **dict(job_spec))

    async def prepare() -> JobPlan:
        if spec.objective != "sft":
            if not spec.datasets and await preference_documents_exist(avatar, documents) is False:
                raise Problem(409, _no_preferences(avatar, spec.objective))
        elif inline is None and not any(source.split == "train" for source in spec.datasets):
            flagged, _ = await documents.list(avatar, True, 1)
            if not flagged:
                raise Problem(
                    409,
                    f"avatar {avatar.avatar_id!r} has no document with use_for_training=true; "
                    "upload or flag one first, or send datasets or training_data",
                )
        return plan

    stage = _inline_stage(avatar, documents, inline) if inline is not None else None
    if _has_auth_header(spec):
        stage = _sealing_stage(settings, avatar, spec, sealed, stage)
    return await queue_job(avatar, intake, prepare, _chained(stage, also))


def _chained(first: JobStage | None, then: JobStage | None) -> JobStage | None:
    """`first`, then `then`; `first` undone again should `then` fail, both by the step returned."""
    if first is None or then is None:
        return first or then

    async def stage(job_id: str) -> Undo:
        undo_first = await first(job_id)
        try:
            undo_then = await then(job_id)
        except BaseException:
            try:
                await undo_first()
            except Exception:
                log.exception("rollback step failed")
            raise

        async def undo() -> None:
            await undo_then()
            await undo_first()

        return undo

    return stage


def _no_preferences(avatar: AvatarRef, objective: str) -> str:
    return (
        f"avatar {avatar.avatar_id!r} has no preference document with use_for_training=true, and objective "
        f"{objective} trains only on those: post feedback first (POST .../feedback: a rated reply, a pair "
        "{messages, chosen, rejected} or a correction of a generation), or upload a preference .jsonl "
        "(prompt/chosen/rejected, OpenAI preference or prompt/completion/label records)"
    )


def _inline_stage(avatar: AvatarRef, documents: TrainingDataStore, data: bytes) -> JobStage:
    """Store the inline data as the job's flagged document; the step that removes it again."""

    async def stage(job_id: str) -> Undo:
        name = inline_document_name(job_id)
        await documents.put(avatar, name, data, True)

        async def remove() -> None:
            try:
                await documents.delete(avatar, name)
            except DocumentNotFound:
                pass

        return remove

    return stage


def _has_auth_header(spec: JobSpec) -> bool:
    return spec.callbacks is not None and spec.callbacks.auth_header is not None


def _sealing_stage(
    settings: Settings, avatar: AvatarRef, spec: JobSpec, sealed: dict[str, JobSpec], then: JobStage | None
) -> JobStage:
    """Seal callbacks.auth_header for the new job's id (the KMS encryption context names the
    job) into `sealed`, then run `then`. The sealer is checked now, so a deployment without one
    answers 422 before anything is stored; KMS runs in a thread (boto3 is synchronous)."""
    try:
        sealer = settings.sealer()
    except SealError:
        log.exception("CALLBACK_SEALER is misconfigured")
        raise Problem(
            503, "callbacks.auth_header cannot be stored right now; retry later", headers={"Retry-After": "30"}
        ) from None
    if sealer is None:
        raise Problem(
            422,
            "callbacks.auth_header: this deployment has no key to encrypt it at rest "
            "(CALLBACK_SEALER); send the job without it",
            field="callbacks.auth_header",
        )

    async def stage(job_id: str) -> Undo:
        context = job_context(avatar.user_id, avatar.avatar_id, job_id)
        sealed[job_id] = await asyncio.to_thread(seal_callbacks, spec, sealer, context)
        if then is not None:
            return await then(job_id)

        async def nothing() -> None:
            return None

        return nothing

    return stage
