"""Training one adapter: a linear recipe on transformers' Trainer + PEFT.

    base (kept loaded) -> LoRA layers injected -> eval loss before -> Trainer.train
    (padding-free batches, resumable) -> eval loss after -> adapter saved -> LoRA layers removed

The job's control object (`trainer.control.TrainingControl`) is consulted after every optimizer
step: it can stop training (cancel, SIGTERM, lost lease) and ask for a checkpoint, which is
written by Trainer and handed back to the control object to upload. Packed attention for the
padding-free batches is `trainer.packed_attention`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    DataCollatorWithFlattening,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from contracts.adapter import AdapterSettings
from contracts.jobs import JobProgress
from contracts.metrics import TrainingMetrics
from trainer import integrations, packed_attention
from trainer.adapter_ops import evaluate_loss, remove_lora
from trainer.base_model import LoadedBase
from trainer.control import TrainingControl, keeps_checkpoint
from trainer.dataset import IGNORE_INDEX, TokenizedExample
from trainer.errors import JobFailure
from trainer.evaluation import LossCurveCallback

log = logging.getLogger("avatune.trainer")

ALL_LINEAR = "all-linear"


@dataclass
class TrainOutcome:
    completed: bool
    stop_reason: str | None = None
    adapter_dir: Path | None = None
    metrics: TrainingMetrics = field(default_factory=TrainingMetrics)


def _decoder_linear_modules(model: Any) -> list[str]:
    """Names of the linear modules inside the decoder layers (what "all-linear" means there)."""
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if ".layers." in name and isinstance(module, torch.nn.Linear)
        }
    )


def lora_config(cfg: AdapterSettings, model: Any = None) -> LoraConfig:
    targets: Any = cfg.target_modules or ALL_LINEAR
    if cfg.trainable_layers and not cfg.target_modules and model is not None:
        # PEFT takes layers_to_transform only with explicit module names, not "all-linear".
        targets = _decoder_linear_modules(model)
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        # Only these decoder layers get LoRA weights (None: every layer).
        layers_to_transform=cfg.trainable_layers or None,
        layers_pattern="layers" if cfg.trainable_layers else None,
        task_type="CAUSAL_LM",
        bias="none",
        # Both only where SERVING_TARGETS allow them (contracts.serving): vLLM and llama.cpp refuse them.
        use_dora=bool(cfg.use_dora),
        modules_to_save=cfg.modules_to_save or None,
    )


def check_modules(model: Any, cfg: AdapterSettings) -> None:
    """Fail the job clearly when `target_modules` or `trainable_layers` name what the loaded
    base does not have (PEFT would fail later with a less helpful error, or match nothing)."""
    if cfg.target_modules:
        names = {name for name, _ in model.named_modules() if name}
        suffixes = {name.rsplit(".", 1)[-1] for name in names}
        unknown = [
            m for m in cfg.target_modules if m not in suffixes and not any(n == m or n.endswith("." + m) for n in names)
        ]
        if unknown:
            linear = sorted(
                {n.rsplit(".", 1)[-1] for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
            )
            raise JobFailure(
                f"target_modules {unknown} are not modules of this base model (its linear modules: {', '.join(linear)})"
            )
    if cfg.trainable_layers:
        layers = int(getattr(model.config, "num_hidden_layers", 0) or 0)
        outside = [i for i in cfg.trainable_layers if i >= layers]
        if outside:
            raise JobFailure(
                f"trainable_layers {outside} do not exist: this base model has {layers} decoder "
                f"layers (0..{layers - 1})"
            )


def resolve_precision(requested: str | None, device: torch.device) -> tuple[str, str | None]:
    """The training precision for `requested` on `device`, and a note when it differs.

    Default: bf16 on a GPU that supports it, else fp32. fp16 mixed precision needs a GPU
    (transformers' Trainer refuses it on CPU): on a CPU worker fp16 falls back to fp32 with a
    note in the metrics rather than failing the job. bf16 runs on CPU (autocast) and on GPUs that
    support it; on an older GPU it falls back to fp16."""
    cuda = device.type == "cuda"
    bf16_ok = not cuda or torch.cuda.is_bf16_supported()
    if requested is None:
        return ("bf16" if cuda and bf16_ok else "fp32"), None
    if requested == "fp16" and not cuda:
        return "fp32", "precision fp16 needs a GPU; trained in fp32 on this CPU worker"
    if requested == "bf16" and not bf16_ok:
        return "fp16", "precision bf16 is not supported by this GPU; trained in fp16"
    return requested, None


class JobCallback(TrainerCallback):
    """Reports progress after every optimizer step and stops or checkpoints when the job's control says so."""

    def __init__(self, control: TrainingControl, started: float) -> None:
        self._control = control
        self._started = started
        self._start_step: int | None = None
        self.stop_reason: str | None = None
        self.last_loss: float | None = None

    def on_log(self, args, state: TrainerState, control: TrainerControl, logs=None, **kwargs) -> None:  # type: ignore[override]
        if logs and "loss" in logs:
            self.last_loss = float(logs["loss"])

    def on_step_end(self, args, state: TrainerState, control: TrainerControl, **kwargs) -> None:  # type: ignore[override]
        if self._start_step is None:
            self._start_step = state.global_step - 1
        done = state.global_step - self._start_step
        elapsed = time.monotonic() - self._started
        remaining = max(0, state.max_steps - state.global_step)
        self._control.report(
            JobProgress(
                step=state.global_step,
                total_steps=state.max_steps,
                epoch=round(float(state.epoch or 0), 4),
                train_loss=self.last_loss,
                eta_seconds=round(elapsed / done * remaining, 1) if done > 0 else None,
            )
        )
        stop = _agree(self._control.stop_reason() is not None)
        checkpoint = _agree(self._control.checkpoint_due(state.global_step))
        if stop:
            # Another rank may have seen the stop first; the reason is in the same place for all.
            reason = self._control.stop_reason() or "preempted"
            self.stop_reason = reason
            control.should_training_stop = True
            # Preemption and a duration limit keep the work done so far; a cancel throws it away.
            control.should_save = keeps_checkpoint(reason)
        elif checkpoint and state.global_step < state.max_steps:
            control.should_save = True

    def on_save(self, args, state: TrainerState, control: TrainerControl, **kwargs) -> None:  # type: ignore[override]
        local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if local.is_dir():
            self._control.checkpoint_saved(local, state.global_step)


def _agree(flag: bool) -> bool:
    """True when any rank says so: ranks of a data-parallel job must stop and save together,
    or one would wait forever in a collective the others never enter."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1 if flag else 0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _checkpointing_arguments(enabled: bool) -> dict[str, Any]:
    """Gradient (activation) checkpointing, under the name this transformers version uses
    (v5 renamed `gradient_checkpointing` to `activation_checkpointing`). Non-reentrant: works
    with frozen inputs (LoRA, trainable_layers) and padding-free batches."""
    kwargs = {"use_reentrant": False} if enabled else None
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__:
        return {"activation_checkpointing": enabled, "activation_checkpointing_kwargs": kwargs}
    return {"gradient_checkpointing": enabled, "gradient_checkpointing_kwargs": kwargs}


def _checkpointing_on(model: Any) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # new name first (no warning)
        try:
            return bool(getattr(model, name))  # a PeftModel forwards to the model it wraps
        except AttributeError:
            continue
    return False


def _checkpointing_off(model: Any) -> None:
    """Turn checkpointing off, under the name this transformers version uses (no FutureWarning)."""
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    disable()


def training_arguments(
    cfg: AdapterSettings, out_dir: Path, device: torch.device, precision: str | None = None
) -> TrainingArguments:
    return TrainingArguments(**training_argument_values(cfg, out_dir, device, precision))


def training_argument_values(
    cfg: AdapterSettings, out_dir: Path, device: torch.device, precision: str | None = None
) -> dict[str, Any]:
    """The `TrainingArguments` every job trains with (TRL's configs take the same, plus their own)."""
    precision = precision or resolve_precision(cfg.precision, device)[0]
    return dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=cfg.batch_size,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps or -1,  # overrides num_train_epochs when set
        gradient_accumulation_steps=cfg.gradient_accumulation_steps or 1,
        **_checkpointing_arguments(bool(cfg.gradient_checkpointing)),
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_ratio or 0.0,  # a float < 1 is a ratio of the total steps
        lr_scheduler_type="cosine",
        logging_steps=1,
        save_strategy="no",  # checkpoints are asked for by the job's control object
        save_only_model=False,
        report_to=[],
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device.type != "cuda",
        ddp_find_unused_parameters=False,
        ddp_backend="gloo" if device.type != "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )


def make_trainer(
    model: Any,
    cfg: AdapterSettings,
    train_examples: list[TokenizedExample],
    work_dir: Path,
    device: torch.device,
    precision: str,
    callbacks: list[TrainerCallback],
) -> Trainer:
    """transformers' Trainer on padding-free batches, as every job type trains (LoRA and full)."""
    dataset = [{"input_ids": ex.input_ids, "labels": ex.labels} for ex in train_examples]
    trainer = Trainer(
        model=model,
        args=training_arguments(cfg, work_dir / "checkpoints", device, precision),
        train_dataset=dataset,  # type: ignore[arg-type]
        # Padding-free batches: one (1, total_tokens) row, boundaries in position_ids, no
        # attention mask, label -100 on each example's first token. The same tensors as
        # trainer.dataset.collate_padding_free; the library's collator measured as fast
        # (BENCHMARKS.md, benchmark 3), so it is the one used.
        data_collator=DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX),
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # the job record carries progress, not stdout
    return trainer


def spec_metrics(
    cfg: AdapterSettings, trainer: Trainer, precision: str, precision_note: str | None, report_to: list[str]
) -> dict[str, Any]:
    """What the job spec's knobs did in this run (read back from the run itself where possible)."""
    args = trainer.args
    used = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    metrics: dict[str, Any] = {
        "precision": used,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "max_steps": cfg.max_steps,
        "gradient_checkpointing": _checkpointing_on(trainer.model),
        "target_modules": cfg.target_modules,
        "trainable_layers": cfg.trainable_layers,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }
    if precision_note:
        metrics["precision_note"] = precision_note
    if report_to:
        metrics["report_to"] = list(report_to)
    return metrics


def trainable_base(base: LoadedBase) -> Any:
    """The cached base made ready for LoRA layers (a 4-bit base once prepared for k-bit training,
    which it stays for every later job)."""
    model = base.model
    if base.method == "qlora" and not getattr(model, "_avatune_kbit_prepared", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model._avatune_kbit_prepared = True
    return model


def release_base(base: LoadedBase, peft_model: Any) -> None:
    """Give the cached base back as later jobs expect it: gradient checkpointing off, every LoRA
    layer removed (`base.model` is the bare model again)."""
    if _checkpointing_on(peft_model.base_model.model):
        _checkpointing_off(peft_model.base_model.model)
    base.model = remove_lora(peft_model)


def train_adapter(
    base: LoadedBase,
    cfg: AdapterSettings,
    train_examples: list[TokenizedExample],
    eval_examples: list[TokenizedExample],
    work_dir: Path,
    control: TrainingControl,
    resume_from: Path | None = None,
    report_to: list[str] | None = None,
    log_dir: Path | None = None,
    init_adapter_dir: Path | None = None,
) -> TrainOutcome:
    """Train a LoRA adapter on `base` and save it under `work_dir/adapter` (when completed).

    `report_to` integrations log into `log_dir` (the caller uploads it). The base model comes
    back unchanged whatever happens: the LoRA layers are removed again. `init_adapter_dir`
    (warm start) continues training a saved adapter (its own LoRA config) instead of a fresh one."""
    started = time.monotonic()
    report_to = list(report_to or [])
    check_modules(base.model, cfg)
    precision, precision_note = resolve_precision(cfg.precision, base.device)
    extra = integrations.callbacks(report_to, log_dir or work_dir / "logs") if report_to else []
    model = trainable_base(base)
    model.config.use_cache = False  # a cache disables the packed-sequence mask
    restore_attention = packed_attention.use_packed_attention(model)
    torch.manual_seed(cfg.seed or 0)
    if init_adapter_dir is not None:
        peft_model = PeftModel.from_pretrained(model, str(init_adapter_dir), is_trainable=True)
    else:
        peft_model = get_peft_model(model, lora_config(cfg, model))
    try:
        eval_before = evaluate_loss(peft_model, eval_examples, base.device)  # LoRA B starts at 0: the base itself
        callback = JobCallback(control, started)
        # Eval loss at a few steps during training, for the loss curve (loss.png, metrics.loss_curve).
        curve = LossCurveCallback(lambda: evaluate_loss(peft_model, eval_examples, base.device), eval_before)
        trainer = make_trainer(
            peft_model, cfg, train_examples, work_dir, base.device, precision, [callback, curve, *extra]
        )
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        if callback.stop_reason:
            return TrainOutcome(completed=False, stop_reason=callback.stop_reason)
        eval_after = evaluate_loss(peft_model, eval_examples, base.device)
        adapter_dir = work_dir / "adapter"
        if trainer.is_world_process_zero():
            peft_model.save_pretrained(str(adapter_dir))
        metrics = run_metrics(cfg, trainer, result, train_examples, eval_examples, eval_before, eval_after)
        metrics = metrics.with_values(
            method=base.method,
            train_seconds=round(time.monotonic() - started, 3),
            loss_curve=curve.curve(trainer.state, eval_after),
            **spec_metrics(cfg, trainer, precision, precision_note, report_to),
            **base.quant_metrics(),
        )
        if base.fallback_reason:
            metrics = metrics.with_values(fallback=base.fallback_reason)
        return TrainOutcome(completed=True, adapter_dir=adapter_dir, metrics=metrics)
    finally:
        release_base(base, peft_model)
        if restore_attention is not None:
            base.model.set_attn_implementation(restore_attention)


def run_metrics(
    cfg: AdapterSettings,
    trainer: Trainer,
    result: Any,
    train_examples: list[TokenizedExample],
    eval_examples: list[TokenizedExample],
    eval_before: float | None,
    eval_after: float | None,
) -> TrainingMetrics:
    """The metrics every training method reports first: losses, perplexities, data sizes, steps, epochs."""
    return TrainingMetrics(
        train_loss=round(float(result.training_loss), 6),
        eval_loss_before=_round(eval_before),
        eval_loss_after=_round(eval_after),
        perplexity_before=_round(math.exp(eval_before)) if eval_before is not None else None,
        perplexity_after=_round(math.exp(eval_after)) if eval_after is not None else None,
        train_examples=len(train_examples),
        eval_examples=len(eval_examples),
        train_tokens_per_epoch=sum(ex.num_trainable_tokens for ex in train_examples),
        steps=trainer.state.global_step,
        # max_steps overrides num_epochs: then the epochs actually run
        epochs=round(float(trainer.state.epoch or 0), 4) if cfg.max_steps else cfg.num_epochs,
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
