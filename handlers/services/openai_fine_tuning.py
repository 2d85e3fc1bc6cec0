"""`/openai/v1/fine_tuning/jobs`: OpenAI-compatible fine-tuning jobs, each an ordinary avatune
`train` job (`handlers.services.train_jobs.queue_train_job`: slot, per-user cap, Idempotency-Key,
rollback; listed under `{base}/training-jobs`, cancelled, published and announced like any
other) plus its `FineTuningEntry` (`handlers.fine_tuning_store`), written before the job's
record and rolled back with it.

How a request becomes a job:

- the avatar: `metadata["avatar_id"]`, else `suffix`, else `DEFAULT_AVATAR`;
- `model`: an `OPENAI_MODEL_ALIASES` entry's base; an OpenAI-hosted name (`gpt-...`, `o1...`,
  `babbage-002`, ...) trains the trainer's `BASE_MODEL`; anything else is the base itself
  (a Hugging Face id or an `s3://` prefix, checked like `base_model.name`);
- `training_file` (and `validation_file`): the user's files, as the job's `datasets`
  (`split: "eval"` for the validation file: the job's held-out set), with
  `use_flagged_documents: false`, so the job trains on the file alone;
- hyperparameters (`method.supervised.hyperparameters`, or the deprecated top-level ones):
  `n_epochs` -> `tuning.num_epochs`, `batch_size` -> `tuning.batch_size`,
  `learning_rate_multiplier` -> `tuning.learning_rate` = multiplier x 2e-4 (avatune's documented
  default learning rate), `"auto"` -> unset (the avatar's config, then the worker's defaults);
  `seed` -> `tuning.seed`;
- `integrations`: `wandb` -> `integrations.report_to: ["wandb"]` (an offline run in the job's
  log_uri); any other type is a 400;
- `method`: `supervised` only; `dpo` and `reinforcement` are 400s (avatune has no preference
  or reinforcement training);
- webhooks: `metadata["webhook_url"]` (and `metadata["webhook_signing_secret_ref"]`) -> the job's
  `callbacks` (OpenAI's request has no webhook of its own; an Authorization header, a secret,
  has no place in metadata, which is shown back).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from pydantic import ValidationError

from contracts.documents import first_error
from contracts.ids import InvalidIdentifier, is_valid_id, validate_id
from contracts.jobs import JobRecord
from contracts.spec import BaseModelSpec, Callbacks, DatasetSource, Integrations, Tuning
from handlers.avatar_ref import AvatarRef
from handlers.file_store import FileStore
from handlers.fine_tuning_store import FineTuningStore
from handlers.job_spec import TrainJobBody
from handlers.job_store import JobStore, fill_page
from handlers.openai_models import (
    CursorPage,
    FineTuningEntry,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobCreate,
    FineTuningJobEvent,
    Hyperparameters,
)
from handlers.openai_views import DEFAULT_LEARNING_RATE, event_key, job_checkpoints, job_events, job_object
from handlers.problems import Problem
from handlers.services import jobs as job_service
from handlers.services.jobs import JobIntake, Undo
from handlers.services.openai_files import FINE_TUNE, stored_file
from handlers.services.train_jobs import queue_train_job
from handlers.settings import Settings
from handlers.train_queue import TrainQueue
from handlers.training_data_store import TrainingDataStore

DEFAULT_AVATAR = "default"
NO_PAUSE = (
    "pausing and resuming are not available: an avatune job runs to its end or is cancelled (its trainer "
    "stops it at the next step); cancel it, and train the avatar again later (warm_start continues its adapter)"
)
# OpenAI's own models: avatune cannot train their weights; they train the deployment's BASE_MODEL.
OPENAI_HOSTED = re.compile(r"^(gpt-|chatgpt-|o\d|babbage-|davinci-)")


@dataclass(frozen=True)
class JobStores:
    """What a fine-tuning request reads and writes besides the job itself (`JobIntake`)."""

    files: FileStore
    entries: FineTuningStore
    documents: TrainingDataStore


def _bad(param: str, message: str, code: str | None = None) -> Problem:
    return Problem(400, message, field=param, **({"code": code} if code else {}))


def _avatar_of(body: FineTuningJobCreate) -> str:
    """The avatar the job trains."""
    named = (body.metadata or {}).get("avatar_id")
    param, avatar_id = ("metadata.avatar_id", named) if named else ("suffix", body.suffix or DEFAULT_AVATAR)
    try:
        return validate_id(avatar_id, param)
    except InvalidIdentifier as exc:
        raise _bad(param, f"{exc} (it names the avatar the job trains)") from None


def base_model_of(model: str, aliases: dict[str, str]) -> str | None:
    """The base model `model` trains (None: the trainer's BASE_MODEL)."""
    if model in aliases:
        return aliases[model] or None
    if model.startswith("ft:"):
        raise _bad(
            "model",
            "continuing a fine-tuned model is not supported here: train its avatar again "
            "(POST .../training-jobs with warm_start) or name a base model",
            "model_not_available",
        )
    return None if OPENAI_HOSTED.match(model) else model


def _hyperparameters(body: FineTuningJobCreate) -> Hyperparameters:
    method = body.method
    if method is not None and method.type != "supervised":
        raise _bad(
            "method.type",
            f"method {method.type!r} is not available: avatune trains supervised (chat) fine-tunes",
            "unsupported_method",
        )
    nested = method.supervised.hyperparameters if method and method.supervised else None
    if nested is not None and body.hyperparameters is not None:
        raise _bad(
            "hyperparameters",
            "send hyperparameters under method.supervised.hyperparameters or at the top level, not both",
        )
    return nested or body.hyperparameters or Hyperparameters()


def _tuning(hyper: Hyperparameters, seed: int | None) -> Tuning | None:
    def given(value: object) -> object:
        return None if value == "auto" else value

    multiplier = given(hyper.learning_rate_multiplier)
    values = {
        "num_epochs": given(hyper.n_epochs),
        "batch_size": given(hyper.batch_size),
        "learning_rate": min(1.0, float(multiplier) * DEFAULT_LEARNING_RATE) if multiplier is not None else None,
        "seed": seed,
    }
    values = {k: v for k, v in values.items() if v is not None}
    return Tuning.model_validate(values) if values else None


def _callbacks(metadata: dict[str, str] | None) -> Callbacks | None:
    url, ref = (metadata or {}).get("webhook_url"), (metadata or {}).get("webhook_signing_secret_ref")
    if url is None and ref is None:
        return None
    try:
        return Callbacks.model_validate({"webhook_url": url, "signing_secret_ref": ref})
    except ValidationError as exc:
        param = "metadata.webhook_signing_secret_ref" if exc.errors()[0]["loc"] else "metadata.webhook_url"
        raise _bad(param, f"{param}: {first_error(exc)}") from None


def _integrations(body: FineTuningJobCreate) -> Integrations | None:
    if not body.integrations:
        return None
    for i, integration in enumerate(body.integrations):
        if integration.type != "wandb":
            raise _bad(
                f"integrations.{i}.type",
                f"integration {integration.type!r} is not available; avatune logs to wandb (offline, into the "
                "job's log_uri)",
            )
        if integration.wandb is None:
            raise _bad(f"integrations.{i}.wandb", "a wandb integration needs its settings (project)")
    return Integrations(report_to=["wandb"])


async def _checked_file(files: FileStore, user_id: str, file_id: str, param: str) -> str:
    """The dataset URI of the user's fine-tuning file `file_id` (404 when there is none)."""
    found = await stored_file(files, user_id, file_id, param)
    if found.purpose != FINE_TUNE:
        raise _bad(param, f"file {file_id} has purpose {found.purpose!r}, not 'fine-tune'", f"invalid_{param}")
    return files.uri(user_id, file_id)


async def create_job(
    user_id: str,
    body: FineTuningJobCreate,
    stores: JobStores,
    intake: JobIntake,
) -> FineTuningJob:
    """Create and queue the training job `body` asks for; its `fine_tuning.job`."""
    settings = intake.settings
    avatar_id = _avatar_of(body)
    base = base_model_of(body.model, settings.openai_model_aliases)
    hyper = _hyperparameters(body)
    integrations = _integrations(body)
    datasets = [DatasetSource(uri=await _checked_file(stores.files, user_id, body.training_file, "training_file"))]
    if body.validation_file is not None:
        uri = await _checked_file(stores.files, user_id, body.validation_file, "validation_file")
        datasets.append(DatasetSource(uri=uri, split="eval"))
    train_body = TrainJobBody(
        base_model=BaseModelSpec(name=base) if base else None,
        datasets=datasets,
        use_flagged_documents=False,
        tuning=_tuning(hyper, body.seed),
        integrations=integrations,
        callbacks=_callbacks(body.metadata),
    )
    entry = FineTuningEntry(
        job_id="pending",
        avatar_id=avatar_id,
        model=body.model,
        training_file=body.training_file,
        validation_file=body.validation_file,
        hyperparameters=hyper,
        suffix=body.suffix,
        seed=body.seed,
        metadata=body.metadata,
        integrations=body.integrations,
        created_at=int(time.time()),
    )

    async def keep_entry(job_id: str) -> Undo:
        etag = await stores.entries.create(user_id, entry.model_copy(update={"job_id": job_id}))
        if etag is None:
            raise RuntimeError(f"fine-tuning entry {job_id} exists")

        async def remove() -> None:
            await stores.entries.delete_created(user_id, job_id, etag)

        return remove

    avatar = AvatarRef(user_id, avatar_id)
    try:
        record = await queue_train_job(avatar, train_body, stores.documents, intake, keep_entry)
    except Problem as problem:
        raise _in_openai_terms(problem) from None
    kept = await stores.entries.get(user_id, record.id)  # an Idempotency-Key replay answers the earlier job
    return job_object(kept or entry.model_copy(update={"job_id": record.id}), record)


def _in_openai_terms(problem: Problem) -> Problem:
    """A train-job problem with its field named as the OpenAI request names it."""
    field = problem.extensions.get("field")
    renamed = {
        "base_model.name": "model",
        "datasets.0.uri": "training_file",
        "datasets.1.uri": "validation_file",
        "callbacks.webhook_url": "metadata.webhook_url",
        "callbacks.signing_secret_ref": "metadata.webhook_signing_secret_ref",
    }
    if isinstance(field, str) and field in renamed:
        problem.extensions["field"] = renamed[field]
    return problem


# -- reading jobs ----------------------------------------------------------------------------


def _no_such_job(job_id: str) -> Problem:
    return Problem(404, f"No such fine-tuning job: {job_id}", field="fine_tuning_job_id")


async def _load(
    entries: FineTuningStore, jobs: JobStore, user_id: str, job_id: str
) -> tuple[FineTuningEntry, JobRecord] | None:
    entry = await entries.get(user_id, job_id)
    if entry is None:
        return None
    record = await jobs.get(AvatarRef(user_id, entry.avatar_id), job_id)
    return (entry, record) if record is not None else None


async def loaded_job(
    entries: FineTuningStore, jobs: JobStore, user_id: str, job_id: str
) -> tuple[FineTuningEntry, JobRecord]:
    """The user's fine-tuning job `job_id`: its entry and record; 404 when there is none."""
    loaded = await _load(entries, jobs, user_id, job_id) if is_valid_id(job_id) else None
    if loaded is None:
        raise _no_such_job(job_id)
    return loaded


async def get_job(entries: FineTuningStore, jobs: JobStore, user_id: str, job_id: str) -> FineTuningJob:
    return job_object(*await loaded_job(entries, jobs, user_id, job_id))


async def list_jobs(
    entries: FineTuningStore,
    jobs: JobStore,
    user_id: str,
    *,
    after: str | None,
    limit: int,
    metadata: dict[str, str],
) -> CursorPage[FineTuningJob]:
    """The user's fine-tuning jobs, newest first, after the job id `after`, whose metadata has
    every `metadata` pair. Only the page's entries and records are read."""
    ids = await entries.job_ids(user_id)
    if after is not None:
        ids = [i for i in ids if i < after]

    async def shown(job_id: str) -> FineTuningJob | None:
        loaded = await _load(entries, jobs, user_id, job_id)
        if loaded is None or any((loaded[0].metadata or {}).get(k) != v for k, v in metadata.items()):
            return None
        return job_object(*loaded)

    found, more = await fill_page(ids, limit, shown)
    return CursorPage[FineTuningJob](data=found, has_more=more)


async def cancel_job(
    entries: FineTuningStore, jobs: JobStore, queue: TrainQueue, settings: Settings, user_id: str, job_id: str
) -> FineTuningJob:
    """Cancel as `{base}/training-jobs/{id}/cancel` does: a queued job at once, a running one at
    the trainer's next step; 409 once it has ended."""
    entry, _ = await loaded_job(entries, jobs, user_id, job_id)
    record = await job_service.cancel_job(AvatarRef(user_id, entry.avatar_id), jobs, queue, settings, job_id)
    return job_object(entry, record)


Item = TypeVar("Item", FineTuningJobEvent, FineTuningJobCheckpoint)


def _page(items: list[Item], after: str | None, key: Callable[[str], int | None], limit: int) -> CursorPage[Item]:
    """A page of a job's derived list (newest first, ordered by the key of each id), from past
    the id `after` (400 for an id that is not one of this list's)."""
    if after is not None:
        bound = key(after)
        if bound is None:
            raise _bad("after", f"{after!r} is not an id of this list")
        items = [item for item in items if (key(item.id) or 0) < bound]
    return CursorPage[Item](data=items[:limit], has_more=len(items) > limit)


async def list_events(
    entries: FineTuningStore, jobs: JobStore, user_id: str, job_id: str, *, after: str | None, limit: int
) -> CursorPage[FineTuningJobEvent]:
    entry, record = await loaded_job(entries, jobs, user_id, job_id)
    return _page(job_events(entry, record), after, lambda i: event_key(job_id, i), limit)


def _checkpoint_step(job_id: str, identifier: str) -> int | None:
    head, _, step = identifier.rpartition("-")
    return int(step) if head == f"ftckpt-{job_id}" and step.isdigit() else None


async def list_checkpoints(
    entries: FineTuningStore, jobs: JobStore, user_id: str, job_id: str, *, after: str | None, limit: int
) -> CursorPage[FineTuningJobCheckpoint]:
    entry, record = await loaded_job(entries, jobs, user_id, job_id)
    return _page(job_checkpoints(entry, record), after, lambda i: _checkpoint_step(job_id, i), limit)
