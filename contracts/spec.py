"""The full job spec: what a train request (API body and SQS message alike) may say beyond the
avatar's LoRA hyper-parameters.

`objective` says what the job learns from: `sft` (the default) the avatar's demonstrations,
`dpo` and `kto` its preference documents (feedback); `preference` holds their hyper-parameters,
whose defaults (`PREFERENCE_DEFAULTS`) are documented there and in docs/feedback.md.

Hyper-parameters (`method`, `precision`, `qlora`, `target_modules`, `trainable_layers`,
`tuning`, `resources.gpus`) are folded into the job's `config` (`AdapterSettings`) by
`JobSpec.settings_overrides()`, so the trainer resolves them like every other setting
(worker defaults <- the avatar's stored config <- the job). Everything else (where the base
model and data come from, limits, where artifacts go, callbacks, integrations, warm start,
promotion) stays in the spec and is stored on the job record as `spec`.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from contracts.adapter import AdapterSettings, ComputeDtype, LayerIndex, Method, Precision, QuantType
from contracts.webhooks import InvalidWebhookUrl, check_auth_header, check_signing_secret_ref, check_webhook_url

DatasetFormat = Literal["auto", "chat", "prompt_completion", "text"]
# "train": trained on; "eval": the job's held-out set (evaluated, never trained on).
DatasetSplit = Literal["train", "eval"]
ReportTo = Literal["tensorboard", "wandb", "mlflow"]
Promote = Literal["always", "if_better"]
# sft: supervised fine-tuning on demonstrations; dpo: Direct Preference Optimization on pairs;
# kto: Kahneman-Tversky Optimization on rated replies (and on each half of a pair).
Objective = Literal["sft", "dpo", "kto"]
DpoLoss = Literal["sigmoid", "ipo", "hinge"]

# The environment variables a job may name as its hub token (base_model.token_env).
HUB_TOKEN_ENV = re.compile(r"HF_TOKEN(_[A-Z0-9_]{1,100})?")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BaseModelSpec(_Section):
    name: str | None = Field(
        default=None,
        min_length=1,
        max_length=300,
        description="a Hugging Face model id or an s3:// prefix holding a saved model; null = the trainer's BASE_MODEL",
    )
    revision: str | None = Field(default=None, min_length=1, max_length=200, description="branch, tag or commit")
    token_env: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="the NAME of the trainer's environment variable (or mounted secret) holding the hub token: "
        "HF_TOKEN or HF_TOKEN_<NAME> (upper-case letters, digits, _); never the token itself",
    )

    @field_validator("token_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        # Only hub-token variables: any other name would let a job send the worker's other
        # secrets (AWS keys, CALLBACK_SEAL_KEY) to the hub as a bearer token, or probe whether
        # they exist through the "not set" error.
        if value is not None and not HUB_TOKEN_ENV.fullmatch(value):
            raise ValueError("token_env must be HF_TOKEN or HF_TOKEN_<NAME> (upper-case letters, digits, _)")
        return value


class QLoRAOptions(_Section):
    quant_type: QuantType | None = None
    double_quant: bool | None = None
    compute_dtype: ComputeDtype | None = None


class DatasetSource(_Section):
    uri: str = Field(
        min_length=6, max_length=1100, description="s3://bucket/key of a JSONL file inside the caller's prefix"
    )
    format: DatasetFormat = "auto"
    split: DatasetSplit = Field(
        default="train",
        description="eval: the job's held-out set (eval loss, samples), never trained on; with one, "
        "eval_fraction splits nothing off the training data",
    )


class Tuning(_Section):
    learning_rate: float | None = Field(default=None, gt=0, le=1)
    batch_size: int | None = Field(default=None, ge=1, le=512)
    gradient_accumulation_steps: int | None = Field(default=None, ge=1, le=1024)
    num_epochs: float | None = Field(default=None, gt=0, le=100)
    max_steps: int | None = Field(default=None, ge=1, le=1_000_000)
    warmup_ratio: float | None = Field(default=None, ge=0, lt=1)
    gradient_checkpointing: bool | None = None
    max_seq_length: int | None = Field(default=None, ge=16, le=32768)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    eval_fraction: float | None = Field(default=None, ge=0, lt=1)


class Resources(_Section):
    gpus: int | None = Field(default=None, ge=1, le=64)
    max_duration_minutes: float | None = Field(
        default=None,
        gt=0,
        le=7 * 24 * 60,
        description="a job past it stops, keeps its last checkpoint and ends failed with that reason",
    )


class Artifacts(_Section):
    output_uri: str | None = Field(default=None, max_length=1100, description="s3:// prefix inside the caller's prefix")
    log_uri: str | None = Field(default=None, max_length=1100, description="s3:// prefix inside the caller's prefix")


class Callbacks(_Section):
    webhook_url: str | None = Field(default=None, max_length=2048)
    auth_header: SecretStr | None = Field(
        default=None,
        max_length=8192,
        description="sent verbatim as Authorization; accepted on input only: stored encrypted "
        "(`auth_header_sealed`), never logged or returned",
    )
    auth_header_sealed: str | None = Field(default=None, max_length=32768, description="the encrypted auth_header")
    signing_secret_ref: str | None = Field(
        default=None,
        max_length=128,
        description="name of the events handler's environment variable holding the HMAC signing secret",
    )
    allow_private: bool = Field(
        default=False, description="allow a webhook on a private/loopback address (development)"
    )

    @field_validator("auth_header")
    @classmethod
    def _header_value(cls, value: SecretStr | None) -> SecretStr | None:
        # A masked dump ('**********') or a value with CR/LF would be sent as a broken header.
        if value is not None:
            check_auth_header(value.get_secret_value())
        return value

    @field_validator("signing_secret_ref")
    @classmethod
    def _secret_ref(cls, value: str | None) -> str | None:
        return None if value is None else check_signing_secret_ref(value)

    @model_validator(mode="after")
    def _webhook_target(self) -> Callbacks:
        if self.webhook_url is not None:
            try:
                check_webhook_url(self.webhook_url, self.allow_private)
            except InvalidWebhookUrl as exc:
                raise ValueError(str(exc)) from None
        return self


class Preference(_Section):
    """Hyper-parameters of a preference job (`objective` dpo or kto). Every field is optional:
    an unset one takes its `PREFERENCE_DEFAULTS` value. The LoRA shape, epochs, batch size,
    max_seq_length, seed and precision are the job's usual settings."""

    beta: float | None = Field(
        default=None,
        gt=0,
        le=10,
        description="how far the new adapter may move from the reference (the avatar's current adapter): "
        "higher stays closer; default 0.1",
    )
    learning_rate: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="null: the job's own learning_rate (tuning.learning_rate) if it sets one, else 5e-5; "
        "the avatar's stored (supervised) rate is not used",
    )
    loss_type: DpoLoss | None = Field(default=None, description="dpo: sigmoid (the DPO paper's), ipo or hinge")
    desirable_weight: float | None = Field(
        default=None, gt=0, le=100, description="kto: weight of thumbs-up replies; null: balanced with the count"
    )
    undesirable_weight: float | None = Field(
        default=None, gt=0, le=100, description="kto: weight of thumbs-down replies; null: 1"
    )
    precompute_ref_log_probs: bool | None = Field(
        default=None,
        description="compute the reference's log-probabilities once per job (true, the default) rather than "
        "on every step; the result is the same",
    )

    def resolved(self, job_learning_rate: float | None = None) -> Preference:
        """Every field set: this section's values over `PREFERENCE_DEFAULTS` (the weights stay
        null when unset: they depend on the data)."""
        values = PREFERENCE_DEFAULTS.model_copy(update=self.model_dump(exclude_none=True))
        if self.learning_rate is None and job_learning_rate is not None:
            values = values.model_copy(update={"learning_rate": job_learning_rate})
        return values


# Why these: beta 0.1 is the DPO paper's and TRL's default (the adapter stays near the reference,
# so the avatar keeps its voice); 5e-5 is ten times the alignment handbook's QLoRA DPO rate
# (5e-6 over 60k pairs) because an avatar's feedback is tens to hundreds of items trained for a
# few epochs, which LoRA's low-rank update tolerates; the sigmoid loss is the DPO paper's; the
# reference's log-probabilities are computed once (BENCHMARKS.md: same result, less work per step).
PREFERENCE_DEFAULTS = Preference(beta=0.1, learning_rate=5e-5, loss_type="sigmoid", precompute_ref_log_probs=True)


class Integrations(_Section):
    report_to: list[ReportTo] = Field(default_factory=list)


class JobSpec(_Section):
    """The non-hyper-parameter part of a train request, plus the structured hyper-parameter
    sections (folded into `config` by `settings_overrides`)."""

    base_model: BaseModelSpec | None = None
    method: Method | None = None
    precision: Precision | None = None
    qlora: QLoRAOptions | None = None
    target_modules: list[str] | None = Field(default=None, min_length=1, max_length=64)
    trainable_layers: list[LayerIndex] | None = Field(default=None, min_length=1, max_length=1024)
    datasets: list[DatasetSource] = Field(default_factory=list, max_length=64)
    use_flagged_documents: bool = Field(
        default=True,
        description="false: train on `datasets` alone, leaving out the avatar's documents flagged for training",
    )
    tuning: Tuning | None = None
    resources: Resources | None = None
    artifacts: Artifacts | None = None
    callbacks: Callbacks | None = None
    integrations: Integrations | None = None
    warm_start: bool = False
    promote: Promote = Field(
        default="always",
        description="if_better: keep the current adapter when eval loss got worse (preference jobs: unless "
        "the new adapter ranks most held-out feedback better than the current one, preference accuracy > 0.5)",
    )
    objective: Objective = Field(
        default="sft",
        description="sft: learn from the avatar's demonstrations; dpo: from its preference pairs (chosen vs "
        "rejected); kto: from its rated replies (and each half of a pair). dpo and kto continue the avatar's "
        "current adapter, which is also their reference",
    )
    preference: Preference | None = Field(default=None, description="dpo/kto hyper-parameters")

    def objective_problem(self) -> tuple[str, str] | None:
        """(field, why) when `objective` and `preference` do not go together, else None: the API
        answers 422 naming the field, the trainer fails such a queued job with the same words."""
        options = self.preference
        if options is None:
            return None
        if self.objective == "sft":
            return "preference", "applies to objective dpo or kto, not sft"
        if self.objective == "dpo":
            for name in ("desirable_weight", "undesirable_weight"):
                if getattr(options, name) is not None:
                    return f"preference.{name}", "applies to objective kto (rated replies), not dpo"
        if self.objective == "kto" and options.loss_type is not None:
            return "preference.loss_type", "applies to objective dpo; kto has its own loss"
        return None

    def settings_overrides(self) -> AdapterSettings:
        """The hyper-parameters this spec sets, as `AdapterSettings` (unset fields None)."""
        values: dict[str, object] = {}
        if self.tuning:
            values.update(self.tuning.model_dump(exclude_none=True))
        if self.qlora:
            values.update(self.qlora.model_dump(exclude_none=True))
        if self.resources and self.resources.gpus is not None:
            values["gpus"] = self.resources.gpus
        for name in ("method", "precision", "target_modules", "trainable_layers"):
            if getattr(self, name) is not None:
                values[name] = getattr(self, name)
        return AdapterSettings.model_validate(values)
