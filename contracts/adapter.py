"""Per-avatar LoRA/QLoRA configuration: the body of `PUT {base}/adapter`, job overrides and
the `config` of a train request."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# "full" fine-tunes every (or the `trainable_layers`') weight and saves a whole model, not an adapter.
Method = Literal["qlora", "lora", "full"]
Precision = Literal["bf16", "fp16", "fp32"]
QuantType = Literal["nf4", "fp4"]
ComputeDtype = Literal["bfloat16", "float16", "float32"]

# No decoder has more layers than this (the largest open models have ~130): a bigger index is a
# mistake (or an attack on the trainer) and is refused where it is written, not at training time.
MAX_LAYER_INDEX = 1023
LayerIndex = Annotated[int, Field(ge=0, le=MAX_LAYER_INDEX)]

_MODULE_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.")


class AdapterSettings(BaseModel):
    """LoRA and training hyper-parameters. Every field is optional: an unset field falls back to
    the avatar's stored config, then to the trainer's `DEFAULT_*` environment, then to the
    documented default (see `DOCUMENTED_DEFAULTS`)."""

    model_config = ConfigDict(extra="forbid")

    method: Method | None = None
    r: int | None = Field(default=None, ge=1, le=256)
    lora_alpha: float | None = Field(default=None, gt=0, le=4096)
    lora_dropout: float | None = Field(default=None, ge=0, lt=1)
    target_modules: list[str] | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="module names such as ['q_proj', 'v_proj']; null = all linear projections",
    )
    learning_rate: float | None = Field(default=None, gt=0, le=1)
    num_epochs: float | None = Field(default=None, gt=0, le=100)
    batch_size: int | None = Field(default=None, ge=1, le=512)
    max_seq_length: int | None = Field(default=None, ge=16, le=32768)
    warmup_ratio: float | None = Field(default=None, ge=0, lt=1)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    gpus: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="data-parallel processes (GPUs) on one worker; more than the worker has fails the job clearly",
    )
    # The full job spec's knobs (contracts.spec folds its `tuning`, `qlora`, ... sections in here).
    precision: Precision | None = Field(
        default=None, description="training dtype; null = bf16 where supported, else fp32"
    )
    quant_type: QuantType | None = Field(default=None, description="qlora: 4-bit quantisation type")
    double_quant: bool | None = Field(default=None, description="qlora: quantise the quantisation constants too")
    compute_dtype: ComputeDtype | None = Field(default=None, description="qlora: dtype of the 4-bit matmuls")
    trainable_layers: list[LayerIndex] | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description="indices of the decoder layers to train (LoRA layers_to_transform, or the layers full "
        "fine-tuning unfreezes)",
    )
    gradient_accumulation_steps: int | None = Field(default=None, ge=1, le=1024)
    max_steps: int | None = Field(default=None, ge=1, le=1_000_000, description="overrides num_epochs when set")
    gradient_checkpointing: bool | None = None
    eval_fraction: float | None = Field(default=None, ge=0, lt=1, description="held-out share; null = EVAL_FRACTION")
    # PEFT options some serving engines cannot load (contracts.serving: refused for SERVING_TARGETS).
    use_dora: bool | None = Field(
        default=None, description="DoRA (weight-decomposed LoRA); vLLM and llama.cpp cannot load it"
    )
    modules_to_save: list[str] | None = Field(
        default=None,
        max_length=16,
        description="modules trained and saved whole besides the LoRA layers (e.g. ['lm_head']); vLLM and "
        "llama.cpp cannot load them",
    )

    @field_validator("target_modules", "modules_to_save")
    @classmethod
    def _module_names(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        for name in value:
            if not name or len(name) > 100 or not set(name) <= _MODULE_NAME_CHARS:
                raise ValueError(f"invalid module name {name!r}")
        return value

    @field_validator("trainable_layers")
    @classmethod
    def _layer_indices(cls, value: list[int] | None) -> list[int] | None:
        return sorted(set(value)) if value is not None else None

    def merged_over(self, base: AdapterSettings) -> AdapterSettings:
        """`base` with every field set here replacing it."""
        return base.model_copy(update=self.model_dump(exclude_none=True))

    def patched_over(self, stored: AdapterSettings) -> AdapterSettings:
        """`stored` updated by this PUT body, JSON-merge-patch style (RFC 7386): a field given a
        value replaces it, a field given as null goes back to its default, an omitted one stays."""
        return stored.model_copy(update={name: getattr(self, name) for name in self.model_fields_set})


DOCUMENTED_DEFAULTS = AdapterSettings(
    method="qlora",
    r=16,
    lora_alpha=32,
    lora_dropout=0.05,
    target_modules=None,
    learning_rate=2e-4,
    num_epochs=3,
    batch_size=4,
    max_seq_length=1024,
    warmup_ratio=0.03,
    seed=42,
    gpus=1,
    quant_type="nf4",
    double_quant=True,
    gradient_accumulation_steps=1,
    gradient_checkpointing=False,
    use_dora=False,
)
