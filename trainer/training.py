"""Training one adapter: a linear recipe on transformers' Trainer + PEFT.

    base (kept loaded) -> LoRA layers injected -> eval loss before -> Trainer.train
    (padding-free batches, resumable) -> eval loss after -> adapter saved -> LoRA layers removed

The job's control object is consulted after every optimizer step: it can stop training
(cancel, SIGTERM, lost lease) and ask for a checkpoint, which is written by Trainer and handed
back to the control object to upload.
"""

from __future__ import annotations

import logging
import math
import os
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

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
from trainer.base_model import LoadedBase
from trainer.dataset import IGNORE_INDEX, TokenizedExample, collate_padding_free

log = logging.getLogger("avatune.trainer")

ALL_LINEAR = "all-linear"

# -- packed attention -----------------------------------------------------------------------
#
# With padding-free batches, SDPA gets one (1, T) sequence and a block-diagonal mask built from
# position_ids: it computes attention over all T x T positions and throws most away (the mask
# also keeps the kernel off its causal fast path). `PACKED_SDPA` runs causal SDPA once per
# example instead (the boundaries are where position_ids stop counting up, the rule
# transformers itself uses), so attention costs sum(len^2) / 2 rather than T^2 and no mask is
# built. Results are the same as the masked path (tests/test_bench_training.py). Anything
# else (a padding mask, a batch of several rows, a cache) goes to the stock SDPA function.
PACKED_SDPA = "avatune_packed_sdpa"
_segments_cache: list[Any] = [None, None]  # (weakref to the position_ids tensor, its segments)


def _segments(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each example in a (1, T) packed row; computed once per forward."""
    ref, segments = _segments_cache
    if ref is not None and ref() is position_ids:
        return segments
    positions = position_ids[0]
    starts = (torch.nonzero(positions[1:] != positions[:-1] + 1).flatten() + 1).tolist()
    bounds = [0, *starts, int(positions.shape[0])]
    segments = list(zip(bounds[:-1], bounds[1:]))
    _segments_cache[0], _segments_cache[1] = weakref.ref(position_ids), segments
    return segments


def _packed_sdpa_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    packed = (
        attention_mask is None and position_ids is not None and query.shape[0] == 1 and query.shape[2] > 1
        and key.shape[2] == query.shape[2] and position_ids.shape[-1] == query.shape[2]
    )
    segments = _segments(position_ids) if packed else []
    if len(segments) < 2:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    outputs = [
        sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, dropout=dropout,
                               scaling=scaling, is_causal=True)[0]
        for a, b in segments
    ]
    return torch.cat(outputs, dim=1), None


def _packed_sdpa_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
    """No mask for padding-free input (boundaries come from position_ids); SDPA's otherwise."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def _register_packed_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, _packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, _packed_sdpa_mask)


_register_packed_attention()


def _use_packed_attention(model: Any) -> str | None:
    """Switch a model on SDPA to PACKED_SDPA; the implementation to restore afterwards (None: unchanged)."""
    current = getattr(model.config, "_attn_implementation", None)
    if current != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return None
    model.set_attn_implementation(PACKED_SDPA)
    return current


class TrainingControl(Protocol):
    """What a running job lets the training loop know and do."""

    def stop_reason(self) -> str | None:
        """Non-None once training must stop at the next step ("cancelled", "preempted", ...)."""

    def report(self, progress: JobProgress) -> None:
        """Latest progress (cheap: the job's heartbeat decides when to persist it)."""

    def checkpoint_due(self, step: int) -> bool:
        """Whether to write a checkpoint after this step."""

    def checkpoint_saved(self, local_dir: Path, step: int) -> None:
        """A complete checkpoint is on local disk: upload it."""


@dataclass
class TrainOutcome:
    completed: bool
    stop_reason: str | None = None
    adapter_dir: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def lora_config(cfg: AdapterSettings) -> LoraConfig:
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules or ALL_LINEAR,
        task_type="CAUSAL_LM",
        bias="none",
    )


@torch.no_grad()
def evaluate_loss(model: Any, examples: list[TokenizedExample], device: torch.device, batch_tokens: int = 4096) -> float | None:
    """Token-weighted mean loss on assistant tokens (None without eval data)."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    batch: list[TokenizedExample] = []

    def run(rows: list[TokenizedExample]) -> None:
        nonlocal total_loss, total_tokens
        inputs = collate_padding_free([{"input_ids": r.input_ids, "labels": r.labels} for r in rows])
        inputs = {k: v.to(device) for k, v in inputs.items()}
        n = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
        if n == 0:
            return
        out = model(**inputs, use_cache=False)
        total_loss += float(out.loss) * n
        total_tokens += n

    for ex in examples:
        batch.append(ex)
        if sum(len(b.input_ids) for b in batch) >= batch_tokens:
            run(batch)
            batch = []
    if batch:
        run(batch)
    model.train(was_training)
    return total_loss / total_tokens if total_tokens else None


class _JobCallback(TrainerCallback):
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
        self._control.report(JobProgress(
            step=state.global_step,
            total_steps=state.max_steps,
            epoch=round(float(state.epoch or 0), 4),
            train_loss=self.last_loss,
            eta_seconds=round(elapsed / done * remaining, 1) if done > 0 else None,
        ))
        stop = _agree(self._control.stop_reason() is not None)
        checkpoint = _agree(self._control.checkpoint_due(state.global_step))
        if stop:
            # Another rank may have seen the stop first; the reason is in the same place for all.
            reason = self._control.stop_reason() or "preempted"
            self.stop_reason = reason
            control.should_training_stop = True
            # Preemption keeps the work done so far; a cancel throws it away.
            control.should_save = reason == "preempted"
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


def _training_arguments(cfg: AdapterSettings, out_dir: Path, device: torch.device) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=cfg.batch_size,
        num_train_epochs=cfg.num_epochs,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_ratio or 0.0,  # a float < 1 is a ratio of the total steps
        lr_scheduler_type="cosine",
        logging_steps=1,
        save_strategy="no",  # checkpoints are asked for by the job's control object
        save_only_model=False,
        report_to=[],
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=device.type == "cuda" and torch.cuda.is_bf16_supported(),
        use_cpu=device.type != "cuda",
        ddp_find_unused_parameters=False,
        ddp_backend="gloo" if device.type != "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )


def train_adapter(
    base: LoadedBase,
    cfg: AdapterSettings,
    train_examples: list[TokenizedExample],
    eval_examples: list[TokenizedExample],
    work_dir: Path,
    control: TrainingControl,
    resume_from: Path | None = None,
) -> TrainOutcome:
    """Train a LoRA adapter on `base` and save it under `work_dir/adapter` (when completed).

    The base model comes back unchanged whatever happens: the LoRA layers are removed again."""
    started = time.monotonic()
    model = base.model
    if base.method == "qlora" and not getattr(model, "_avatune_kbit_prepared", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model._avatune_kbit_prepared = True
    model.config.use_cache = False  # a cache disables the packed-sequence mask
    restore_attention = _use_packed_attention(model)
    torch.manual_seed(cfg.seed or 0)
    peft_model = get_peft_model(model, lora_config(cfg))
    try:
        eval_before = evaluate_loss(peft_model, eval_examples, base.device)  # LoRA B starts at 0: the base itself
        dataset = [{"input_ids": ex.input_ids, "labels": ex.labels} for ex in train_examples]
        callback = _JobCallback(control, started)
        trainer = Trainer(
            model=peft_model,
            args=_training_arguments(cfg, work_dir / "checkpoints", base.device),
            train_dataset=dataset,  # type: ignore[arg-type]
            # Padding-free batches: one (1, total_tokens) row, boundaries in position_ids, no
            # attention mask, label -100 on each example's first token. The same tensors as
            # trainer.dataset.collate_padding_free; the library's collator measured as fast
            # (BENCHMARKS.md, benchmark 3), so it is the one used.
            data_collator=DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX),
            callbacks=[callback],
        )
        trainer.remove_callback(PrinterCallback)  # the job record carries progress, not stdout
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        if callback.stop_reason:
            return TrainOutcome(completed=False, stop_reason=callback.stop_reason)
        eval_after = evaluate_loss(peft_model, eval_examples, base.device)
        adapter_dir = work_dir / "adapter"
        if trainer.is_world_process_zero():
            peft_model.save_pretrained(str(adapter_dir))
        trained_tokens = sum(ex.num_trainable_tokens for ex in train_examples)
        metrics = {
            "train_loss": round(float(result.training_loss), 6),
            "eval_loss_before": _round(eval_before),
            "eval_loss_after": _round(eval_after),
            "perplexity_before": _round(math.exp(eval_before)) if eval_before is not None else None,
            "perplexity_after": _round(math.exp(eval_after)) if eval_after is not None else None,
            "train_examples": len(train_examples),
            "eval_examples": len(eval_examples),
            "train_tokens_per_epoch": trained_tokens,
            "steps": trainer.state.global_step,
            "epochs": cfg.num_epochs,
            "method": base.method,
            "train_seconds": round(time.monotonic() - started, 3),
        }
        if base.fallback_reason:
            metrics["fallback"] = base.fallback_reason
        return TrainOutcome(completed=True, adapter_dir=adapter_dir, metrics=metrics)
    finally:
        base.model = _remove_lora(peft_model)
        if restore_attention is not None:
            base.model.set_attn_implementation(restore_attention)


def _remove_lora(peft_model: PeftModel) -> Any:
    model = peft_model.unload()
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                pass
    return model


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
