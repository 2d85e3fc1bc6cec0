"""API configuration from environment variables (documented in docs/configuration.md)."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, PrivateAttr, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts.sealing import Sealer, sealer_from_settings
from contracts.serving import ServingSettings

# Used only when DEV_MODE is on and no AUTH_JWT_SECRET is set; never valid in production
# because the API refuses to start without a secret outside dev mode.
# HS256 secrets shorter than this are refused outside DEV_MODE (RFC 7518 asks for at least the
# hash's size, 256 bits).
MIN_JWT_SECRET_BYTES = 32
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
    # When set, a token must carry this `aud` / `iss` (JWT mode; API Gateway checks its own).
    auth_jwt_audience: str | None = Field(default=None, alias="AUTH_JWT_AUDIENCE")
    auth_jwt_issuer: str | None = Field(default=None, alias="AUTH_JWT_ISSUER")
    dev_mode: bool = Field(default=False, alias="DEV_MODE")

    max_upload_bytes: int = Field(default=5 * 1024 * 1024, alias="MAX_UPLOAD_BYTES", gt=0)
    # Refused before any route sees them (handlers.limits): 431 / 413.
    max_header_bytes: int = Field(default=16 * 1024, alias="MAX_HEADER_BYTES", ge=1024)
    max_json_body_bytes: int = Field(default=6 * 1024 * 1024, alias="MAX_JSON_BODY_BYTES", ge=1024)
    presign_expires_seconds: int = Field(default=900, alias="PRESIGN_EXPIRES_SECONDS", ge=60, le=604800)
    # Presigned uploads (documents too big for a request): the size the client declares is
    # signed into the URL as Content-Length, so S3 refuses any other; this caps what it may declare.
    # Keep it <= the trainer's MAX_DOCUMENT_BYTES.
    max_presigned_upload_bytes: int = Field(default=64 * 1024 * 1024, alias="MAX_PRESIGNED_UPLOAD_BYTES", gt=0)
    s3_max_concurrency: int = Field(default=64, alias="S3_MAX_CONCURRENCY", ge=1, le=512)
    max_active_jobs_per_user: int = Field(default=4, alias="MAX_ACTIVE_JOBS_PER_USER", ge=1)
    # The trainer's MAX_JOB_ATTEMPTS (one variable for both): a job whose worker vanished is
    # queued again by the API until that many failed attempts, then failed.
    max_job_attempts: int = Field(default=3, alias="MAX_JOB_ATTEMPTS", ge=1)
    # A running job whose lease expired this long ago has no worker (its message did not bring
    # one back): the API queues it again or fails it, so it never keeps the avatar locked.
    stale_lease_seconds: int = Field(default=900, alias="STALE_LEASE_SECONDS", ge=1)
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
    # /openai/v1 fine-tuning jobs: `model` names -> the base model to train (a Hugging Face id or
    # s3:// prefix; "" = the trainer's BASE_MODEL), as JSON: {"gpt-4o-mini-2024-07-18": "..."}.
    openai_model_aliases: dict[str, str] = Field(default_factory=dict, alias="OPENAI_MODEL_ALIASES")
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
        """Refuse to serve with no way to verify tokens, or a secret too short to resist a
        brute force of HS256 (outside dev mode)."""
        if self.auth_mode != "jwt":
            return
        secret = self.jwt_secret()
        if secret is None:
            raise RuntimeError(
                "AUTH_JWT_SECRET is not set: refusing to start. Set it, set AUTH_MODE=apigateway "
                "behind an API Gateway JWT authorizer, or DEV_MODE=true for local development."
            )
        if len(secret.encode()) < MIN_JWT_SECRET_BYTES and not self.dev_mode:
            raise RuntimeError(
                f"AUTH_JWT_SECRET is shorter than {MIN_JWT_SECRET_BYTES} bytes: refusing to start "
                "(generate one with: python -c 'import secrets; print(secrets.token_urlsafe(48))')"
            )


@lru_cache
def get_settings() -> Settings:
    return Settings()
