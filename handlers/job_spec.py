"""The body of `POST {base}/training-jobs` and the checks that refuse an impossible job before
anything is stored or queued.

The body is the flat `AdapterSettings` form (what the API always took, still accepted), every
`JobSpec` field at the top level (the same shape as the SQS `TrainRequest`'s spec fields) and
optional inline `training_data`. `TrainJobBody.flat()` and `.spec()` split it back into the
job's `config` (the spec's hyper-parameter sections laid over the flat fields) and `spec`.

`check_job_body` raises a 422 `Problem` whose `field` names the offending field (dotted path,
as in pydantic's own 422s) for what pydantic alone cannot judge: module names the base does
not have, `full` with 4-bit options, layers beyond the base's depth, a preference `objective`
with `full`, several GPUs, inline data or the other objective's options, more GPUs than
MAX_GPUS_PER_JOB, S3 URIs outside `s3://{S3_BUCKET}/users/{user_id}/`, webhook settings, a job
left with nothing to train on, settings that would give an adapter the SERVING_TARGETS cannot
load (`check_servable`, also used by `PUT {base}/adapter`), and inline data that is empty,
invalid or too big.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from contracts.adapter import AdapterSettings
from contracts.documents import DocumentError, Role, parse_document
from contracts.model_modules import known_layer_count, unknown_modules
from contracts.s3uri import InvalidS3Uri, parse_s3_uri, within_prefixes, within_user_prefix
from contracts.serving import ServingProfile, settings_violations
from contracts.spec import JobSpec
from contracts.webhooks import InvalidWebhookUrl, check_auth_header, check_signing_secret_ref, check_webhook_url
from handlers.problems import Problem

# Inline records per request; their JSONL must also fit MAX_UPLOAD_BYTES (a document's cap).
MAX_INLINE_RECORDS = 10_000
# Extensions `format: auto` can parse (contracts.documents.parse_document decides by name).
AUTO_DATASET_EXTENSIONS = (".jsonl", ".json", ".txt")


class InlineMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role
    content: str
    weight: Literal[0, 1] | None = Field(default=None, description="0 on an assistant turn: shown, not trained on")


class InlineChat(BaseModel):
    """A chat record of `training_data` (checked like a `.jsonl` document's line)."""

    model_config = ConfigDict(extra="forbid")

    messages: list[InlineMessage] = Field(min_length=1, max_length=1000)


InlineRecord = str | InlineChat


class TrainJobBody(JobSpec, AdapterSettings):
    """`POST {base}/training-jobs`: flat hyper-parameters (`r`, `learning_rate`, ...), the full
    job spec's fields (`base_model`, `tuning`, `datasets`, `artifacts`, `warm_start`, ...) and
    optional inline `training_data`. A field set in both forms (e.g. `learning_rate` and
    `tuning.learning_rate`) takes the spec section's value."""

    model_config = ConfigDict(extra="forbid")

    training_data: list[InlineRecord] | None = Field(
        default=None,
        max_length=MAX_INLINE_RECORDS,
        description='inline records (a string is a text record; or a chat record {"messages": [...]}), '
        "stored as the flagged document inline-{job_id}.jsonl before the job is queued",
    )

    def flat(self) -> AdapterSettings:
        """The flat hyper-parameters as sent."""
        return AdapterSettings.model_validate(
            {name: getattr(self, name) for name in AdapterSettings.model_fields if getattr(self, name) is not None}
        )

    def spec(self) -> JobSpec:
        """The job spec part."""
        return JobSpec.model_validate({name: getattr(self, name) for name in JobSpec.model_fields})

    def config(self) -> AdapterSettings:
        """The job's `config`: the spec's sections laid over the flat fields."""
        return self.spec().settings_overrides().merged_over(self.flat())


def _refuse(field: str, detail: str) -> Problem:
    return Problem(422, f"{field}: {detail}", field=field)


def check_servable(config: AdapterSettings, profile: ServingProfile) -> None:
    """422 when `config` would give an adapter one of the serving targets cannot load: `field`
    names the first offending field, `detail` every broken rule, `violations` each with its engine."""
    broken = settings_violations(config, profile)
    if broken:
        raise Problem(
            422,
            "; ".join(map(str, broken)) + f" (SERVING_TARGETS={','.join(profile.targets)})",
            field=broken[0].field,
            violations=[{"engine": v.engine, "field": v.field, "rule": v.rule} for v in broken],
        )


def _check_uri(field: str, uri: str, bucket: str, user_id: str, *, prefix: bool, also: tuple[str, ...] = ()) -> None:
    """`uri` must parse and lie in the caller's prefix (or under one of the `also` prefixes)."""
    try:
        parsed = parse_s3_uri(uri, prefix=prefix)
    except InvalidS3Uri as exc:
        raise _refuse(field, str(exc)) from None
    if not within_user_prefix(parsed, bucket, user_id) and not within_prefixes(parsed, also):
        raise _refuse(field, f"must lie inside the caller's prefix s3://{bucket}/users/{user_id}/")


def inline_document(records: list[InlineRecord]) -> bytes:
    """`training_data` as the JSONL of a training document (strings become text records)."""
    lines = [
        json.dumps({"text": r} if isinstance(r, str) else r.model_dump(exclude_none=True), ensure_ascii=False)
        for r in records
    ]
    return ("\n".join(lines) + "\n").encode()


def _check_inline(records: list[InlineRecord] | None, max_bytes: int) -> bytes | None:
    if records is None:
        return None
    if not records:
        raise _refuse("training_data", "must hold at least one record")
    data = inline_document(records)
    if len(data) > max_bytes:
        raise _refuse(
            "training_data",
            f"is {len(data)} bytes as JSONL, more than MAX_UPLOAD_BYTES ({max_bytes}); "
            "upload it as a document (POST .../training-data/uploads) instead",
        )
    try:
        parse_document("inline.jsonl", data)  # the trainer's own parser: what passes here trains there
    except DocumentError as exc:
        line = f".{exc.line - 1}" if exc.line is not None else ""
        raise _refuse(f"training_data{line}", exc.message) from None
    return data


def _check_model(body: TrainJobBody, config: AdapterSettings) -> None:
    base = body.base_model.name if body.base_model else None
    if config.target_modules:
        unknown = unknown_modules(config.target_modules, base)
        if unknown:
            raise _refuse(
                "target_modules",
                f"{', '.join(map(repr, unknown))} is not a module of "
                f"{base or 'the default base model'} (Llama family: q_proj, k_proj, v_proj, o_proj, "
                "gate_proj, up_proj, down_proj, lm_head)",
            )
    if config.method == "full":
        four_bit = [n for n in ("quant_type", "double_quant", "compute_dtype") if getattr(body, n) is not None]
        if body.qlora is not None or four_bit:
            raise _refuse(
                "qlora" if body.qlora is not None else four_bit[0],
                "method 'full' trains 16/32-bit weights; 4-bit (qlora) options do not apply",
            )
    if body.warm_start and (config.method == "full" or (config.gpus or 1) > 1):
        raise _refuse("warm_start", "continues the current LoRA adapter on one GPU: not with method 'full' or gpus > 1")
    if body.promote == "if_better" and config.method == "full":
        raise _refuse(
            "promote",
            "method 'full' publishes a new full/{version}/ model and has no current one to "
            "compare with: leave promote at 'always'",
        )
    layers = known_layer_count(base)
    if config.trainable_layers and layers is not None and max(config.trainable_layers) >= layers:
        raise _refuse(
            "trainable_layers",
            f"layer {max(config.trainable_layers)} does not exist: "
            f"{base} has {layers} decoder layers (0 to {layers - 1})",
        )


def check_job_body(
    body: TrainJobBody,
    *,
    user_id: str,
    bucket: str,
    max_gpus: int,
    max_inline_bytes: int,
    base_model_prefixes: list[str] | None = None,
    serving: ServingProfile | None = None,
) -> bytes | None:
    """Refuse an impossible job with a 422 naming the field; returns the inline document's
    bytes (None without `training_data`). An `s3://` base model may also lie under one of
    `base_model_prefixes` (BASE_MODEL_S3_ALLOWED_PREFIXES); the job's own settings must give an
    adapter the `serving` targets can load."""
    config = body.config()
    if serving is not None:
        check_servable(config, serving)
    if body.base_model and body.base_model.name and body.base_model.name.startswith("s3://"):
        _check_uri(
            "base_model.name", body.base_model.name, bucket, user_id, prefix=True, also=tuple(base_model_prefixes or ())
        )
    _check_model(body, config)
    _check_objective(body, config)
    if config.gpus is not None and config.gpus > max_gpus:
        field = "resources.gpus" if body.resources and body.resources.gpus is not None else "gpus"
        raise _refuse(field, f"{config.gpus} GPUs asked for; a job may use at most {max_gpus} (MAX_GPUS_PER_JOB)")
    for i, source in enumerate(body.datasets):
        _check_uri(f"datasets.{i}.uri", source.uri, bucket, user_id, prefix=False)
        if source.format == "auto" and not source.uri.lower().endswith(AUTO_DATASET_EXTENSIONS):
            raise _refuse(
                f"datasets.{i}.format",
                "format 'auto' reads .jsonl, .json or .txt files; "
                "name the format (chat, prompt_completion, text) of a JSONL file with another name",
            )
    if body.artifacts:
        for name in ("output_uri", "log_uri"):
            uri = getattr(body.artifacts, name)
            if uri is not None:
                _check_uri(f"artifacts.{name}", uri, bucket, user_id, prefix=True)
    _check_callbacks(body)
    _check_sources(body)
    return _check_inline(body.training_data, max_inline_bytes)


def _check_sources(body: TrainJobBody) -> None:
    """Without the avatar's flagged documents (`use_flagged_documents: false`) the job trains on
    its `split: train` datasets alone, so it needs one; inline data is a flagged document."""
    if body.use_flagged_documents:
        return
    if body.training_data is not None:
        raise _refuse(
            "use_flagged_documents",
            "training_data is stored as a flagged document: send it with use_flagged_documents true",
        )
    if not any(source.split == "train" for source in body.datasets):
        raise _refuse(
            "use_flagged_documents", "false leaves nothing to train on: name a datasets entry with split train"
        )


def _check_objective(body: TrainJobBody, config: AdapterSettings) -> None:
    """A preference job (dpo, kto) trains a LoRA adapter on one GPU, on preference documents."""
    if problem := body.objective_problem():
        raise _refuse(*problem)
    if body.objective == "sft":
        return
    if config.method == "full" or (config.gpus or 1) > 1:
        raise _refuse(
            "objective",
            f"{body.objective} continues the avatar's LoRA adapter on one GPU: not with method 'full' or gpus > 1",
        )
    if body.training_data is not None:
        raise _refuse(
            "training_data",
            f"inline records are demonstrations; objective {body.objective} trains on preference documents "
            "(POST .../feedback, or upload a preference .jsonl)",
        )


def _check_callbacks(body: TrainJobBody) -> None:
    callbacks = body.callbacks
    if callbacks is None:
        return
    if callbacks.auth_header_sealed is not None:
        raise _refuse("callbacks.auth_header_sealed", "is set by the API; send callbacks.auth_header")
    if (callbacks.auth_header or callbacks.signing_secret_ref) and callbacks.webhook_url is None:
        raise _refuse("callbacks.webhook_url", "is required with auth_header or signing_secret_ref")
    checks: list[tuple[str, Any, Any]] = [
        ("webhook_url", callbacks.webhook_url, lambda v: check_webhook_url(v, callbacks.allow_private)),
        ("auth_header", callbacks.auth_header, lambda v: check_auth_header(v.get_secret_value())),
        ("signing_secret_ref", callbacks.signing_secret_ref, check_signing_secret_ref),
    ]
    for name, value, check in checks:
        if value is None:
            continue
        try:
            check(value)
        except (InvalidWebhookUrl, ValueError) as exc:
            raise _refuse(f"callbacks.{name}", str(exc)) from None
