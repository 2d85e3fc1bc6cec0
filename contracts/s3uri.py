"""`s3://bucket/key` URIs in job specs, and the tenant rule they must obey.

Stable API (shared by the API side and the trainer; extend, don't change):

- `S3Uri(bucket, key)`: a parsed URI; `str()` gives it back as `s3://bucket/key`.
- `parse_s3_uri(uri, *, prefix=False) -> S3Uri`: parse and validate, raising `InvalidS3Uri`
  (a `ValueError`) with a message fit for a 422 detail. `prefix=True` reads the URI as a folder:
  the key gets a trailing `/` (an empty key stays empty: the bucket root).
- `within_user_prefix(uri, bucket, user_id) -> bool`: True when `uri` (an `S3Uri` or a string)
  lies in the service `bucket` under `users/{user_id}/`.
- `within_prefixes(uri, allowed) -> bool`: True when `uri` lies under one of the `allowed`
  `s3://bucket/prefix` URIs (an operator's allow-list, e.g. `BASE_MODEL_S3_ALLOWED_PREFIXES`).

Keys are checked so that a URI cannot reach outside the prefix it seems to be in: no `..` or
`.` segments, no empty segments (`//`), no leading `/`, no backslashes or control characters.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from contracts.ids import InvalidIdentifier, validate_id

SCHEME = "s3://"
MAX_KEY_LENGTH = 1024
# S3's bucket naming rules (the virtual-host-safe subset).
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class InvalidS3Uri(ValueError):
    """A string that is not a safe `s3://bucket/key` URI."""


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"

    def child(self, name: str) -> S3Uri:
        """The key `name` below this (folder) URI."""
        base = self.key if not self.key or self.key.endswith("/") else self.key + "/"
        return S3Uri(self.bucket, base + name)


def _check_key(key: str) -> None:
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidS3Uri(f"the key of an s3:// URI must be at most {MAX_KEY_LENGTH} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        raise InvalidS3Uri("an s3:// URI must not contain control characters")
    if "\\" in key:
        raise InvalidS3Uri("an s3:// URI must not contain backslashes")
    if key.startswith("/"):
        raise InvalidS3Uri("the key of an s3:// URI must not start with '/'")
    segments = key.split("/")
    # A trailing "/" (a folder) leaves one empty last segment, which is fine.
    inner = segments[:-1] if key.endswith("/") else segments
    for segment in inner:
        if segment == "":
            raise InvalidS3Uri("an s3:// URI must not contain empty path segments ('//')")
        if segment in (".", ".."):
            raise InvalidS3Uri("an s3:// URI must not contain '.' or '..' segments")


def parse_s3_uri(uri: str, *, prefix: bool = False) -> S3Uri:
    """Parse `s3://bucket/key`. With `prefix=True` the key names a folder and ends in `/`."""
    if not isinstance(uri, str) or not uri.startswith(SCHEME):
        raise InvalidS3Uri("must be an s3://bucket/key URI")
    rest = uri[len(SCHEME) :]
    bucket, sep, key = rest.partition("/")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise InvalidS3Uri(f"invalid bucket name in s3:// URI: {bucket[:64]!r}")
    if not sep:
        key = ""
    _check_key(key)
    if prefix and key and not key.endswith("/"):
        key += "/"
    if not prefix and (not key or key.endswith("/")):
        raise InvalidS3Uri("an s3:// URI of a file must name a key, not a folder")
    return S3Uri(bucket, key)


def _as_uri(uri: S3Uri | str) -> S3Uri | None:
    if isinstance(uri, S3Uri):
        return uri
    try:
        # A folder or a file: both are checked the same way against a prefix.
        return parse_s3_uri(uri, prefix=uri.endswith("/"))
    except InvalidS3Uri:
        return None


def within_user_prefix(uri: S3Uri | str, bucket: str, user_id: str) -> bool:
    """True when `uri` is in the service `bucket` strictly under `users/{user_id}/`."""
    parsed = _as_uri(uri)
    if parsed is None or parsed.bucket != bucket:
        return False
    try:
        user_prefix = f"users/{validate_id(user_id, 'user_id')}/"
    except InvalidIdentifier:
        return False
    return parsed.key.startswith(user_prefix) and len(parsed.key) > len(user_prefix)


def within_prefixes(uri: S3Uri | str, allowed: Iterable[str]) -> bool:
    """True when `uri` lies under one of the `allowed` `s3://bucket/prefix` URIs (invalid entries
    never match; a bucket-root entry allows the whole bucket)."""
    parsed = _as_uri(uri)
    if parsed is None:
        return False
    for entry in allowed:
        try:
            root = parse_s3_uri(entry.strip(), prefix=True)
        except InvalidS3Uri:
            continue
        if parsed.bucket == root.bucket and parsed.key.startswith(root.key):
            return True
    return False
