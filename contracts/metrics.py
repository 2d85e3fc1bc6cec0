"""The metrics of a training job: what `JobRecord.metrics`, the `job.succeeded` event and each
version's `metrics.json` carry for a `train` job.

On the wire the metrics stay a JSON object (the record's schema says `object`): the model names
and documents the fields every training method reports, lets the trainer build them in one
typed place, and keeps fields a later trainer adds (`extra="allow"`). A metric that was never
set is left out of the JSON rather than written as null (`as_dict`), so readers see what the
run reported, as they always did.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class TrainingMetrics(BaseModel):
    """What a training job reports (LoRA, QLoRA, full fine-tuning and data-parallel alike)."""

    model_config = ConfigDict(extra="allow")

    # -- the run ------------------------------------------------------------------------------
    method: str | None = Field(default=None, description="qlora, lora or full: the method that ran")
    train_loss: float | None = Field(default=None, description="mean training loss over the run")
    eval_loss_before: float | None = Field(default=None, description="held-out loss of the starting model")
    eval_loss_after: float | None = Field(default=None, description="held-out loss of the trained model")
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    train_examples: int | None = None
    eval_examples: int | None = None
    train_tokens_per_epoch: int | None = Field(default=None, description="trained (assistant) tokens per epoch")
    steps: int | None = Field(default=None, description="optimizer steps run")
    epochs: float | None = None
    train_seconds: float | None = None
    loss_curve: dict[str, list[list[float | None]]] | None = Field(
        default=None, description='{"train": [[step, loss], ...], "eval": [[step, loss], ...]}'
    )
    # -- what the spec's knobs did ----------------------------------------------------------
    precision: str | None = None
    precision_note: str | None = None
    gradient_accumulation_steps: int | None = None
    max_steps: int | None = None
    gradient_checkpointing: bool | None = None
    target_modules: list[str] | None = None
    trainable_layers: list[int] | None = None
    trainable_parameters: int | None = None
    report_to: list[str] | None = None
    fallback: str | None = Field(default=None, description="why qlora ran as lora (no 4-bit support)")
    # -- the data ---------------------------------------------------------------------------
    documents: int | None = Field(default=None, description="documents and datasets trained on")
    assistant_tokens: int | None = None
    trainable_tokens: int | None = None
    dropped_examples: int | None = None
    split_conversations: int | None = Field(default=None, description="long conversations cut into windows")
    truncated_examples: int | None = None
    resumed_from_step: int | None = Field(default=None, description="the checkpoint a retried run resumed from")
    base_model_reused: bool | None = Field(default=None, description="the worker's cached base served the job")
    base_model: str | None = None
    base_model_revision: str | None = None
    held_out_rule: str | None = Field(
        default=None, description="how the held-out examples were chosen (conversation-hash/v1, tail-windows/v1)"
    )
    held_out_cutoff: float | None = Field(
        default=None, description="conversation-hash/v1: conversations whose key falls below this are held out"
    )
    # -- serving (contracts.serving) ----------------------------------------------------------
    serving: dict[str, str] | None = Field(
        default=None,
        description='each engine\'s verdict on the saved adapter, e.g. {"vllm": "ok", "llama_cpp": "ok"}: '
        '"ok", or the engine\'s rules the adapter breaks (vLLM judged at SERVING_MAX_LORA_RANK)',
    )

    def with_values(self, **values: Any) -> TrainingMetrics:
        """A copy with `values` set (known fields or extra ones)."""
        return self.model_copy(update=values)

    def as_dict(self) -> dict[str, Any]:
        """The JSON object the record stores: every value the run set, by its name."""
        return self.model_dump(mode="json", exclude_unset=True)
