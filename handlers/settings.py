"""API configuration from environment variables (documented in README)."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

# Used only when DEV_MODE is on and no AUTH_JWT_SECRET is set; never valid in production
# because the API refuses to start without a secret outside dev mode.
DEV_JWT_SECRET = "avatune-dev-secret-not-for-production"


class Settings(BaseSettings):
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

    @property
    def region(self) -> str:
        return self.aws_default_region or self.aws_region

    def jwt_secret(self) -> str | None:
        """The HS256 secret: the configured one, the dev one in dev mode, else None."""
        if self.auth_jwt_secret is not None and self.auth_jwt_secret.get_secret_value():
            return self.auth_jwt_secret.get_secret_value()
        return DEV_JWT_SECRET if self.dev_mode else None

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
