"""Full fine-tuning (`method: full`): a private copy of the base trained whole (or the chosen
layers and modules), published as a whole model under `full/{version}/`.

    `trainer.full_finetune.train_full` (private fp32 copy, samples before and after, loss.png)
    -> `publish`: the next `full/{version}/` (claimed like adapter versions), manifest last

A full fine-tune never reuses the worker's cached base and has no "current" model to compare
with, so `promote: if_better` is refused before it starts (`training_setup.check_spec`).
"""

from __future__ import annotations

from pathlib import Path

from contracts.adapters import FullModelManifest
from contracts.keys import full_model_version_prefix
from contracts.metrics import TrainingMetrics
from trainer.full_finetune import SampleOptions, train_full
from trainer.jobs.training_setup import TrainingSetup
from trainer.runtime.context import JobContext
from trainer.training import TrainOutcome


class FullRecipe:
    def train(self, ctx: JobContext, setup: TrainingSetup) -> TrainOutcome:
        settings = ctx.settings
        return train_full(
            ctx.stores.models,
            setup.base,
            setup.cfg,
            setup.train_set,
            setup.eval_set,
            ctx.scratch / "work",
            ctx.control,
            setup.resume_from,
            setup.report_to,
            ctx.scratch / "logs",
            SampleOptions(ctx.job.id, settings.sample_prompts, settings.sample_max_new_tokens),
        )

    def base_model_reused(self, ctx: JobContext, setup: TrainingSetup) -> bool:
        return False  # it always loads a private copy

    def publish(
        self, ctx: JobContext, setup: TrainingSetup, model_dir: Path, metrics: TrainingMetrics
    ) -> tuple[int, TrainingMetrics]:
        """The whole model to `full/{version}/` (a retried job's upload stands)."""
        job, artifacts = ctx.job, ctx.stores.artifacts
        user_id, avatar_id = job.user_id, job.avatar_id
        version = artifacts.full_version_of_job(user_id, avatar_id, job.id)
        if version is None:
            values = metrics.as_dict()
            manifest = artifacts.publish_full(
                user_id,
                avatar_id,
                model_dir,
                FullModelManifest(
                    version=1,
                    job_id=job.id,
                    base_model=setup.base.name,
                    precision=values["precision"],
                    dtype=values["dtype"],
                    trainable_layers=setup.cfg.trainable_layers,
                    metrics=values,
                ),
            )
            version = manifest.version
        return version, metrics.with_values(full_model_prefix=full_model_version_prefix(user_id, avatar_id, version))
