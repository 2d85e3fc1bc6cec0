"""Webhook delivery for the events Lambda: a job's final event (`job.succeeded`, `job.failed`,
`job.cancelled`) is POSTed to the job's `spec.callbacks.webhook_url` (wire format:
`contracts.webhooks`). `job.started` is not delivered: receivers are told when a job is done.

One delivery:
1. load the job record (`users/{u}/avatars/{a}/adapters/jobs/{job_id}.json`) from S3_BUCKET;
   no record or no webhook_url: nothing to do;
2. open the sealed auth_header (contracts.sealing, the sealer CALLBACK_SEALER names) and pick
   the signing secret (the env var `signing_secret_ref` names, default WEBHOOK_SIGNING_SECRET;
   the default unset = unsigned);
3. resolve the host and refuse any non-public address (SSRF) unless the job set
   `allow_private` AND this function has WEBHOOK_ALLOW_PRIVATE=true; the connection goes to the
   address that was checked (no second lookup, so no DNS rebinding), with the URL's Host
   (and TLS server name); redirects are not followed;
4. POST, up to WEBHOOK_ATTEMPTS times with exponential backoff (WEBHOOK_BACKOFF_SECONDS * 2^n)
   on connection errors, timeouts, 429 and 5xx.

One deadline covers a whole delivery (every attempt's DNS lookup, connect, request, response
headers and body, and the backoff between them): WEBHOOK_TIMEOUT_SECONDS, shortened so the
invocation never runs out of time (the handler hands each record its share of what the Lambda
has left). A per-socket timeout alone would let a receiver that drips a byte at a time hold a
delivery for ever, time the whole batch out, and push other users' events towards the DLQ; with
the deadline only the slow receiver's own record fails (and is retried).

Who is at fault decides what happens on failure: the receiver or the job (refused address, a 4xx
other than 429, a redirect) -> logged and dropped, retrying cannot help; this side (S3, KMS, a
named signing secret missing, a receiver still failing after the retries) -> raised, so the
record is reported as a batch item failure, redelivered by SQS and dead-lettered after the
queue's maxReceiveCount.

The Authorization value is never logged; log lines name the host, never the full URL (a path
or query may carry a token). Standard library only; boto3 (in the Lambda runtime) is imported
on first use.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from contracts.conditional import is_not_found
from contracts.jobs import JobRecord
from contracts.keys import job_key
from contracts.messages import JobEvent
from contracts.sealing import Sealer, SealError, job_context, sealer_from_env
from contracts.webhooks import (
    DEFAULT_SIGNING_SECRET_ENV,
    EVENT_ID_HEADER,
    EVENT_TYPE_HEADER,
    SIGNATURE_HEADER,
    InvalidWebhookUrl,
    check_webhook_url,
    is_public_address,
    literal_ip,
    signature_header,
)

log = logging.getLogger("avatune.events.webhooks")
log.setLevel(logging.INFO)

FINAL_EVENTS = frozenset({"job.succeeded", "job.failed", "job.cancelled"})
USER_AGENT = "avatune-webhooks/1"
MAX_RESPONSE_BYTES = 64 * 1024

Resolver = Callable[[str, int], list[str]]


class WebhookRefused(Exception):
    """The delivery must not or cannot be made (refused address, receiver said no): dropped."""


class WebhookConfigError(Exception):
    """This function lacks what the job asks for (a named signing secret): retried, then DLQ."""


class DeliveryFailed(Exception):
    """The receiver still failed after the in-process retries: the record is retried by SQS."""


@dataclass(frozen=True)
class WebhookSettings:
    """The events function's webhook configuration (environment variables)."""

    bucket: str | None
    attempts: int = 3
    backoff_seconds: float = 0.2
    timeout_seconds: float = 10.0
    allow_private: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WebhookSettings:
        env = os.environ if environ is None else environ
        return cls(
            bucket=env.get("S3_BUCKET") or None,
            attempts=max(1, int(env.get("WEBHOOK_ATTEMPTS") or 3)),
            backoff_seconds=max(0.0, float(env.get("WEBHOOK_BACKOFF_SECONDS") or 0.2)),
            timeout_seconds=max(0.1, float(env.get("WEBHOOK_TIMEOUT_SECONDS") or 10)),
            allow_private=(env.get("WEBHOOK_ALLOW_PRIVATE") or "").strip().lower() in ("1", "true", "yes", "on"),
        )


# -- where to connect ------------------------------------------------------------------------


class Deadline:
    """A point in time a delivery must be done by (monotonic clock)."""

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self._end - time.monotonic())

    def run(self, what: str, call: Callable[[], Any], on_timeout: Callable[[], None] | None = None) -> Any:
        """`call()` in a helper thread, given up (`on_timeout()` to unblock it, DeadlineExceeded)
        once the deadline passes: a blocking DNS lookup or a dripping socket cannot outlast it."""
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["value"] = call()
            except BaseException as exc:  # re-raised in the caller's thread
                outcome["error"] = exc

        thread = threading.Thread(target=work, daemon=True, name=f"webhook-{what}")
        thread.start()
        thread.join(self.remaining())
        if thread.is_alive():
            if on_timeout is not None:
                on_timeout()
            raise DeadlineExceeded(f"{what} did not finish before the delivery's deadline")
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")


class DeadlineExceeded(TimeoutError):
    """A delivery ran out of its time: retried by SQS like any failed delivery."""


def resolve(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to (all of them, in the resolver's order)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class Target:
    """A checked webhook URL and the address to connect to."""

    scheme: str
    host: str
    port: int
    path: str
    address: str


def checked_target(
    url: str, allow_private: bool, resolver: Resolver = resolve, deadline: Deadline | None = None
) -> Target:
    """Resolve `url`'s host and check every address it resolves to; WebhookRefused when the
    URL or any address is not allowed (a name with one private answer among public ones is
    refused: the answer to connect with could be either)."""
    try:
        check_webhook_url(url, allow_private)
    except InvalidWebhookUrl as exc:
        raise WebhookRefused(str(exc)) from None
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    literal = literal_ip(host)
    try:
        if literal is not None:
            addresses = [str(literal)]
        elif deadline is not None:
            addresses = deadline.run("DNS lookup", lambda: resolver(host, port))
        else:
            addresses = resolver(host, port)
    except DeadlineExceeded as exc:  # a slow resolver: retried, like a receiver that is down
        raise DeliveryFailed(f"webhook host {host!r}: {exc}") from None
    except OSError as exc:
        raise WebhookRefused(f"webhook host {host!r} does not resolve ({exc.__class__.__name__})") from None
    if not addresses:
        raise WebhookRefused(f"webhook host {host!r} does not resolve")
    for address in addresses:
        ip = literal_ip(address.split("%", 1)[0])
        if ip is None or (not allow_private and not is_public_address(ip)):
            raise WebhookRefused(f"webhook host {host!r} resolves to a non-public address ({address})")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(parts.scheme, host, port, path, addresses[0])


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to a fixed address; the Host header stays the URL's."""

    def __init__(self, target: Target, timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self._address = target.address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a fixed address; SNI and certificate checks use the URL's host."""

    def __init__(self, target: Target, timeout: float, context: ssl.SSLContext | None = None) -> None:
        super().__init__(target.host, target.port, timeout=timeout, context=context or ssl.create_default_context())
        self._address = target.address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def post(target: Target, body: bytes, headers: Mapping[str, str], deadline: Deadline) -> int:
    """POST `body` to the pinned target before `deadline`; the response status.
    OSError/HTTPException on connection trouble, DeadlineExceeded when time runs out."""
    cls = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
    conn = cls(target, max(deadline.remaining(), 0.001))

    def exchange() -> int:
        conn.request("POST", target.path, body=body, headers=dict(headers))
        response = conn.getresponse()
        response.read(MAX_RESPONSE_BYTES)
        return response.status

    def hang_up() -> None:  # wakes a recv blocked on a dripping receiver
        sock = conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    try:
        return deadline.run("POST", exchange, hang_up)
    finally:
        conn.close()


# -- the delivery ----------------------------------------------------------------------------


class WebhookDeliverer:
    """Delivers job events to their jobs' webhooks (module docstring)."""

    def __init__(
        self,
        settings: WebhookSettings,
        s3: Any = None,
        sealer: Sealer | None = None,
        resolver: Resolver = resolve,
        environ: Mapping[str, str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self._s3 = s3
        self._sealer = sealer
        self._sealer_loaded = sealer is not None
        self._resolver = resolver
        self._environ = os.environ if environ is None else environ
        self._sleep = sleep

    @property
    def s3(self) -> Any:
        if self._s3 is None:
            import boto3  # in the Lambda runtime; imported on the first final event only

            self._s3 = boto3.client("s3", endpoint_url=self._environ.get("AWS_ENDPOINT_URL") or None)
        return self._s3

    def sealer(self) -> Sealer | None:
        if not self._sealer_loaded:
            self._sealer = sealer_from_env(self._environ)
            self._sealer_loaded = True
        return self._sealer

    def load_record(self, event: JobEvent) -> JobRecord | None:
        key = job_key(event.user_id, event.avatar_id, event.job_id)
        try:
            body = self.s3.get_object(Bucket=self.settings.bucket, Key=key)["Body"].read()
        except Exception as exc:
            if is_not_found(exc):
                return None
            raise
        return JobRecord.model_validate_json(body)

    def deliver(self, event: JobEvent, budget: float | None = None) -> str:
        """Deliver one event within WEBHOOK_TIMEOUT_SECONDS (or `budget`, when less is left);
        what happened: "not-final", "off" (no S3_BUCKET), "no-record", "no-webhook", "refused",
        "rejected" or "delivered". Raises to have it retried (DeadlineExceeded included)."""
        seconds = self.settings.timeout_seconds if budget is None else min(self.settings.timeout_seconds, budget)
        deadline = Deadline(seconds)
        if event.event not in FINAL_EVENTS:
            return "not-final"
        if not self.settings.bucket:
            return "off"
        record = self.load_record(event)
        if record is None:
            _log("webhook skipped: job record not found", event)
            return "no-record"
        callbacks = record.spec.callbacks
        if callbacks is None or not callbacks.webhook_url:
            return "no-webhook"

        host = urlsplit(callbacks.webhook_url).hostname or ""
        try:
            target = checked_target(
                callbacks.webhook_url, callbacks.allow_private and self.settings.allow_private, self._resolver, deadline
            )
        except WebhookRefused as exc:
            _log("webhook refused", event, level=logging.WARNING, host=host, reason=str(exc))
            return "refused"
        body = event.to_message_body().encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            EVENT_ID_HEADER: event.event_id,
            EVENT_TYPE_HEADER: event.event,
        }
        if callbacks.auth_header_sealed:
            headers["Authorization"] = self._authorization(callbacks.auth_header_sealed, event)
        secret = self._signing_secret(callbacks.signing_secret_ref)
        return self._post_with_retries(event, target, body, headers, secret, deadline)

    def _authorization(self, sealed: str, event: JobEvent) -> str:
        sealer = self.sealer()
        if sealer is None:
            raise SealError("the job has a sealed auth_header but CALLBACK_SEALER is not configured here")
        return sealer.unseal(sealed, job_context(event.user_id, event.avatar_id, event.job_id))

    def _signing_secret(self, ref: str | None) -> str | None:
        value = self._environ.get(ref or DEFAULT_SIGNING_SECRET_ENV) or None
        if ref and value is None:
            raise WebhookConfigError(f"signing secret {ref} is not set on the events function")
        return value

    def _post_with_retries(
        self,
        event: JobEvent,
        target: Target,
        body: bytes,
        headers: dict[str, str],
        secret: str | None,
        deadline: Deadline,
    ) -> str:
        attempts = self.settings.attempts
        last = ""
        for attempt in range(1, attempts + 1):
            if secret is not None:  # a fresh timestamp per attempt: receivers' replay window
                headers[SIGNATURE_HEADER] = signature_header(secret, body)
            if deadline.remaining() <= 0:
                last = "out of time"
                break
            try:
                status = post(target, body, headers, deadline)
            except (OSError, http.client.HTTPException) as exc:
                status, last = 0, exc.__class__.__name__
            else:
                last = f"HTTP {status}"
                if 200 <= status < 300:
                    _log("webhook delivered", event, host=target.host, status=status, attempt=attempt)
                    return "delivered"
                if status != 429 and status < 500:
                    _log(
                        "webhook rejected by the receiver (not retried)",
                        event,
                        level=logging.WARNING,
                        host=target.host,
                        status=status,
                        attempt=attempt,
                    )
                    return "rejected"
            _log("webhook attempt failed", event, level=logging.WARNING, host=target.host, reason=last, attempt=attempt)
            if attempt < attempts:
                self._sleep(min(self.settings.backoff_seconds * 2 ** (attempt - 1), deadline.remaining()))
        raise DeliveryFailed(f"webhook to {target.host} failed after {attempts} attempts ({last})")


def _log(message: str, event: JobEvent, level: int = logging.INFO, **fields: Any) -> None:
    entry = {
        "message": message,
        "event": event.event,
        "job_id": event.job_id,
        "user_id": event.user_id,
        "avatar_id": event.avatar_id,
        **fields,
    }
    log.log(
        level,
        json.dumps(entry, default=str),
        extra={"job_id": event.job_id, "user_id": event.user_id, "avatar_id": event.avatar_id},
    )


_deliverer: WebhookDeliverer | None = None


def deliver(event: JobEvent, budget: float | None = None) -> str:
    """Deliver with the environment's configuration (one deliverer per Lambda container, so the
    S3/KMS clients are reused across invocations), within `budget` seconds when given."""
    global _deliverer
    if _deliverer is None:
        _deliverer = WebhookDeliverer(WebhookSettings.from_env())
    return _deliverer.deliver(event, budget)


def reset() -> None:
    """Forget the cached deliverer (the environment changed: tests)."""
    global _deliverer
    _deliverer = None
