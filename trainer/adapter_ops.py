"""Adapters on the worker's cached base, for a while: attached for a check or a generation and
taken off again, so the base comes back untouched for the next job; and the one held-out loss
measure every job reports (training, evaluation, `promote: if_better`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from trainer.dataset import IGNORE_INDEX, TokenizedExample, collate_padding_free


def remove_lora(peft_model: Any) -> Any:
    """The base model with the adapter's LoRA layers taken out again (the cached base is shared
    by later jobs, which must meet it untouched)."""
    _restore_saved_modules(peft_model)
    model = peft_model.unload()
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                pass
    return model


def _restore_saved_modules(peft_model: Any) -> None:
    """Put each `modules_to_save` module's original back: PEFT's `unload` keeps the trained copy."""
    from peft.utils.other import ModulesToSaveWrapper

    for name, module in list(peft_model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent_name, _, child = name.rpartition(".")
            setattr(peft_model.get_submodule(parent_name), child, module.original_module)


@contextmanager
def adapter_attached(base: Any, adapter_dir: Path, *, trainable: bool = False) -> Iterator[Any]:
    """The PEFT adapter in `adapter_dir` on the cached base (a LoadedBase), removed on exit."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(base.model, str(adapter_dir), is_trainable=trainable)
    try:
        yield peft_model
    finally:
        base.model = remove_lora(peft_model)


@torch.no_grad()
def evaluate_loss(
    model: Any, examples: list[TokenizedExample], device: torch.device, batch_tokens: int = 4096
) -> float | None:
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


def adapter_eval_loss(base: Any, adapter_dir: Path, examples: list[TokenizedExample]) -> float | None:
    """Eval loss of the adapter in `adapter_dir` on `examples` (same measure as training's)."""
    with adapter_attached(base, adapter_dir) as model:
        return evaluate_loss(model, examples, base.device)
