"""Training a preference adapter: TRL's DPO or KTO trainer with PEFT, on the worker's cached base.

    base (kept loaded) -> the avatar's current adapter loaded trainable (or a fresh LoRA when
    there is none) -> the held-out feedback scored by it: the reference
    -> TRL's DPOTrainer / KTOTrainer. The reference policy is the starting adapter: TRL keeps a
       frozen copy of it beside the trained one (adapter "ref"; for a fresh LoRA, whose B is 0,
       that is the base itself); its log-probabilities are computed once per job
       (`precompute_ref_log_probs`, the default) or on every step
    -> the held-out feedback scored again by the trained adapter -> the trained adapter saved
       (only it, not the reference copy) -> every LoRA layer removed, and what TRL changed on
       the shared base put back (its forward, pad ids, dropout, input-grad hook)

The job's control is a TrainerCallback as in supervised training (`trainer.training.JobCallback`):
progress after every step, stop on cancel or SIGTERM, checkpoints when it asks; a resumed job
continues from its checkpoint with the same reference.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from transformers import PrinterCallback, TrainerCallback

from contracts.adapter import AdapterSettings
from contracts.metrics import TrainingMetrics
from contracts.spec import Preference
from trainer import integrations
from trainer.base_model import LoadedBase
from trainer.control import TrainingControl
from trainer.evaluation import loss_curve
from trainer.preference_data import PreferenceSet, dpo_rows, kto_rows, kto_weights
from trainer.preference_eval import preference_metrics, score_judgements
from trainer.training import (
    JobCallback,
    TrainOutcome,
    check_modules,
    lora_config,
    release_base,
    resolve_precision,
    spec_metrics,
    trainable_base,
    training_argument_values,
)

log = logging.getLogger("avatune.trainer")

KTO_MIN_BATCH = 2  # KTO estimates its KL term from the other replies of a batch


def train_preference(
    base: LoadedBase,
    cfg: AdapterSettings,
    options: Preference,
    data: PreferenceSet,
    work_dir: Path,
    control: TrainingControl,
    resume_from: Path | None = None,
    report_to: list[str] | None = None,
    log_dir: Path | None = None,
    init_adapter_dir: Path | None = None,
) -> TrainOutcome:
    """Train `data.objective` (dpo or kto) from the adapter in `init_adapter_dir` (None: a fresh
    LoRA on the base) and save the result under `work_dir/adapter` (when completed). `options`
    are resolved (`Preference.resolved`). The base comes back unchanged whatever happens."""
    started = time.monotonic()
    report_to = list(report_to or [])
    check_modules(base.model, cfg)
    precision, precision_note = resolve_precision(cfg.precision, base.device)
    extra = integrations.callbacks(report_to, log_dir or work_dir / "logs") if report_to else []
    model = trainable_base(base)
    model.config.use_cache = False
    max_length = cfg.max_seq_length or 1024
    with _base_kept(model, base.tokenizer):
        torch.manual_seed(cfg.seed or 0)  # a fresh LoRA's initialisation: the same on every attempt
        if init_adapter_dir is not None:
            peft_model = PeftModel.from_pretrained(model, str(init_adapter_dir), is_trainable=True)
        else:
            peft_model = get_peft_model(model, lora_config(cfg, model))
        try:
            before = score_judgements(peft_model, base.tokenizer, data.eval, base.device, max_length)
            callback = JobCallback(control, started)
            trainer, run = _trainer(peft_model, base, cfg, options, data, work_dir, precision, [callback, *extra])
            result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            if callback.stop_reason:
                return TrainOutcome(completed=False, stop_reason=callback.stop_reason)
            after = score_judgements(peft_model, base.tokenizer, data.eval, base.device, max_length)
            adapter_dir = work_dir / "adapter"
            peft_model.save_pretrained(str(adapter_dir), selected_adapters=["default"])
            metrics = _run_metrics(cfg, options, data, trainer, result).with_values(
                method=base.method,
                train_seconds=round(time.monotonic() - started, 3),
                **run,
                **preference_metrics(data.objective, before, after, options.beta or 0.0),
                **spec_metrics(cfg, trainer, precision, precision_note, report_to),
                **base.quant_metrics(),
            )
            if base.fallback_reason:
                metrics = metrics.with_values(fallback=base.fallback_reason)
            return TrainOutcome(completed=True, adapter_dir=adapter_dir, metrics=metrics)
        finally:
            release_base(base, peft_model)


def _trainer(
    peft_model: Any,
    base: LoadedBase,
    cfg: AdapterSettings,
    options: Preference,
    data: PreferenceSet,
    work_dir: Path,
    precision: str,
    callbacks: list[TrainerCallback],
) -> tuple[Any, dict[str, Any]]:
    """TRL's trainer for the objective, and what its settings were (for the metrics)."""
    from datasets import Dataset, disable_progress_bars  # TRL's data; imported with the first preference job
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    disable_progress_bars()  # the job record carries progress, not stderr
    values = training_argument_values(cfg, work_dir / "checkpoints", base.device, precision)
    values.update(
        learning_rate=options.learning_rate,
        beta=options.beta,
        max_length=cfg.max_seq_length or 1024,
        precompute_ref_log_probs=bool(options.precompute_ref_log_probs),
        disable_dropout=True,  # the reference and the policy must see the same network
    )
    run: dict[str, Any] = {
        "beta": options.beta,
        "learning_rate": options.learning_rate,
        "reference_log_probs": "once per job" if options.precompute_ref_log_probs else "every step",
    }
    if data.objective == "dpo":
        args = DPOConfig(**values, loss_type=[options.loss_type or "sigmoid"])
        dataset = Dataset.from_list(dpo_rows(data.train))
        trainer: Any = DPOTrainer(
            model=peft_model, args=args, train_dataset=dataset, processing_class=base.tokenizer, callbacks=callbacks
        )
        run["loss_type"] = options.loss_type or "sigmoid"
    else:
        desirable, undesirable = kto_weights(data.train, options)
        if values["per_device_train_batch_size"] < KTO_MIN_BATCH:
            values["per_device_train_batch_size"] = KTO_MIN_BATCH
            run["batch_size_note"] = f"kto needs {KTO_MIN_BATCH} replies a batch for its KL estimate: ran with 2"
        args = KTOConfig(**values, desirable_weight=desirable, undesirable_weight=undesirable)
        dataset = Dataset.from_list(kto_rows(data.train, cfg.seed or 0))
        trainer = KTOTrainer(
            model=peft_model, args=args, train_dataset=dataset, processing_class=base.tokenizer, callbacks=callbacks
        )
        run.update(desirable_weight=desirable, undesirable_weight=undesirable)
    trainer.remove_callback(PrinterCallback)  # the job record carries progress, not stdout
    return trainer, run


def _run_metrics(
    cfg: AdapterSettings, options: Preference, data: PreferenceSet, trainer: Any, result: Any
) -> TrainingMetrics:
    """Loss, steps, epochs and TRL's own last training-batch rewards."""
    history = trainer.state.log_history
    last = next((entry for entry in reversed(history) if "loss" in entry), {})
    metrics = TrainingMetrics(
        train_loss=round(float(result.training_loss), 6),
        steps=trainer.state.global_step,
        epochs=round(float(trainer.state.epoch or 0), 4) if cfg.max_steps else cfg.num_epochs,
        loss_curve=loss_curve(history, trainer.state.global_step, None),
        **data.metrics(),
    )
    for name, key in (("train_reward_accuracy", "rewards/accuracies"), ("train_reward_margin", "rewards/margins")):
        if key in last:
            metrics = metrics.with_values(**{name: round(float(last[key]), 6)})
    return metrics


@contextmanager
def _base_kept(model: Any, tokenizer: Any) -> Iterator[None]:
    """Put back what TRL changes on the model and tokenizer it is given: the cached base and its
    tokenizer serve every later job (supervised training, generations) as they were."""
    config = model.config
    generation = getattr(model, "generation_config", None)
    pad_ids = (config.pad_token_id, getattr(generation, "pad_token_id", None))
    pad_token = tokenizer.pad_token
    dropouts = [(module, module.p) for module in model.modules() if isinstance(module, torch.nn.Dropout)]
    had_grad_hook = hasattr(model, "_require_grads_hook")
    try:
        yield
    finally:
        model.__dict__.pop("forward", None)  # TRL's fused LM head replaces the instance's forward
        config.pad_token_id = pad_ids[0]
        if generation is not None:
            generation.pad_token_id = pad_ids[1]
        if tokenizer.pad_token != pad_token:  # TRL sets the end token as pad when there is none
            tokenizer.pad_token = pad_token
        for module, p in dropouts:
            module.p = p
        if not had_grad_hook and hasattr(model, "_require_grads_hook"):
            model.disable_input_require_grads()
