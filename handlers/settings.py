"""API configuration from environment variables (documented in README)."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, PrivateAttr, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts.sealing import Sealer, sealer_from_settings
from contracts.serving import ServingSettings

# Used only when DEV_MODE is on and no AUTH_JWT_SECRET is set; never valid in production
# because the API refuses to start without a secret outside dev mode.
DEV_JWT_SECRET = "avatune-dev-secret-not-for-production"


class Settings(BaseSettings, ServingSettings):
    """SERVING_TARGETS and SERVING_MAX_LORA_RANK come from `ServingSettings` (shared with the trainer)."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    s3_bucket: str = Field(default="avatune-dev", alias="S3_BUCKET")
    aws_endpoint_url: str | None = Field(default=None, alias="AWS_ENDPOINT_URL")
    aws_region: str = Field(
        default="us-east-1",
        validation_alias="AWS_REGION",
    )
    aws_default_region: str | None = Field(default=None, alias="AWS_DEFAULT_REGION")
    train_queue_name: str = Field(default="avatune-train.fifo", alias="TRAIN_QUEUE_NAME")
    events_queue_name: str = Field(default="avatune-events", alias="EVENTS_QUEUE_NAME")

    auth_mode: Literal["jwt", "apigateway"] = Field(default="jwt", alias="AUTH_MODE")
    auth_jwt_secret: SecretStr | None = Field(default=None, alias="AUTH_JWT_SECRET")
    dev_mode: bool = Field(default=False, alias="DEV_MODE")

    max_upload_bytes: int = Field(default=5 * 1024 * 1024, alias="MAX_UPLOAD_BYTES", gt=0)
    presign_expires_seconds: int = Field(default=900, alias="PRESIGN_EXPIRES_SECONDS", ge=60, le=604800)
    s3_max_concurrency: int = Field(default=64, alias="S3_MAX_CONCURRENCY", ge=1, le=512)
    max_active_jobs_per_user: int = Field(default=4, alias="MAX_ACTIVE_JOBS_PER_USER", ge=1)
    # How long an Idempotency-Key answers the job it created; after that it may create a new one.
    idempotency_key_ttl_hours: int = Field(default=24, alias="IDEMPOTENCY_KEY_TTL_HOURS", ge=1, le=24 * 30)
    # A train job asking for more GPUs (resources.gpus / gpus) is refused with a 422 before queueing.
    max_gpus_per_job: int = Field(default=8, alias="MAX_GPUS_PER_JOB", ge=1, le=64)
    # s3:// prefixes (comma-separated) a job's base_model.name may point at besides the caller's
    # own prefix; the same variable as the trainer's, so both sides refuse the same bases.
    base_model_s3_allowed_prefixes: str = Field(default="", alias="BASE_MODEL_S3_ALLOWED_PREFIXES")
    # A successful PUT/DELETE of a context document also queues an index job (best effort).
    auto_index: bool = Field(default=False, alias="AUTO_INDEX")
    # Sealing a job's callbacks.auth_header (contracts.sealing): kms | local; unset = inferred.
    callback_sealer: Literal["kms", "local"] | None = Field(default=None, alias="CALLBACK_SEALER")
    callback_kms_key_id: str | None = Field(default=None, alias="CALLBACK_KMS_KEY_ID")
    callback_seal_key: SecretStr | None = Field(default=None, alias="CALLBACK_SEAL_KEY")
    _sealer_cache: list[Sealer | None] = PrivateAttr(default_factory=list)

    def base_model_prefixes(self) -> list[str]:
        return [p.strip() for p in self.base_model_s3_allowed_prefixes.split(",") if p.strip()]

    @property
    def region(self) -> str:
        return self.aws_default_region or self.aws_region

    def jwt_secret(self) -> str | None:
        """The HS256 secret: the configured one, the dev one in dev mode, else None."""
        if self.auth_jwt_secret is not None and self.auth_jwt_secret.get_secret_value():
            return self.auth_jwt_secret.get_secret_value()
        return DEV_JWT_SECRET if self.dev_mode else None

    def sealer(self) -> Sealer | None:
        """The sealer for callbacks.auth_header (None: none configured); built once."""
        if not self._sealer_cache:
            self._sealer_cache.append(sealer_from_settings(self))
        return self._sealer_cache[0]

    def check_startable(self) -> None:
        """Refuse to serve with no way to verify tokens (outside dev mode)."""
        if self.auth_mode == "jwt" and self.jwt_secret() is None:
            raise RuntimeError(
                "AUTH_JWT_SECRET is not set: refusing to start. Set it, set AUTH_MODE=apigateway "
                "behind an API Gateway JWT authorizer, or DEV_MODE=true for local development."
            )


@lru_cache
def get_settings() -> Settings:
    return Settings()
