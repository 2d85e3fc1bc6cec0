"""The webhook contract shared by the API (input checks), the events handler (delivery) and
receivers (verification): which URLs are acceptable, how a delivery is signed, its event id.

A delivery is an HTTP POST of the job event's JSON (`JobEvent.to_message_body()`) with

    Content-Type: application/json
    Avatune-Event-Id: {job_id}:{event}            (stable per event: dedupe on it)
    Avatune-Event: job.succeeded | job.failed | job.cancelled
    Avatune-Signature: t={unix seconds},v1={hex HMAC-SHA256(secret, f"{t}.{body}")}
    Authorization: {the job's callbacks.auth_header, verbatim}   (when the job set one)

A receiver verifies with `verify_signature(secret, header, body)`: it recomputes the HMAC over
the raw body and refuses a timestamp older than its tolerance (replays).

Pure standard library: imported by the light events function.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time
from urllib.parse import urlsplit

SIGNATURE_HEADER = "Avatune-Signature"
EVENT_ID_HEADER = "Avatune-Event-Id"
EVENT_TYPE_HEADER = "Avatune-Event"
# signing_secret_ref must name one of these variables, so a job cannot make the events handler
# key its HMAC with an unrelated secret of its environment (AWS keys, ...).
SIGNING_SECRET_ENV_PREFIX = "WEBHOOK_SIGNING_SECRET"
DEFAULT_SIGNING_SECRET_ENV = SIGNING_SECRET_ENV_PREFIX
DEFAULT_TOLERANCE_SECONDS = 300
# What pydantic prints for a SecretStr: a value equal to it is a masked dump, never a header.
MASKED_SECRET = "**********"
# What `make dev` signs local deliveries with and `avatune webhooks listen` checks by default;
# public, so never a secret anywhere but a development machine.
DEV_SIGNING_SECRET = "avatune-dev-webhook-secret"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class InvalidWebhookUrl(ValueError):
    """A webhook URL the platform will not call; the text says why."""


def is_public_address(ip: IPAddress) -> bool:
    """True for a globally routable unicast address. Private, loopback, link-local, multicast,
    reserved, unspecified and shared (CGNAT) addresses are not, nor IPv6 addresses that embed
    one of those (IPv4-mapped `::ffff:a.b.c.d`, 6to4 `2002::/16`, NAT64 `64:ff9b::/96`)."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in ipaddress.IPv6Network("64:ff9b::/96"):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and not is_public_address(embedded):
            return False
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


def literal_ip(host: str) -> IPAddress | None:
    """The address a URL host spells literally (`10.0.0.1`, `[::1]`), else None (a name)."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def check_webhook_url(url: str, allow_private: bool = False) -> str:
    """`url` if it is an acceptable webhook target, else InvalidWebhookUrl saying why: http or
    https with a host, no credentials in the URL (they would be logged: use auth_header), and
    no literal non-public IP unless `allow_private`. Names are resolved and checked again at
    delivery (handlers/webhooks.py), where DNS answers are known."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidWebhookUrl(f"webhook_url is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidWebhookUrl("webhook_url must be an http:// or https:// URL")
    if not parts.hostname:
        raise InvalidWebhookUrl("webhook_url has no host")
    if parts.username is not None or parts.password is not None:
        raise InvalidWebhookUrl("webhook_url must not carry credentials; send them in callbacks.auth_header")
    if port == 0:
        raise InvalidWebhookUrl("webhook_url has an invalid port")
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        raise InvalidWebhookUrl("webhook_url must not contain whitespace or control characters")
    ip = literal_ip(parts.hostname)
    if ip is not None and not allow_private and not is_public_address(ip):
        raise InvalidWebhookUrl(
            f"webhook_url points at a non-public address ({ip}); set callbacks.allow_private for development"
        )
    return url


def check_auth_header(value: str) -> str:
    """`value` if it can be sent as an Authorization header verbatim, else ValueError."""
    if value == MASKED_SECRET:
        raise ValueError("auth_header is a masked secret ('**********'), not a header: send the real value")
    if not value.strip():
        raise ValueError("auth_header is empty")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value if c != "\t"):
        raise ValueError("auth_header must not contain control characters (CR, LF, ...)")
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError("auth_header must be ISO-8859-1 text (an HTTP header value)") from None
    return value


def check_signing_secret_ref(name: str) -> str:
    """`name` if it names a signing-secret variable (WEBHOOK_SIGNING_SECRET or
    WEBHOOK_SIGNING_SECRET_*), else ValueError."""
    if not (name == SIGNING_SECRET_ENV_PREFIX or name.startswith(SIGNING_SECRET_ENV_PREFIX + "_")) or not all(
        c.isascii() and (c.isalnum() or c == "_") for c in name
    ):
        raise ValueError(
            f"signing_secret_ref must name an environment variable {SIGNING_SECRET_ENV_PREFIX} or "
            f"{SIGNING_SECRET_ENV_PREFIX}_* of the events handler (letters, digits, _)"
        )
    return name


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of `{timestamp}.{body}` under `secret`."""
    message = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signature_header(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The `Avatune-Signature` value for `body`: `t=<unix>,v1=<hex>`."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={signature(secret, t, body)}"


def verify_signature(
    secret: str, header: str, body: bytes, tolerance_seconds: int = DEFAULT_TOLERANCE_SECONDS, now: float | None = None
) -> bool:
    """True when `header` (an `Avatune-Signature` value) signs `body` under `secret` and its
    timestamp is within `tolerance_seconds` of now (older ones are replays)."""
    fields: dict[str, list[str]] = {}
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        fields.setdefault(key, []).append(value)
    try:
        t = int(fields["t"][0])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - t) > tolerance_seconds:
        return False
    expected = signature(secret, t, body)
    return any(hmac.compare_digest(expected, v) for v in fields.get("v1", []))
