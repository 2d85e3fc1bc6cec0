"""A small typed client for the avatune HTTP API: one method per route.

Every failure surfaces as one of two exceptions:

- `ApiError(status, detail)`: the API (or the storage behind a presigned URL) answered an
  error; `detail` comes from the `application/problem+json` body when there is one.
- `ApiUnreachable(url)`: no answer at all (connection refused, DNS, timeout).

Presigned URLs (large uploads, adapter files) are fetched with a second client that sends no
`Authorization` header: S3 refuses a request that carries two kinds of authentication.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Literal
from urllib.parse import quote, urlsplit

import httpx

__all__ = ["ApiError", "ApiUnreachable", "AvatuneClient", "token_subject"]

Json = dict[str, Any]
ArchiveSelection = Literal["true", "false", "all"]

DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
CHUNK = 1024 * 1024


class ApiError(Exception):
    """An error answer: its status and the problem document's `detail`."""

    def __init__(self, status: int, detail: str, problem: Json | None = None) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail
        self.problem: Json = problem or {}

    @property
    def is_missing_route(self) -> bool:
        """The server has no such route at all (as opposed to a 404 about a missing resource)."""
        if self.status == 405:
            return True
        if self.status != 404:
            return False
        # The avatune API answers unknown routes with "no route matches ..."; anything in front
        # of it (API Gateway, a proxy) answers without a problem document.
        return not self.problem or self.detail.startswith("no route matches")

    @classmethod
    def from_response(cls, response: httpx.Response) -> ApiError:
        problem: Json | None = None
        detail = ""
        try:
            body = response.json()
        except (ValueError, UnicodeDecodeError):
            body = None
        if isinstance(body, dict) and ("detail" in body or "title" in body):
            problem = body
            detail = str(body.get("detail") or body.get("title") or "")
        elif isinstance(body, dict) and isinstance(body.get("message"), str):  # API Gateway style
            detail = body["message"]
        else:
            text = (
                response.text.strip()
                if response.headers.get("content-type", "").startswith(("text/", "application/xml"))
                else ""
            )
            detail = _s3_error_message(text) or text[:300]
        return cls(response.status_code, detail or response.reason_phrase or "error", problem)


class ApiUnreachable(Exception):
    """No answer from `url`."""

    def __init__(self, url: str, reason: str = "", what: str = "API") -> None:
        super().__init__(f"cannot reach {what} at {url}" + (f" ({reason})" if reason else ""))
        self.url = url
        self.reason = reason
        self.what = what


def _s3_error_message(text: str) -> str:
    """`<Code>: <Message>` out of an S3 XML error body, if that is what `text` is."""
    if "<Error>" not in text:
        return ""
    import re

    code = re.search(r"<Code>(.*?)</Code>", text, re.S)
    message = re.search(r"<Message>(.*?)</Message>", text, re.S)
    return ": ".join(m.group(1).strip() for m in (code, message) if m)


def token_subject(token: str) -> str | None:
    """The `sub` claim of a JWT, read without verifying the signature (the server verifies)."""
    parts = token.strip().split(".")
    if len(parts) != 3:
        return None
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    sub = claims.get("sub") if isinstance(claims, dict) else None
    return sub if isinstance(sub, str) and sub else None


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else url


class AvatuneClient:
    """The API for one user and (optionally) one avatar."""

    def __init__(
        self,
        api_url: str,
        token: str | None,
        user_id: str,
        avatar_id: str | None = None,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.user_id = user_id
        self.avatar_id = avatar_id
        headers = {"User-Agent": "avatune-cli"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.api_url, headers=headers, timeout=timeout, transport=transport)
        # For presigned URLs: no Authorization header, never the API's base URL.
        self._bare = httpx.Client(headers={"User-Agent": "avatune-cli"}, timeout=timeout, transport=transport)

    # -- plumbing --------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()
        self._bare.close()

    def __enter__(self) -> AvatuneClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def user_base(self) -> str:
        return f"/v1/users/{quote(self.user_id, safe='')}"

    @property
    def base(self) -> str:
        if not self.avatar_id:
            raise ValueError("this call needs an avatar")
        return f"{self.user_base}/avatars/{quote(self.avatar_id, safe='')}"

    def _doc(self, name: str) -> str:
        return f"{self.base}/training-data/{quote(name, safe='')}"

    def _send(self, method: str, url: str, *, client: httpx.Client | None = None, **kwargs: Any) -> httpx.Response:
        client = client or self._http
        try:
            response = client.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(client, url, exc) from None
        if response.is_error:
            raise ApiError.from_response(response)
        return response

    @contextmanager
    def _stream(
        self, method: str, url: str, *, client: httpx.Client | None = None, **kwargs: Any
    ) -> Iterator[httpx.Response]:
        client = client or self._http
        try:
            with client.stream(method, url, **kwargs) as response:
                if response.is_error:
                    response.read()
                    raise ApiError.from_response(response)
                yield response
        except httpx.TransportError as exc:
            raise self._unreachable(client, url, exc) from None

    def _unreachable(self, client: httpx.Client, url: str, exc: httpx.TransportError) -> ApiUnreachable:
        if client is self._http:
            return ApiUnreachable(self.api_url, type(exc).__name__)
        return ApiUnreachable(_origin(url), type(exc).__name__, what="storage")

    def _json(self, method: str, url: str, **kwargs: Any) -> Any:
        response = self._send(method, url, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise ApiError(
                response.status_code,
                f"{method} {response.url.path} answered something other than JSON; is {self.api_url} the avatune API?",
            ) from None

    def _download(
        self,
        url: str,
        dest: Path | BinaryIO,
        *,
        client: httpx.Client | None = None,
        params: dict[str, str] | None = None,
    ) -> tuple[int, str]:
        """Stream `url` to `dest` (a path, written atomically, or an open binary file); the
        number of bytes and their sha256."""
        digest = hashlib.sha256()
        size = 0
        with self._stream("GET", url, client=client, params=params) as response:
            if isinstance(dest, Path):
                dest.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
                try:
                    with os.fdopen(fd, "wb") as out:
                        for chunk in response.iter_bytes(CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            size += len(chunk)
                    os.replace(tmp, dest)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
            else:
                for chunk in response.iter_bytes(CHUNK):
                    dest.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
        return size, digest.hexdigest()

    # -- health ------------------------------------------------------------------------------

    def health(self) -> Json:
        """GET /healthz"""
        return self._json("GET", "/healthz")

    # -- training data -----------------------------------------------------------------------

    def upload_document(self, path: Path, *, use_for_training: bool = True, name: str | None = None) -> Json:
        """POST {base}/training-data (multipart)."""
        data = {"use_for_training": str(use_for_training).lower()}
        if name:
            data["name"] = name
        with path.open("rb") as f:
            files = {"file": (name or path.name, f, "application/octet-stream")}
            return self._json("POST", f"{self.base}/training-data", files=files, data=data)

    def put_document(self, name: str, content: bytes, *, use_for_training: bool | None = None) -> Json:
        """PUT {base}/training-data/{name} (raw body)."""
        params = {} if use_for_training is None else {"use_for_training": str(use_for_training).lower()}
        return self._json("PUT", self._doc(name), content=content, params=params)

    def presign_upload(self, name: str, size: int, *, use_for_training: bool = True) -> Json:
        """POST {base}/training-data/uploads: `{"url", "headers", "expires_at"}` for `size` bytes."""
        body = {"name": name, "size": size, "use_for_training": use_for_training}
        return self._json("POST", f"{self.base}/training-data/uploads", json=body)

    def put_presigned(self, upload: Json, path: Path) -> None:
        """PUT the file to a presigned URL with exactly the headers it was signed with (its
        Content-Length among them)."""
        headers = {**upload.get("headers", {}), "Content-Length": str(path.stat().st_size)}
        with path.open("rb") as f:
            self._send("PUT", upload["url"], client=self._bare, content=_chunks(f), headers=headers)

    def upload_large(self, path: Path, *, use_for_training: bool = True, name: str | None = None) -> Json:
        """Presigned route: ask for a URL, PUT the file to it."""
        upload = self.presign_upload(name or path.name, path.stat().st_size, use_for_training=use_for_training)
        self.put_presigned(upload, path)
        return upload

    def list_documents(
        self, use_for_training: bool | None = None, *, limit: int | None = None, cursor: str | None = None
    ) -> Json:
        """GET {base}/training-data: one page, `{"items", "next_cursor"}`."""
        params: dict[str, str | int] = {}
        if use_for_training is not None:
            params["use_for_training"] = str(use_for_training).lower()
        if limit is not None:
            params["limit"] = limit
        if cursor:
            params["cursor"] = cursor
        return self._json("GET", f"{self.base}/training-data", params=params)

    def iter_documents(self, use_for_training: bool | None = None, *, page_size: int | None = None) -> Iterator[Json]:
        """Every document, following `next_cursor` across pages."""
        return _paged(lambda cursor: self.list_documents(use_for_training, limit=page_size, cursor=cursor))

    def download_document(self, name: str, dest: Path | BinaryIO) -> tuple[int, str]:
        """GET {base}/training-data/{name}"""
        return self._download(self._doc(name), dest)

    def set_flag(self, name: str, use_for_training: bool) -> Json:
        """PATCH {base}/training-data/{name}"""
        return self._json("PATCH", self._doc(name), json={"use_for_training": use_for_training})

    def delete_document(self, name: str) -> None:
        """DELETE {base}/training-data/{name}"""
        self._send("DELETE", self._doc(name))

    def delete_documents(self, use_for_training: bool = False) -> int:
        """DELETE {base}/training-data?use_for_training=...: how many were deleted."""
        body = self._json(
            "DELETE", f"{self.base}/training-data", params={"use_for_training": str(use_for_training).lower()}
        )
        return int(body["deleted"])

    def download_archive(self, dest: Path | BinaryIO, use_for_training: ArchiveSelection = "true") -> tuple[int, str]:
        """GET {base}/training-data/archive (a zip stream)."""
        return self._download(f"{self.base}/training-data/archive", dest, params={"use_for_training": use_for_training})

    # -- training jobs -----------------------------------------------------------------------

    def create_job(self, overrides: Json | None = None, *, idempotency_key: str | None = None) -> Json:
        """POST {base}/training-jobs"""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json("POST", f"{self.base}/training-jobs", json=overrides or None, headers=headers)

    def list_jobs(self, *, limit: int | None = None, cursor: str | None = None, all_avatars: bool = False) -> Json:
        """GET {base}/training-jobs, or GET /v1/users/{user_id}/training-jobs with `all_avatars`."""
        params: dict[str, str | int] = {}
        if limit is not None:
            params["limit"] = limit
        if cursor:
            params["cursor"] = cursor
        url = f"{self.user_base}/training-jobs" if all_avatars else f"{self.base}/training-jobs"
        return self._json("GET", url, params=params)

    def iter_jobs(self, *, all_avatars: bool = False, page_size: int | None = None) -> Iterator[Json]:
        """Jobs newest first, following `next_cursor`."""
        return _paged(lambda cursor: self.list_jobs(limit=page_size, cursor=cursor, all_avatars=all_avatars))

    def get_job(self, job_id: str) -> Json:
        """GET {base}/training-jobs/{job_id}"""
        return self._json("GET", f"{self.base}/training-jobs/{quote(job_id, safe='')}")

    def cancel_job(self, job_id: str) -> Json:
        """POST {base}/training-jobs/{job_id}/cancel"""
        return self._json("POST", f"{self.base}/training-jobs/{quote(job_id, safe='')}/cancel")

    # -- feedback ----------------------------------------------------------------------------

    def post_feedback(self, body: Json) -> Json:
        """POST {base}/feedback: one judgement (a rated reply, a pair, or on a generation)."""
        return self._json("POST", f"{self.base}/feedback", json=body)

    def list_feedback(self, *, limit: int | None = None, cursor: str | None = None) -> Json:
        """GET {base}/feedback: one page, newest first."""
        params: dict[str, str | int] = {"limit": limit} if limit is not None else {}
        if cursor:
            params["cursor"] = cursor
        return self._json("GET", f"{self.base}/feedback", params=params)

    def iter_feedback(self, *, page_size: int | None = None) -> Iterator[Json]:
        """Feedback items newest first, following `next_cursor`."""
        return _paged(lambda cursor: self.list_feedback(limit=page_size, cursor=cursor))

    def delete_feedback(self, feedback_id: str) -> None:
        """DELETE {base}/feedback/{feedback_id}"""
        self._send("DELETE", f"{self.base}/feedback/{quote(feedback_id, safe='')}")

    # -- adapter -----------------------------------------------------------------------------

    def get_adapter(self) -> Json:
        """GET {base}/adapter"""
        return self._json("GET", f"{self.base}/adapter")

    def put_adapter(self, fields: Json) -> Json:
        """PUT {base}/adapter"""
        return self._json("PUT", f"{self.base}/adapter", json=fields)

    def delete_adapter(self) -> None:
        """DELETE {base}/adapter"""
        self._send("DELETE", f"{self.base}/adapter")

    def list_versions(self) -> list[Json]:
        """GET {base}/adapter/versions"""
        return self._json("GET", f"{self.base}/adapter/versions")["items"]

    def promote_version(self, version: int) -> Json:
        """POST {base}/adapter/versions/{n}/promote"""
        return self._json("POST", f"{self.base}/adapter/versions/{int(version)}/promote")

    def list_adapters(self) -> list[Json]:
        """GET /v1/users/{user_id}/adapters"""
        return self._json("GET", f"{self.user_base}/adapters")["items"]

    def download_file(self, url: str, dest: Path) -> tuple[int, str]:
        """GET a presigned URL (an adapter file) into `dest`."""
        return self._download(url, dest, client=self._bare)

    # -- fuse (not served yet by every API) --------------------------------------------------

    def create_fuse_job(self, version: int | None = None) -> Json:
        """POST {base}/fuse-jobs: body `{"version": n}` (omitted: the current version)."""
        return self._json("POST", f"{self.base}/fuse-jobs", json={} if version is None else {"version": version})

    def create_export(self, body: Json) -> Json:
        """POST {base}/exports: an export job (`format`, `adapter_version`, `include_base`, `outtype`)."""
        return self._json("POST", f"{self.base}/exports", json=body)

    def list_exports(self) -> list[Json]:
        """GET {base}/exports: the complete exports, by version and format."""
        return self._json("GET", f"{self.base}/exports")["items"]

    def get_export(self, version: int, export_format: str) -> Json:
        """GET {base}/exports/{version}/{format}: the manifest and presigned URLs of its files."""
        return self._json("GET", f"{self.base}/exports/{int(version)}/{export_format}")

    def create_generation(self, body: Json) -> Json:
        """POST {base}/generations: a generation job (see `avatune generate`)."""
        return self._json("POST", f"{self.base}/generations", json=body)


def _paged(list_page: Callable[[str | None], Json]) -> Iterator[Json]:
    """The items of every page `list_page(cursor)` returns, following `next_cursor`."""
    cursor: str | None = None
    while True:
        page = list_page(cursor)
        yield from page["items"]
        cursor = page.get("next_cursor")
        if not cursor:
            return


def _chunks(f: BinaryIO) -> Iterator[bytes]:
    while chunk := f.read(CHUNK):
        yield chunk
