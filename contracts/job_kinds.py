"""The job kinds: the one table that the worker, the API and the contracts read.

A job's kind (`JobRecord.type`) says what it does. Each kind has here:

- `request`: its message on the train queue (a `QueueRequest` model in `contracts.messages`);
  the literal of its `schema` field names it on the wire and its JSON Schema file in `schemas/`;
- `work`: `"module:Class"` of its recipe on the trainer (`trainer/jobs/`), imported on first
  use, so a worker that never sees a kind never imports what it needs (LanceDB, peft, ...);
- `record`: the job record a request stands for: the API writes it before queueing, the
  trainer writes it for a request another service sent straight to the queue;
- `links`: the API paths a job view links to (the outputs of a finished job);
- `params`: the request's own fields a record stands for (`request_of` rebuilds the request
  from them: the API queues a job again whose worker vanished).

Adding a kind is an entry here, its request model, and one recipe module:
docs/adding-a-job-kind.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_args

from contracts.api_paths import export_path, version_file_path, whole_model_path
from contracts.jobs import JobRecord, JobType, utcnow
from contracts.keys import LOSS_CURVE_FILE, METRICS_FILE, SAMPLES_FILE
from contracts.messages import (
    ExportRequest,
    FuseRequest,
    GenerateRequest,
    IndexRequest,
    InvalidMessage,
    QueueRequest,
    RetrieveRequest,
    TrainRequest,
    message_payload,
    validated_message,
)
from contracts.sealing import Sealer, SealingUnavailable, job_context, seal_callbacks

log = logging.getLogger("avatune.contracts")

RecordBuilder = Callable[[Any, "Sealer | None"], JobRecord]
LinkBuilder = Callable[[JobRecord], dict[str, str]]
ParamsOf = Callable[[JobRecord], dict[str, Any]]


@dataclass(frozen=True)
class JobKind:
    type: JobType
    request: type[QueueRequest]
    work: str
    record: RecordBuilder
    links: LinkBuilder
    params: ParamsOf

    @property
    def schema(self) -> str:
        """The `schema` a request of this kind carries, e.g. `avatune.train-request/v1`."""
        return self.request.model_fields["schema_"].annotation.__args__[0]  # type: ignore[union-attr]

    @property
    def schema_file(self) -> str:
        """Its JSON Schema's file in `schemas/`: `avatune.train-request/v1` -> `train-request.v1.json`."""
        name, version = self.schema.removeprefix("avatune.").split("/")
        return f"{name}.{version}.json"


# -- the records ---------------------------------------------------------------------------------


def _common(req: QueueRequest) -> dict[str, Any]:
    return dict(
        id=req.job_id,
        user_id=req.user_id,
        avatar_id=req.avatar_id,
        created_at=req.requested_at,
        source="api" if req.origin == "api" else "queue",
    )


def _train_record(req: TrainRequest, sealer: Sealer | None) -> JobRecord:
    """A plaintext callbacks.auth_header is sealed (only `auth_header_sealed` is stored); with
    no sealer the job is refused at once (failed, the header dropped) rather than stored in the
    clear. The API seals before it builds the request, so its records never take that branch."""
    spec = req.job_spec()
    try:
        spec = seal_callbacks(spec, sealer, job_context(req.user_id, req.avatar_id, req.job_id))
    except SealingUnavailable as exc:
        log.error("job %s refused: %s", req.job_id, exc)
        assert spec.callbacks is not None
        spec = spec.model_copy(update={"callbacks": spec.callbacks.model_copy(update={"auth_header": None})})
        return JobRecord(
            type="train",
            config=req.effective_config(),
            spec=spec,
            status="failed",
            error=str(exc),
            finished_at=utcnow(),
            **_common(req),
        )
    return JobRecord(type="train", config=req.effective_config(), spec=spec, **_common(req))


def _fuse_record(req: FuseRequest, sealer: Sealer | None) -> JobRecord:
    return JobRecord(type="fuse", adapter_version=req.adapter_version, **_common(req))


def _params_record(job_type: JobType) -> RecordBuilder:
    """The record of a kind whose request's own fields are the job's parameters (`request`)."""

    def build(req: QueueRequest, sealer: Sealer | None) -> JobRecord:
        params = req.model_dump(mode="json", exclude=set(QueueRequest.model_fields) | {"schema_"})
        return JobRecord(type=job_type, request=params, adapter_version=params.get("adapter_version"), **_common(req))

    return build


# -- the parameters of a record ----------------------------------------------------------------


def _train_params(record: JobRecord) -> dict[str, Any]:
    """A train record's request fields: its spec (the webhook header stays sealed) and config."""
    spec = record.spec.model_dump(mode="json", exclude_none=True)
    return {**spec, "config": record.config.model_dump(mode="json", exclude_none=True)}


def _fuse_params(record: JobRecord) -> dict[str, Any]:
    return {"adapter_version": record.adapter_version}


def _request_params(record: JobRecord) -> dict[str, Any]:
    return dict(record.request)


# -- the links -----------------------------------------------------------------------------------

VERSION_FILE_LINKS = (("metrics", METRICS_FILE), ("samples", SAMPLES_FILE), ("loss_curve", LOSS_CURVE_FILE))


def _train_links(record: JobRecord) -> dict[str, str]:
    """A published adapter version's files; a full fine-tune's whole model once it succeeded
    (its version numbers a model under full/, not an adapter version)."""
    version = record.adapter_version
    if version is None:
        return {}
    if record.config.method != "full":
        return {
            link: version_file_path(record.user_id, record.avatar_id, version, name)
            for link, name in VERSION_FILE_LINKS
        }
    if record.status == "succeeded":
        return {"model": whole_model_path(record.user_id, record.avatar_id, "full", version)}
    return {}


def _fuse_links(record: JobRecord) -> dict[str, str]:
    if record.status != "succeeded" or record.adapter_version is None:
        return {}
    return {"model": whole_model_path(record.user_id, record.avatar_id, "merged", record.adapter_version)}


def _export_links(record: JobRecord) -> dict[str, str]:
    if record.status != "succeeded" or record.adapter_version is None:
        return {}
    return {"export": export_path(record.user_id, record.avatar_id, record.adapter_version, record.request["format"])}


def _no_links(record: JobRecord) -> dict[str, str]:
    return {}


# -- the table -----------------------------------------------------------------------------------

JOB_KINDS: dict[JobType, JobKind] = {
    kind.type: kind
    for kind in (
        JobKind("train", TrainRequest, "trainer.jobs.train:TrainWork", _train_record, _train_links, _train_params),
        JobKind("fuse", FuseRequest, "trainer.jobs.fuse:FuseWork", _fuse_record, _fuse_links, _fuse_params),
        JobKind(
            "generate",
            GenerateRequest,
            "trainer.jobs.generate:GenerateWork",
            _params_record("generate"),
            _no_links,
            _request_params,
        ),
        JobKind(
            "index", IndexRequest, "trainer.jobs.index:IndexWork", _params_record("index"), _no_links, _request_params
        ),
        JobKind(
            "retrieve",
            RetrieveRequest,
            "trainer.jobs.retrieve:RetrieveWork",
            _params_record("retrieve"),
            _no_links,
            _request_params,
        ),
        JobKind(
            "export",
            ExportRequest,
            "trainer.jobs.export:ExportWork",
            _params_record("export"),
            _export_links,
            _request_params,
        ),
    )
}
assert set(JOB_KINDS) == set(get_args(JobType)), "every JobType has its entry in JOB_KINDS"

_BY_SCHEMA: dict[str, JobKind] = {kind.schema: kind for kind in JOB_KINDS.values()}
_BY_REQUEST: dict[type[QueueRequest], JobKind] = {kind.request: kind for kind in JOB_KINDS.values()}


def kind_of(request: QueueRequest) -> JobKind:
    """The kind of job a queue request creates."""
    return _BY_REQUEST[type(request)]


def record_of(request: QueueRequest, sealer: Sealer | None = None) -> JobRecord:
    """The job record `request` stands for (see the module docstring)."""
    return kind_of(request).record(request, sealer)


def request_of(record: JobRecord) -> QueueRequest:
    """The queue request a record stands for, its parameters validated again as the queue
    contract validates them (ValueError when invalid). `origin` says who wrote the record first."""
    kind = JOB_KINDS[record.type]
    identity = {"job_id": record.id, "user_id": record.user_id, "avatar_id": record.avatar_id}
    origin = "api" if record.source == "api" else "external"
    payload = {**kind.params(record), "schema": kind.schema, **identity, "origin": origin}
    return kind.request.model_validate({**payload, "requested_at": record.created_at})


def links_of(record: JobRecord) -> dict[str, str]:
    """The API paths a view of `record` links to."""
    return JOB_KINDS[record.type].links(record)


def parse_train_queue_message(body: object) -> QueueRequest:
    """Parse one train-queue body as the request its `schema` names; raise InvalidMessage saying
    why (an unknown schema included)."""
    payload = message_payload(body)
    schema = payload.get("schema")
    kind = _BY_SCHEMA.get(schema) if isinstance(schema, str) else None
    if kind is None:
        raise InvalidMessage(f"unknown schema {schema!r}; expected one of {', '.join(map(repr, _BY_SCHEMA))}")
    return validated_message(payload, kind.request, schema)
