"""The `train` job kind: train an avatar's adapter (or a whole model) on its documents.

prepare (trainer.jobs.training_setup: config, base, warm start, documents, checkpoint, dataset)
-> the method's recipe trains: LoRA/QLoRA (`lora`), full fine-tuning (`full`),
   data-parallel LoRA (`data_parallel`), or, for `objective` dpo/kto, preference training on
   top of the current adapter (`preference`); the integrations' logs are uploaded either way
-> stopped early (cancel, SIGTERM, lost lease, duration limit): hand the reason back
-> the metrics: the run's, the data's, the setup's
-> the recipe publishes (a new adapter version, or a whole model under full/)
-> artifacts.output_uri: a copy of what was published -> Succeeded
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from contracts.jobs import JobProgress
from contracts.keys import adapter_version_prefix, full_model_version_prefix
from contracts.metrics import TrainingMetrics
from trainer.integrations import upload_logs
from trainer.jobs.data_parallel import DataParallelRecipe
from trainer.jobs.full import FullRecipe
from trainer.jobs.lora import LoraRecipe
from trainer.jobs.preference import PreferenceRecipe
from trainer.jobs.training_setup import TrainingSetup, prepare_training
from trainer.outputs import copy_prefix
from trainer.runtime.context import JobContext, JobResult, Stopped, Succeeded
from trainer.training import TrainOutcome


class TrainingRecipe(Protocol):
    """How one training method trains and publishes (a LoRA adapter, a whole model, ...)."""

    def train(self, ctx: JobContext, setup: TrainingSetup) -> TrainOutcome: ...

    def base_model_reused(self, ctx: JobContext, setup: TrainingSetup) -> bool: ...

    def publish(
        self, ctx: JobContext, setup: TrainingSetup, output_dir: Path, metrics: TrainingMetrics
    ) -> tuple[int, TrainingMetrics]: ...


def recipe_for(setup: TrainingSetup) -> TrainingRecipe:
    if setup.objective != "sft":
        return PreferenceRecipe()
    if setup.processes > 1:
        return DataParallelRecipe()
    if setup.cfg.method == "full":
        return FullRecipe()
    return LoraRecipe()


class TrainWork:
    """The recipe of `train` jobs (see the module docstring)."""

    def __call__(self, ctx: JobContext) -> JobResult:
        setup = prepare_training(ctx)
        recipe = recipe_for(setup)
        try:
            outcome = recipe.train(ctx, setup)
        finally:
            if setup.report_to:  # the logs of a stopped or failed run are worth having too
                upload_logs(ctx.stores.s3, ctx.scratch / "logs", setup.log_dest)
        if not outcome.completed:
            return Stopped(outcome.stop_reason or "stopped")
        assert outcome.adapter_dir is not None
        metrics = outcome.metrics.with_values(
            **setup.data_metrics().as_dict(), base_model_reused=recipe.base_model_reused(ctx, setup)
        )
        ctx.confirm_lease()  # nothing is published for a job that is no longer ours (or was deleted)
        version, metrics = recipe.publish(ctx, setup, outcome.adapter_dir, metrics)
        if setup.output is not None:  # artifacts.output_uri: a copy of the published version's files
            metrics = self._copy_output(ctx, setup, version, metrics)
        return Succeeded(metrics=metrics, adapter_version=version, progress=self._final_progress(ctx))

    @staticmethod
    def _copy_output(ctx: JobContext, setup: TrainingSetup, version: int, metrics: TrainingMetrics) -> TrainingMetrics:
        assert setup.output is not None
        prefix = full_model_version_prefix if setup.cfg.method == "full" else adapter_version_prefix
        source = prefix(ctx.user_id, ctx.avatar_id, version)
        files = copy_prefix(ctx.stores.s3, ctx.settings.s3_bucket, source, setup.output)
        return metrics.with_values(output_uri=str(setup.output), output_files=files)

    @staticmethod
    def _final_progress(ctx: JobContext) -> JobProgress | None:
        progress = ctx.control.progress
        if progress is None:
            return None
        return progress.model_copy(update={"step": progress.total_steps or progress.step, "eta_seconds": 0})
