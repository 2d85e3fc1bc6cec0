"""Sealing a job's webhook `auth_header` at rest: the plaintext is accepted on input only, and
only `callbacks.auth_header_sealed` is written to the job record and the train queue.

Two sealers, picked by `CALLBACK_SEALER`:

- `kms`: AWS KMS Encrypt/Decrypt under `CALLBACK_KMS_KEY_ID`, with the encryption context
  {user_id, avatar_id, job_id}: a sealed header only opens for the job it was sealed for.
- `local`: Fernet (`cryptography`) under `CALLBACK_SEAL_KEY` (comma-separated keys: the first
  seals, all open, for rotation); the context is sealed with the value and checked on opening.
  With `DEV_MODE=true` and no key, the public `DEV_SEAL_KEY` (development only).

Unset `CALLBACK_SEALER`: `kms` when `CALLBACK_KMS_KEY_ID` is set, else `local` when
`CALLBACK_SEAL_KEY` is set or in DEV_MODE, else none (a job with an auth_header is refused).

A sealed value names its sealer (`kms:v1:...`, `local:v1:...`). boto3 and cryptography are
imported only by the sealer that needs them, so contracts stays light.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from typing import Any, Protocol

from contracts.spec import Callbacks, JobSpec

# Public on purpose, like handlers.settings.DEV_JWT_SECRET: used only with DEV_MODE=true and no
# CALLBACK_SEAL_KEY. Anything sealed with it is readable by anyone who reads this file.
DEV_SEAL_KEY = "YXZhdHVuZS1kZXYtc2VhbC1rZXktbm90LWZvci11c2U="  # base64url("avatune-dev-seal-key-not-for-use")

KMS_PREFIX = "kms:v1:"
LOCAL_PREFIX = "local:v1:"


class SealError(Exception):
    """A value could not be sealed or opened (wrong key, wrong job, tampered, misconfigured)."""


class Sealer(Protocol):
    """Seals short secrets bound to a context (the job they belong to)."""

    name: str

    def seal(self, plaintext: str, context: Mapping[str, str]) -> str: ...

    def unseal(self, sealed: str, context: Mapping[str, str]) -> str: ...


def job_context(user_id: str, avatar_id: str, job_id: str) -> dict[str, str]:
    """The encryption context of a job's sealed values."""
    return {"user_id": user_id, "avatar_id": avatar_id, "job_id": job_id}


class KmsSealer:
    """AWS KMS under one key; the context is KMS's encryption context (authenticated)."""

    name = "kms"

    def __init__(
        self, key_id: str, client: Any = None, endpoint_url: str | None = None, region: str | None = None
    ) -> None:
        if not key_id:
            raise SealError("CALLBACK_KMS_KEY_ID is not set")
        self.key_id = key_id
        if client is None:
            import boto3

            client = boto3.client("kms", endpoint_url=endpoint_url, region_name=region)
        self._kms = client

    def seal(self, plaintext: str, context: Mapping[str, str]) -> str:
        out = self._kms.encrypt(KeyId=self.key_id, Plaintext=plaintext.encode(), EncryptionContext=dict(context))
        return KMS_PREFIX + base64.b64encode(out["CiphertextBlob"]).decode()

    def unseal(self, sealed: str, context: Mapping[str, str]) -> str:
        blob = _payload(sealed, KMS_PREFIX, self.name)
        try:
            ciphertext = base64.b64decode(blob, validate=True)
        except ValueError:
            raise SealError("sealed value is not base64") from None
        try:
            out = self._kms.decrypt(CiphertextBlob=ciphertext, EncryptionContext=dict(context), KeyId=self.key_id)
        except Exception as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            if code in ("InvalidCiphertextException", "IncorrectKeyException"):
                raise SealError(f"KMS refused to open the sealed value ({code})") from None
            raise  # throttling, network: transient, the caller retries
        return out["Plaintext"].decode()


class LocalSealer:
    """Fernet (AES-128-CBC + HMAC-SHA256) under local keys; the context travels inside the
    token and must match on opening."""

    name = "local"

    def __init__(self, keys: str) -> None:
        from cryptography.fernet import Fernet, MultiFernet

        try:
            self._fernet = MultiFernet([Fernet(k.strip()) for k in keys.split(",") if k.strip()])
        except (ValueError, TypeError):
            raise SealError(
                "CALLBACK_SEAL_KEY must be Fernet keys (32 url-safe base64 bytes), comma-separated"
            ) from None

    def seal(self, plaintext: str, context: Mapping[str, str]) -> str:
        body = json.dumps({"context": dict(context), "value": plaintext}, sort_keys=True).encode()
        return LOCAL_PREFIX + self._fernet.encrypt(body).decode()

    def unseal(self, sealed: str, context: Mapping[str, str]) -> str:
        from cryptography.fernet import InvalidToken

        token = _payload(sealed, LOCAL_PREFIX, self.name)
        try:
            body = json.loads(self._fernet.decrypt(token.encode()))
        except (InvalidToken, ValueError):
            raise SealError("the sealed value does not open with CALLBACK_SEAL_KEY") from None
        if body.get("context") != dict(context):
            raise SealError("the sealed value belongs to another job")
        return str(body["value"])


def _payload(sealed: str, prefix: str, name: str) -> str:
    if not sealed.startswith(prefix):
        kind = sealed.split(":", 1)[0] if ":" in sealed else "unknown"
        raise SealError(f"the value was sealed by {kind!r}, but this sealer is {name!r} (CALLBACK_SEALER)")
    return sealed[len(prefix) :]


def sealer_from_settings(settings: Any) -> Sealer | None:
    """`sealer_from_env` over a service's settings object (the API's or the worker's): its
    callback_sealer, callback_kms_key_id, callback_seal_key (a SecretStr or None), dev_mode,
    aws_endpoint_url and region."""
    seal_key = settings.callback_seal_key
    env = {
        "CALLBACK_SEALER": settings.callback_sealer or "",
        "CALLBACK_KMS_KEY_ID": settings.callback_kms_key_id or "",
        "CALLBACK_SEAL_KEY": seal_key.get_secret_value() if seal_key else "",
        "DEV_MODE": "true" if settings.dev_mode else "",
    }
    return sealer_from_env(env, endpoint_url=settings.aws_endpoint_url, region=settings.region)


def sealer_from_env(
    environ: Mapping[str, str] | None = None, *, endpoint_url: str | None = None, region: str | None = None
) -> Sealer | None:
    """The sealer the environment configures (module docstring), or None when there is none.
    Raises SealError on a contradictory configuration."""
    env = os.environ if environ is None else environ
    kind = (env.get("CALLBACK_SEALER") or "").strip().lower()
    key_id = env.get("CALLBACK_KMS_KEY_ID") or ""
    local_key = env.get("CALLBACK_SEAL_KEY") or ""
    dev = (env.get("DEV_MODE") or "").strip().lower() in ("1", "true", "yes", "on")
    if not kind:
        kind = "kms" if key_id else "local" if local_key or dev else ""
    if kind == "kms":
        return KmsSealer(
            key_id,
            endpoint_url=endpoint_url or env.get("AWS_ENDPOINT_URL") or None,
            region=region or env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or None,
        )
    if kind == "local":
        if not local_key and not dev:
            raise SealError("CALLBACK_SEALER=local needs CALLBACK_SEAL_KEY (or DEV_MODE=true for the dev key)")
        return LocalSealer(local_key or DEV_SEAL_KEY)
    if kind:
        raise SealError(f"CALLBACK_SEALER must be kms or local, not {kind!r}")
    return None


class SealingUnavailable(SealError):
    """A job gave an auth_header but no sealer is configured: it cannot be kept."""


def seal_callbacks(spec: JobSpec, sealer: Sealer | None, context: Mapping[str, str]) -> JobSpec:
    """`spec` with `callbacks.auth_header` replaced by `auth_header_sealed` (the plaintext
    dropped). A spec without a plaintext header comes back unchanged; one that has one with no
    sealer raises SealingUnavailable."""
    callbacks = spec.callbacks
    if callbacks is None or callbacks.auth_header is None:
        return spec
    if sealer is None:
        raise SealingUnavailable(
            "callbacks.auth_header cannot be stored: this deployment has no CALLBACK_SEALER (KMS key or local key)"
        )
    sealed = sealer.seal(callbacks.auth_header.get_secret_value(), context)
    new_callbacks = Callbacks.model_validate(
        {
            **{name: getattr(callbacks, name) for name in Callbacks.model_fields},
            "auth_header": None,
            "auth_header_sealed": sealed,
        }
    )
    return spec.model_copy(update={"callbacks": new_callbacks})
