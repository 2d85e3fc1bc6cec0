"""Preference training (`objective` dpo or kto) of a `train` job: the avatar's feedback on top of
its current adapter.

    the setup (`training_setup`: the preference documents, the start adapter, the held-out
    split) -> `trainer.preference.train_preference` on the worker's cached base (TRL's DPO or
    KTO trainer with PEFT; the start adapter is the reference) -> `publish`: the verdict on
    held-out feedback (`promote: if_better` uses preference accuracy), samples.json with the
    base's, the previous adapter's and the new adapter's answers, loss.png -> the next adapter
    version, current unless the verdict says no (versions, promote and rollback as for any other)
"""

from __future__ import annotations

from pathlib import Path

from contracts.metrics import TrainingMetrics
from contracts.spec import Preference
from trainer.jobs.lora import LoraRecipe, already_published, publish_evaluated
from trainer.jobs.training_setup import TrainingSetup, cached_base
from trainer.preference import train_preference
from trainer.preference_eval import evaluate_preference_version
from trainer.runtime.context import JobContext
from trainer.training import TrainOutcome


def preference_options(ctx: JobContext) -> Preference:
    """The job's `preference` section over the defaults; the job's own learning rate (not the
    avatar's stored one, tuned for supervised training) when the section sets none."""
    return (ctx.job.spec.preference or Preference()).resolved(ctx.job.config.learning_rate)


class PreferenceRecipe(LoraRecipe):
    """A LoRA recipe (the same warm base) that trains and judges on preferences."""

    def train(self, ctx: JobContext, setup: TrainingSetup) -> TrainOutcome:
        assert setup.preferences is not None
        return train_preference(
            cached_base(ctx, setup.base, setup.cfg),
            setup.cfg,
            preference_options(ctx),
            setup.preferences,
            ctx.scratch / "work",
            ctx.control,
            setup.resume_from,
            setup.report_to,
            ctx.scratch / "logs",
            init_adapter_dir=setup.warm.adapter_dir if setup.warm else None,
        )

    def publish(
        self, ctx: JobContext, setup: TrainingSetup, adapter_dir: Path, metrics: TrainingMetrics
    ) -> tuple[int, TrainingMetrics]:
        if (published := already_published(ctx, metrics)) is not None:
            return published
        assert setup.preferences is not None
        previous = setup.warm.adapter_dir if setup.warm else None
        reference = setup.warm.metrics.get("reference_policy") if setup.warm else None
        evaluation = evaluate_preference_version(
            cached_base(ctx, setup.base, setup.cfg),
            previous,
            adapter_dir,
            setup.preferences.eval,
            ctx.scratch / "evaluation",
            job_id=ctx.job.id,
            policy=ctx.job.spec.promote,
            metrics=metrics.as_dict(),
            against=f"the reference ({reference or 'base model'})",
            sample_prompts=ctx.settings.sample_prompts,
            max_new_tokens=ctx.settings.sample_max_new_tokens,
        )
        return publish_evaluated(ctx, setup, adapter_dir, metrics, evaluation)
