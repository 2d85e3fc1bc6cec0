"""Full fine-tuning (`method: full`): every weight (or the `trainable_layers`' and
`target_modules`' weights) of a private copy of the base is trained, and the whole model is
saved (safetensors + tokenizer), not an adapter.

    private fp32 copy of the base (never the worker's cached base, which later LoRA jobs reuse)
    -> the base's completions on a few held-out prompts (samples.json's `base`, from the same
       copy before it trains) -> freeze all but the chosen layers/modules -> Trainer (mixed
       precision from `precision`, eval loss at a few steps for the curve) -> the trained
       model's completions -> saved in the precision's dtype with samples.json and loss.png
       -> the copy freed

Full fine-tuning never runs on 4-bit weights: the runner refuses a full job with qlora options.
"""

from __future__ import annotations

import gc
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from contracts.adapter import AdapterSettings
from contracts.adapters import VersionSamples
from contracts.keys import LOSS_CURVE_FILE, SAMPLES_FILE
from trainer import integrations, packed_attention
from trainer.adapter_ops import evaluate_loss
from trainer.base_model import BaseModelCache, BaseRef
from trainer.control import TrainingControl
from trainer.dataset import TokenizedExample
from trainer.errors import JobFailure
from trainer.evaluation import (
    HeldOutPrompt,
    LossCurveCallback,
    build_samples,
    greedy_completion,
    plot_loss_curve,
    sample_prompts,
    samples_failed,
)
from trainer.training import (
    JobCallback,
    TrainOutcome,
    check_modules,
    make_trainer,
    resolve_precision,
    run_metrics,
    spec_metrics,
)

SAVE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _completions(
    model: Any, tokenizer: Any, prompts: list[HeldOutPrompt], samples: SampleOptions
) -> list[str] | VersionSamples:
    """Greedy completions of `prompts`, or (generating failed) the samples.json saying so."""
    try:
        return [greedy_completion(model, tokenizer, p.prompt_ids, samples.max_new_tokens) for p in prompts]
    except Exception as exc:
        return samples_failed(samples.job_id, samples.max_new_tokens, exc)


def _write_samples(
    out_dir: Path,
    tokenizer: Any,
    prompts: list[HeldOutPrompt],
    base_texts: list[str] | VersionSamples,
    tuned_texts: list[str] | VersionSamples,
    samples: SampleOptions,
    note: str | None,
) -> VersionSamples:
    if isinstance(base_texts, VersionSamples):
        written = base_texts
    elif isinstance(tuned_texts, VersionSamples):
        written = tuned_texts
    else:
        written = build_samples(
            tokenizer,
            prompts,
            base_texts,
            tuned_texts,
            job_id=samples.job_id,
            max_new_tokens=samples.max_new_tokens,
            note=note,
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SAMPLES_FILE).write_text(written.model_dump_json(by_alias=True, indent=2))
    return written


_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def freeze_for(model: Any, cfg: AdapterSettings) -> int:
    """Leave trainable only the parameters of `trainable_layers` (decoder layer indices) and of
    `target_modules` (module names) when set; everything when neither is. Returns the number of
    trainable parameters."""
    layers = set(cfg.trainable_layers or [])
    modules = set(cfg.target_modules or [])
    count = 0
    for name, param in model.named_parameters():
        module_path = name.rsplit(".", 1)[0]
        match = _LAYER_RE.search(name)
        in_layers = not layers or (match is not None and int(match.group(1)) in layers)
        in_modules = not modules or any(module_path == m or module_path.endswith("." + m) for m in modules)
        param.requires_grad = in_layers and in_modules
        count += param.numel() if param.requires_grad else 0
    return count


@dataclass
class SampleOptions:
    """samples.json beside the model: how many held-out prompts, how many new tokens each."""

    job_id: str | None = None
    prompts: int = 0
    max_new_tokens: int = 48


def train_full(
    models: BaseModelCache,
    ref: BaseRef,
    cfg: AdapterSettings,
    train_examples: list[TokenizedExample],
    eval_examples: list[TokenizedExample],
    work_dir: Path,
    control: TrainingControl,
    resume_from: Path | None = None,
    report_to: list[str] | None = None,
    log_dir: Path | None = None,
    samples: SampleOptions | None = None,
) -> TrainOutcome:
    """Fully fine-tune a private copy of the base; the model is saved under `work_dir/model`
    with samples.json (base vs trained completions) and loss.png beside its files."""
    started = time.monotonic()
    report_to = list(report_to or [])
    samples = samples or SampleOptions()
    held: dict[str, Any] = {}
    try:
        # fp32 master weights: bf16/fp16 mixed precision trains on them; the saved copy is cast.
        held["model"] = model = models.load_private(ref.path, torch.float32, revision=ref.revision, token=ref.token)
        device = next(model.parameters()).device
        tokenizer = models.stock_tokenizer(ref.path, revision=ref.revision, token=ref.token)
        prompts, note = sample_prompts(model, eval_examples, samples.prompts, samples.max_new_tokens)
        # Still the base: its answers are samples.json's `base` (before attention is swapped for training).
        base_texts = _completions(model, tokenizer, prompts, samples)
        check_modules(model, cfg)
        precision, precision_note = resolve_precision(cfg.precision, device)
        extra = integrations.callbacks(report_to, log_dir or work_dir / "logs") if report_to else []
        trainable = freeze_for(model, cfg)
        if trainable == 0:
            raise JobFailure("trainable_layers/target_modules leave no weight to train")
        model.config.use_cache = False
        packed_attention.use_packed_attention(model)
        torch.manual_seed(cfg.seed or 0)
        eval_before = evaluate_loss(model, eval_examples, device)
        callback = JobCallback(control, started)
        curve = LossCurveCallback(lambda: evaluate_loss(model, eval_examples, device), eval_before)
        held["trainer"] = trainer = make_trainer(
            model, cfg, train_examples, work_dir, device, precision, [callback, curve, *extra]
        )
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        if callback.stop_reason:
            return TrainOutcome(completed=False, stop_reason=callback.stop_reason)
        eval_after = evaluate_loss(model, eval_examples, device)
        metrics = run_metrics(cfg, trainer, result, train_examples, eval_examples, eval_before, eval_after)
        metrics = metrics.with_values(
            method="full",
            train_seconds=round(time.monotonic() - started, 3),
            loss_curve=curve.curve(trainer.state, eval_after),
            **spec_metrics(cfg, trainer, precision, precision_note, report_to),
        )
        out_dir = work_dir / "model"
        if trainer.is_world_process_zero():
            model.config.use_cache = True
            if hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation("sdpa")  # our packed kernel is not registered where it is loaded
            tuned_texts = (
                base_texts
                if isinstance(base_texts, VersionSamples)
                else _completions(model, tokenizer, prompts, samples)
            )
            written = _write_samples(out_dir, tokenizer, prompts, base_texts, tuned_texts, samples, note)
            metrics = metrics.with_values(samples=len(written.samples))
            model.to(SAVE_DTYPES[precision]).save_pretrained(out_dir, safe_serialization=True)
            tokenizer.save_pretrained(out_dir)
            plot_loss_curve(
                metrics.loss_curve or {},
                out_dir / LOSS_CURVE_FILE,
                title=f"job {samples.job_id}" if samples.job_id else "full fine-tune",
            )
        metrics = metrics.with_values(dtype=str(SAVE_DTYPES[precision]).removeprefix("torch."))
        return TrainOutcome(completed=True, adapter_dir=out_dir, metrics=metrics)
    finally:
        held.clear()  # free the private copy (and its optimizer state) before the next job
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
