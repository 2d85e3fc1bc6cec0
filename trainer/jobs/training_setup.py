"""The steps every training method shares, before any weight moves:

    resolve the configuration (worker defaults <- the avatar's config.json <- the job's own)
    -> check the spec (method vs 4-bit options, integrations, log_uri, output_uri, and that
       the SERVING_TARGETS can load the adapter these settings give: requests sent straight to
       the queue meet the same rule as the API's 422)
    -> resolve the base model (HF id or s3://, downloaded once per content)
    -> plan the warm start -> fetch the documents and datasets (pinned by ETag)
    -> find the checkpoint to resume from -> pin the documents in the job record
    -> tokenize into examples and split off the held-out set (or tokenize the job's
       `split: eval` datasets as the held-out set)

A preference job (`objective` dpo or kto) reads the avatar's preference documents instead of its
demonstrations, always starts from the current adapter (`preference_start`: the warm start's
adapter; its documents are skipped only with `warm_start: true`) and splits judgements rather
than tokenized examples (`TrainingSetup.preferences`).

`prepare_training` returns a `TrainingSetup`; the method's recipe (`trainer.jobs.lora`, `.full`,
`.data_parallel`, `.preference`) takes it from there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts.adapter import AdapterSettings
from contracts.jobs import JobRecord
from contracts.keys import adapter_config_key, training_logs_prefix
from contracts.metrics import TrainingMetrics
from contracts.s3uri import InvalidS3Uri, S3Uri, parse_s3_uri, within_user_prefix
from contracts.serving import ServingProfile, settings_violations
from contracts.spec import Objective
from contracts.training_documents import DocumentKind
from trainer.base_model import BaseRef, LoadedBase, QuantOptions, resolve_base
from trainer.dataset import (
    EVAL_DATASET_RULE,
    DatasetStats,
    HeldOutSplit,
    TokenizedExample,
    build_examples,
    split_held_out,
)
from trainer.distributed import available_devices
from trainer.documents import TrainingData
from trainer.errors import JobFailure
from trainer.integrations import check_available as check_integrations
from trainer.outputs import output_target
from trainer.preference_data import PreferenceSet, preference_set
from trainer.runtime.context import JobContext
from trainer.warm_start import WarmStart, plan_warm_start

log = logging.getLogger("avatune.trainer")


@dataclass
class TrainingSetup:
    """A training job, resolved and with its data ready."""

    cfg: AdapterSettings
    base: BaseRef
    report_to: list[str]
    log_dest: S3Uri
    output: S3Uri | None
    warm: WarmStart | None
    data: TrainingData
    resume_from: Path | None
    train_set: list[TokenizedExample]
    eval_set: list[TokenizedExample]
    held_out: HeldOutSplit
    stats: DatasetStats
    model_loads_before: int  # the worker's base-model loads before this job (was a base reused?)
    objective: Objective = "sft"
    preferences: PreferenceSet | None = None  # dpo/kto: the judgements (train_set/eval_set stay empty)

    @property
    def processes(self) -> int:
        return self.cfg.gpus or 1

    def data_metrics(self) -> TrainingMetrics:
        """What the metrics say about the data and the setup, whatever the method."""
        if self.preferences is None:
            metrics = TrainingMetrics(
                assistant_tokens=self.stats.assistant_tokens,
                trainable_tokens=self.stats.trainable_tokens,
                dropped_examples=self.stats.dropped,
                split_conversations=self.stats.split,
                truncated_examples=self.stats.truncated,
                held_out_rule=self.held_out.rule,
                held_out_cutoff=round(self.held_out.cutoff, 12),
            )
        else:
            metrics = TrainingMetrics(**self.preferences.metrics())
        metrics = metrics.with_values(
            documents=len(self.data.documents), resumed_from_step=_checkpoint_step(self.resume_from)
        )
        if self.data.other_kind:
            metrics = metrics.with_values(documents_of_other_objective=self.data.other_kind)
        if self.warm is not None:
            metrics = metrics.with_values(**self.warm.metrics, documents_skipped=self.data.skipped)
        metrics = metrics.with_values(base_model=self.base.name, base_model_revision=self.base.revision)
        if self.report_to:
            metrics = metrics.with_values(log_uri=str(self.log_dest))
        return metrics


def prepare_training(ctx: JobContext) -> TrainingSetup:
    """The shared steps of the module docstring, in order."""
    job, stores = ctx.job, ctx.stores
    cfg = resolved_config(ctx)
    report_to = check_spec(job, cfg)
    check_servable(cfg, ctx.settings.serving_profile())
    log_dest = log_destination(job, ctx.settings.s3_bucket)
    output = output_target(job, ctx.settings.s3_bucket)
    base = resolve_job_base(ctx)
    objective = job.spec.objective
    warm = warm_start(ctx, cfg, base.name) if objective == "sft" else preference_start(ctx, base.name)
    data = stores.documents.fetch(
        job.user_id,
        job.avatar_id,
        ctx.scratch / "data",
        job.spec.datasets,
        skip=warm.skip if warm else None,
        flagged=job.spec.use_flagged_documents,
        kind=documents_of(objective),
    )
    resume_from = checkpoint_to_resume(ctx, data)
    if not resume_from:
        documents = data.documents
        ctx.update(lambda record: _with_data(record, documents))
    if cfg.gpus and cfg.gpus > 1 and cfg.gpus > available_devices():
        raise JobFailure(f"the job asks for {cfg.gpus} GPUs but this worker has {available_devices()}")
    if cfg.gpus and cfg.gpus > 1 and cfg.method == "full":
        raise JobFailure("method full runs on one GPU: leave resources.gpus at 1")
    loads_before = stores.models.loads
    preferences = None
    split = HeldOutSplit([], [])
    stats = DatasetStats()
    if objective == "sft":
        tokenizer = stores.models.tokenizer(base.path, revision=base.revision, token=base.token)
        examples, stats = build_examples(tokenizer, data.conversations, cfg.max_seq_length or 1024)
        if not examples or stats.trainable_tokens == 0:
            raise JobFailure("the documents hold no assistant tokens to train on (after truncation to max_seq_length)")
        split = held_out(ctx, cfg, tokenizer, examples, data)
    else:
        eval_fraction = cfg.eval_fraction if cfg.eval_fraction is not None else ctx.settings.eval_fraction
        preferences = preference_set(data.judgements, objective, eval_fraction, cfg.seed or 0)
    return TrainingSetup(
        cfg=cfg,
        base=base,
        report_to=report_to,
        log_dest=log_dest,
        output=output,
        warm=warm,
        data=data,
        resume_from=resume_from,
        train_set=split.train,
        eval_set=split.eval,
        held_out=split,
        stats=stats,
        model_loads_before=loads_before,
        objective=objective,
        preferences=preferences,
    )


def held_out(
    ctx: JobContext, cfg: AdapterSettings, tokenizer: Any, examples: list[TokenizedExample], data: TrainingData
) -> HeldOutSplit:
    """The training and held-out examples: the `split: eval` datasets' when the job names any
    (all of `examples` then train), else `eval_fraction` of `examples` (`split_held_out`)."""
    if data.eval_conversations:
        evaluation, _ = build_examples(tokenizer, data.eval_conversations, cfg.max_seq_length or 1024)
        if evaluation:
            return HeldOutSplit(list(examples), evaluation, rule=EVAL_DATASET_RULE)
    eval_fraction = cfg.eval_fraction if cfg.eval_fraction is not None else ctx.settings.eval_fraction
    return split_held_out(examples, eval_fraction)


def resolved_config(ctx: JobContext) -> AdapterSettings:
    """Worker defaults <- the avatar's stored config <- the job's overrides, resolved once, at
    the first attempt, and pinned in the record: a `PUT {base}/adapter` while the job runs must
    not change the rank, sequence length or batch size its retry (and its checkpoint) trains with."""
    job = ctx.job
    if job.resolved_config is not None:
        return job.resolved_config
    stored = ctx.stores.objects.read_model(adapter_config_key(job.user_id, job.avatar_id), AdapterSettings)
    defaults = ctx.settings.default_adapter_settings()
    resolved = job.config.merged_over((stored or AdapterSettings()).merged_over(defaults))
    pinned = ctx.update(lambda record: _with_resolved(record, resolved)).resolved_config
    return pinned or resolved


def check_spec(job: JobRecord, cfg: AdapterSettings) -> list[str]:
    """Refuse what the spec cannot mean before any work; the integrations to report to."""
    if cfg.method == "full":
        asked = [
            name for name in ("quant_type", "double_quant", "compute_dtype") if getattr(job.config, name) is not None
        ]
        if asked:
            raise JobFailure(
                f"method full trains unquantised weights: qlora options ({', '.join(asked)}) need method qlora"
            )
        if job.spec.promote == "if_better":
            raise JobFailure(
                "method full publishes a new full/{version}/ model and has no current one to "
                "compare with: promote if_better needs a LoRA method"
            )
    if problem := job.spec.objective_problem():
        raise JobFailure(f"{problem[0]}: {problem[1]}")
    if job.spec.objective != "sft" and (cfg.method == "full" or (cfg.gpus or 1) > 1):
        raise JobFailure(
            f"objective {job.spec.objective} trains a LoRA adapter on one GPU: not with method full or gpus > 1"
        )
    report_to = list(job.spec.integrations.report_to) if job.spec.integrations else []
    check_integrations(report_to)
    return report_to


def check_servable(cfg: AdapterSettings, profile: ServingProfile) -> None:
    """Fail the job, naming the field and the engine's rule, when the resolved settings would give
    an adapter one of the serving targets cannot load (the API's 422 for what it can see)."""
    broken = settings_violations(cfg, profile)
    if broken:
        raise JobFailure(
            "the serving targets could not load this adapter: "
            + "; ".join(map(str, broken))
            + f" (SERVING_TARGETS={','.join(profile.targets)})"
        )


def log_destination(job: JobRecord, bucket: str) -> S3Uri:
    """Where the integrations' logs go: `artifacts.log_uri`, inside the caller's prefix."""
    uri = job.spec.artifacts.log_uri if job.spec.artifacts else None
    if not uri:
        return S3Uri(bucket, training_logs_prefix(job.user_id, job.avatar_id, job.id))
    try:
        dest = parse_s3_uri(uri, prefix=True)
    except InvalidS3Uri as exc:
        raise JobFailure(f"artifacts.log_uri: {exc}") from None
    if not within_user_prefix(dest, bucket, job.user_id):
        raise JobFailure(f"artifacts.log_uri must lie inside s3://{bucket}/users/{job.user_id}/")
    return dest


def resolve_job_base(ctx: JobContext) -> BaseRef:
    """The job's base model (the spec's, else BASE_MODEL); an s3:// base is downloaded here,
    once per content."""
    settings = ctx.settings
    return resolve_base(
        ctx.job.spec.base_model,
        default=settings.base_model,
        user_id=ctx.job.user_id,
        bucket=settings.s3_bucket,
        allowed_prefixes=settings.allowed_base_prefixes(),
        s3=ctx.stores.s3,
        cache_dir=settings.model_cache_dir,
    )


def cached_base(ctx: JobContext, base: BaseRef, cfg: AdapterSettings) -> LoadedBase:
    """The worker's cached base for this job (its base model, revision, method, 4-bit config)."""
    quant = QuantOptions(
        cfg.quant_type or "nf4", True if cfg.double_quant is None else cfg.double_quant, cfg.compute_dtype
    )
    return ctx.stores.models.get(base.path, cfg.method or "qlora", quant, revision=base.revision, token=base.token)


def warm_start(ctx: JobContext, cfg: AdapterSettings, base_model: str) -> WarmStart | None:
    """For `warm_start: true`: the adapter to continue from and the documents to skip."""
    job = ctx.job
    if not job.spec.warm_start:
        return None
    if (cfg.gpus or 1) > 1 or cfg.method == "full":
        raise JobFailure(
            "warm_start continues a LoRA adapter on one GPU: it cannot be combined with method 'full' or gpus > 1"
        )
    return plan_warm_start(ctx.stores.artifacts, ctx.stores.jobs, job, base_model, ctx.scratch / "warm-start")


def documents_of(objective: Objective) -> DocumentKind:
    """The kind of document a job of `objective` trains on."""
    return "demonstrations" if objective == "sft" else "preferences"


def preference_start(ctx: JobContext, base_model: str) -> WarmStart:
    """Where a preference job starts: the avatar's current adapter (unless this job produced it,
    as a warm start decides), which is also its reference; the base when there is none (or it
    belongs to another base), and the metrics say so. The documents that adapter has seen are
    left out only with `warm_start: true`."""
    job = ctx.job
    start = plan_warm_start(ctx.stores.artifacts, ctx.stores.jobs, job, base_model, ctx.scratch / "start-adapter")
    reference = {"reference_policy": "base model"}
    if start.adapter_dir is not None:
        reference = {"reference_policy": f"adapter version {start.metrics['warm_start_from_version']}"}
    else:
        why = str(start.metrics.get("warm_start_reason", "no current adapter")).split(": ", 1)[0]
        reference["reference_reason"] = f"{why}: started from the base model, which is the reference"
    skip = start.skip if job.spec.warm_start else set()
    return WarmStart(start.adapter_dir, skip, {**start.metrics, **reference})


def checkpoint_to_resume(ctx: JobContext, data: TrainingData) -> Path | None:
    """The job's last complete checkpoint, downloaded, when its documents are still the ones
    pinned in the record; otherwise the checkpoints are dropped and training starts over."""
    job, artifacts = ctx.job, ctx.stores.artifacts
    step = artifacts.latest_checkpoint(job.user_id, job.avatar_id, job.id)
    if step is None:
        return None
    pinned = {(d.name, d.etag) for d in job.data}
    if pinned != {(d.name, d.etag) for d in data.documents}:
        log.warning("job %s: training data changed since the checkpoint; starting over", job.id)
        artifacts.delete_checkpoints(job.user_id, job.avatar_id, job.id)
        return None
    log.info("job %s resumes from its checkpoint at step %d", job.id, step)
    dest = ctx.scratch / "work" / "checkpoints" / f"checkpoint-{step}"
    return artifacts.download_checkpoint(job.user_id, job.avatar_id, job.id, step, dest)


def _with_resolved(record: JobRecord, resolved: AdapterSettings) -> JobRecord:
    record.resolved_config = record.resolved_config or resolved
    return record


def _with_data(record: JobRecord, documents: list) -> JobRecord:
    record.data = documents
    return record


def _checkpoint_step(path: Path | None) -> int | None:
    return int(path.name.rsplit("-", 1)[-1]) if path is not None else None
