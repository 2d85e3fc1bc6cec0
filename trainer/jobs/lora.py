"""LoRA and QLoRA training on the worker's cached base (one process).

    the cached base (4-bit for qlora, kept loaded between jobs) -> `trainer.training.train_adapter`
    (LoRA layers injected, trained, saved, removed again) -> `publish_adapter`: evaluation
    (samples.json, loss.png, the `promote: if_better` verdict) and each serving engine's
    verdict on the saved files (`serving`) -> the next adapter version, made current unless the
    evaluation says no or one of the SERVING_TARGETS cannot load it

`publish_adapter` is shared with `trainer.jobs.data_parallel`, whose ranks train the same adapter;
its two halves (`already_published`, `publish_evaluated`) with `trainer.jobs.preference`, which
judges its adapter on held-out feedback instead.
"""

from __future__ import annotations

import logging
from pathlib import Path

from contracts.metrics import TrainingMetrics
from trainer.adapter_files import serving_verdict
from trainer.evaluation import CurrentAdapter, Evaluation, evaluate_version
from trainer.jobs.training_setup import TrainingSetup, cached_base
from trainer.runtime.context import JobContext
from trainer.training import TrainOutcome, train_adapter

log = logging.getLogger("avatune.trainer")


class LoraRecipe:
    def train(self, ctx: JobContext, setup: TrainingSetup) -> TrainOutcome:
        cfg = setup.cfg
        return train_adapter(
            cached_base(ctx, setup.base, cfg),
            cfg,
            setup.train_set,
            setup.eval_set,
            ctx.scratch / "work",
            ctx.control,
            setup.resume_from,
            setup.report_to,
            ctx.scratch / "logs",
            init_adapter_dir=setup.warm.adapter_dir if setup.warm else None,
        )

    def base_model_reused(self, ctx: JobContext, setup: TrainingSetup) -> bool:
        return ctx.stores.models.loads == setup.model_loads_before

    def publish(
        self, ctx: JobContext, setup: TrainingSetup, adapter_dir: Path, metrics: TrainingMetrics
    ) -> tuple[int, TrainingMetrics]:
        return publish_adapter(ctx, setup, adapter_dir, metrics)


def publish_adapter(
    ctx: JobContext, setup: TrainingSetup, adapter_dir: Path, metrics: TrainingMetrics
) -> tuple[int, TrainingMetrics]:
    """Publish a trained adapter as the next version, samples.json and loss.png beside it, and
    make it current unless the job's `promote: if_better` finds it worse than the current
    adapter on this job's held-out split. A retried job's earlier version (and verdict) stands.
    Returns (version, the job's metrics)."""
    job, artifacts, settings = ctx.job, ctx.stores.artifacts, ctx.settings
    if (published := already_published(ctx, metrics)) is not None:
        return published
    current = None
    if job.spec.promote == "if_better":
        manifest = artifacts.download_current(job.user_id, job.avatar_id, ctx.scratch / "current")
        # An adapter of another base is no yardstick: the base's own loss is, then.
        if manifest is not None and manifest.base_model in (None, setup.base.name):
            current = CurrentAdapter(manifest.current_version, ctx.scratch / "current", manifest.metrics)
    evaluation = evaluate_version(
        cached_base(ctx, setup.base, setup.cfg),
        adapter_dir,
        setup.eval_set,
        ctx.scratch / "evaluation",
        job_id=job.id,
        policy=job.spec.promote,
        current=current,
        metrics=metrics.as_dict(),
        sample_prompts=settings.sample_prompts,
        max_new_tokens=settings.sample_max_new_tokens,
    )
    return publish_evaluated(ctx, setup, adapter_dir, metrics, evaluation)


def already_published(ctx: JobContext, metrics: TrainingMetrics) -> tuple[int, TrainingMetrics] | None:
    """The version a retried job published before (finishing its promotion), with the metrics
    stored beside it; None when it published none."""
    job, artifacts = ctx.job, ctx.stores.artifacts
    published = artifacts.version_of_job(job.user_id, job.avatar_id, job.id)
    if published is None:
        return None
    meta = artifacts.finish_promotion(job.user_id, job.avatar_id, published)
    return published, (TrainingMetrics.model_validate(meta.metrics) if meta is not None else metrics)


def publish_evaluated(
    ctx: JobContext, setup: TrainingSetup, adapter_dir: Path, metrics: TrainingMetrics, evaluation: Evaluation
) -> tuple[int, TrainingMetrics]:
    """Publish the adapter as the next version with the evaluation's files and metrics, current
    unless the evaluation's verdict says no."""
    job = ctx.job
    metrics = metrics.with_values(**evaluation.metrics)
    metrics, promote = _serving_check(ctx, setup, adapter_dir, metrics, evaluation.promote)
    if not promote:
        log.info("job %s: %s", job.id, metrics.as_dict().get("promote_reason"))
    version = ctx.stores.artifacts.publish(
        job.user_id,
        job.avatar_id,
        adapter_dir,
        job_id=job.id,
        base_model=setup.base.name,
        metrics=metrics.as_dict(),
        keep_versions=ctx.settings.adapter_keep_versions,
        extra_files=evaluation.files,
        promote=promote,
    )
    return version, metrics


def _serving_check(
    ctx: JobContext, setup: TrainingSetup, adapter_dir: Path, metrics: TrainingMetrics, promote: bool
) -> tuple[TrainingMetrics, bool]:
    """Each engine's verdict on the saved files, in the metrics (`serving`); a version one of
    the SERVING_TARGETS cannot load is kept, never made current (the endpoint keeps the current one)."""
    profile = ctx.settings.serving_profile()
    config = cached_base(ctx, setup.base, setup.cfg).model.config
    verdict = serving_verdict(adapter_dir, getattr(config, "tie_word_embeddings", None), profile.max_lora_rank)
    metrics = metrics.with_values(serving=verdict)
    broken = [verdict[engine] for engine in profile.targets if verdict[engine] != "ok"]
    if promote and broken:
        reason = "not made current: a serving target cannot load it (" + "; ".join(broken) + ")"
        return metrics.with_values(promoted=False, promote_reason=reason), False
    return metrics, promote
