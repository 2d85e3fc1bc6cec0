"""Trainer configuration from environment variables (documented in README)."""

from __future__ import annotations

import os
import socket
from functools import lru_cache

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts.adapter import DOCUMENTED_DEFAULTS, AdapterSettings, Method


class TrainerSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    s3_bucket: str = Field(default="avatune-dev", alias="S3_BUCKET")
    aws_endpoint_url: str | None = Field(default=None, alias="AWS_ENDPOINT_URL")
    region: str = Field(default="us-east-1", validation_alias=AliasChoices("AWS_DEFAULT_REGION", "AWS_REGION"))
    train_queue_name: str = Field(default="avatune-train.fifo", alias="TRAIN_QUEUE_NAME")
    events_queue_name: str = Field(default="avatune-events", alias="EVENTS_QUEUE_NAME")

    base_model: str = Field(default="meta-llama/Llama-3.2-1B-Instruct", alias="BASE_MODEL")
    hf_token: SecretStr | None = Field(default=None, alias="HF_TOKEN")
    model_cache_dir: str | None = Field(default=None, alias="MODEL_CACHE_DIR")
    scratch_dir: str | None = Field(default=None, alias="SCRATCH_DIR")
    adapter_keep_versions: int = Field(default=5, alias="ADAPTER_KEEP_VERSIONS", ge=1)

    worker_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}", alias="WORKER_ID")
    # SQS: each heartbeat pushes the message's visibility this far ahead.
    visibility_timeout_seconds: int = Field(default=120, alias="VISIBILITY_TIMEOUT_SECONDS", ge=2, le=43200)
    heartbeat_seconds: float = Field(default=20, alias="HEARTBEAT_SECONDS", gt=0)
    # How long a job stays owned by a worker whose heartbeat stopped.
    lease_seconds: float = Field(default=90, alias="LEASE_SECONDS", gt=0)
    progress_interval_seconds: float = Field(default=5, alias="PROGRESS_INTERVAL_SECONDS", gt=0)
    checkpoint_every_steps: int = Field(default=0, alias="CHECKPOINT_EVERY_STEPS", ge=0)
    # Bounds the work a preempted or killed worker can lose.
    checkpoint_interval_seconds: float = Field(default=600, alias="CHECKPOINT_INTERVAL_SECONDS", gt=0)
    max_attempts: int = Field(default=3, alias="MAX_JOB_ATTEMPTS", ge=1)
    download_concurrency: int = Field(default=16, alias="DOWNLOAD_CONCURRENCY", ge=1, le=256)
    eval_fraction: float = Field(default=0.1, alias="EVAL_FRACTION", ge=0, lt=1)
    metrics_port: int = Field(default=9100, alias="METRICS_PORT", ge=0, le=65535)
    torch_threads: int | None = Field(default=None, alias="TORCH_THREADS", ge=1)

    default_method: Method = Field(default=DOCUMENTED_DEFAULTS.method, alias="DEFAULT_METHOD")  # type: ignore[assignment]
    default_r: int = Field(default=DOCUMENTED_DEFAULTS.r, alias="DEFAULT_R")  # type: ignore[assignment]
    default_lora_alpha: float = Field(default=DOCUMENTED_DEFAULTS.lora_alpha, alias="DEFAULT_LORA_ALPHA")  # type: ignore[assignment]
    default_lora_dropout: float = Field(default=DOCUMENTED_DEFAULTS.lora_dropout, alias="DEFAULT_LORA_DROPOUT")  # type: ignore[assignment]
    default_learning_rate: float = Field(default=DOCUMENTED_DEFAULTS.learning_rate, alias="DEFAULT_LEARNING_RATE")  # type: ignore[assignment]
    default_num_epochs: float = Field(default=DOCUMENTED_DEFAULTS.num_epochs, alias="DEFAULT_NUM_EPOCHS")  # type: ignore[assignment]
    default_batch_size: int = Field(default=DOCUMENTED_DEFAULTS.batch_size, alias="DEFAULT_BATCH_SIZE")  # type: ignore[assignment]
    default_max_seq_length: int = Field(default=DOCUMENTED_DEFAULTS.max_seq_length, alias="DEFAULT_MAX_SEQ_LENGTH")  # type: ignore[assignment]
    default_warmup_ratio: float = Field(default=DOCUMENTED_DEFAULTS.warmup_ratio, alias="DEFAULT_WARMUP_RATIO")  # type: ignore[assignment]
    default_seed: int = Field(default=DOCUMENTED_DEFAULTS.seed, alias="DEFAULT_SEED")  # type: ignore[assignment]

    def default_adapter_settings(self) -> AdapterSettings:
        """The worker's defaults for every field a job and its avatar leave unset."""
        return AdapterSettings(
            method=self.default_method,
            r=self.default_r,
            lora_alpha=self.default_lora_alpha,
            lora_dropout=self.default_lora_dropout,
            target_modules=None,
            learning_rate=self.default_learning_rate,
            num_epochs=self.default_num_epochs,
            batch_size=self.default_batch_size,
            max_seq_length=self.default_max_seq_length,
            warmup_ratio=self.default_warmup_ratio,
            seed=self.default_seed,
            gpus=1,
        )


@lru_cache
def get_settings() -> TrainerSettings:
    return TrainerSettings()
