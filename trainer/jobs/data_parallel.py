"""Data-parallel LoRA training (`resources.gpus` > 1): one job on several GPUs of one machine.

`trainer.distributed.run_data_parallel` (torchrun ranks, each loading the base itself;
the worker keeps the message, lease and status, and talks to the ranks through files)
-> `trainer.jobs.lora.publish_adapter`, as a one-process LoRA job publishes
"""

from __future__ import annotations

from pathlib import Path

from contracts.metrics import TrainingMetrics
from trainer.distributed import run_data_parallel
from trainer.jobs.lora import publish_adapter
from trainer.jobs.training_setup import TrainingSetup
from trainer.runtime.context import JobContext
from trainer.training import TrainOutcome


class DataParallelRecipe:
    def train(self, ctx: JobContext, setup: TrainingSetup) -> TrainOutcome:
        base_model = ctx.job.spec.base_model
        return run_data_parallel(
            processes=setup.processes,
            base_model=setup.base.path,
            method=setup.cfg.method or "qlora",
            cfg=setup.cfg,
            train_examples=setup.train_set,
            eval_examples=setup.eval_set,
            work_dir=ctx.scratch / "work",
            control=ctx.control,
            resume_from=setup.resume_from,
            revision=setup.base.revision,
            # The NAME of the variable holding the hub token: ranks read it themselves, the
            # token never goes into a file.
            token_env=base_model.token_env if base_model else None,
            report_to=setup.report_to,
            log_dir=ctx.scratch / "logs",
        )

    def base_model_reused(self, ctx: JobContext, setup: TrainingSetup) -> bool:
        return False  # the ranks load the base themselves

    def publish(
        self, ctx: JobContext, setup: TrainingSetup, adapter_dir: Path, metrics: TrainingMetrics
    ) -> tuple[int, TrainingMetrics]:
        return publish_adapter(ctx, setup, adapter_dir, metrics)
