"""The flag index of an avatar's training documents: a derived cache that lets a listing by
`use_for_training` skip the tag reads.

S3 lists no tags, so a listing needs every object's flag from somewhere. Reading each object's
tag costs one request per object; for large avatars `handlers.training_data_store` keeps a
*flag index* (`adapters/training_data_index.json`, plus a copy in process memory) that maps
each document to `(etag, last_modified, flag, checked)`. The index is only ever a cache: every
listing still lists the objects, and an entry is used only when the object's ETag and
LastModified in that listing are the ones the entry was read for, and the tag was read at least
`INDEX_SETTLE_SECONDS` after that LastModified (S3 keeps LastModified to the second). Any write
of an object (an API upload, a presigned upload, another writer's PutObject or CopyObject)
gives it a new LastModified, so its entry stops matching and the tag is read again; deleted
objects drop out of the listing. That holds because the flag itself only changes with a write
of the object: the store's `set_flag` (PATCH) rewrites the object in place with CopyObject and
the new tag set rather than calling PutObjectTagging (and `forget`s the index when it cannot).
A bare PutObjectTagging by another writer is the one change a listing cannot see; entries are
re-read after `INDEX_MAX_AGE_SECONDS` at the latest.

Entries carry their own proof, so no coordination is needed between writers of the index: it
is written with If-Match / If-None-Match (`handlers.s3_json`) only so that concurrent listings
do not drop each other's entries (a lost race merges once, then gives up: a missing entry only
costs a tag read).

Here: `FlagIndex` (the entries, and what they prove), `ListingScan` (what one listing saw and
learnt), `FlagIndexes` (an avatar's index read through the process cache and written back).
"""

from __future__ import annotations

import json
import logging
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field

from contracts.conditional import write_attempts
from contracts.keys import training_data_index_key
from handlers.avatar_ref import AvatarRef
from handlers.s3_json import S3Json

log = logging.getLogger("avatune.api")

INDEX_VERSION = 1
# A listing that reaches this many objects uses (and maintains) the flag index; smaller
# avatars just read their tags and never get an index object.
INDEX_MIN_OBJECTS = 64
# An entry counts only once its tag was read this long after the object's LastModified
# (LastModified has one-second resolution: a same-second rewrite must not match).
INDEX_SETTLE_SECONDS = 2
# Bounds how long a tag changed behind the API's back with a bare PutObjectTagging can be
# missed: entries are re-read after 0.5-1x this age (spread per name).
INDEX_MAX_AGE_SECONDS = 24 * 3600
# Parsed indexes kept in process memory (per avatar, LRU).
INDEX_CACHE_AVATARS = 64
# The index is a cache: a write that loses the race merges into the winner once, then gives up.
INDEX_WRITE_ATTEMPTS = 2

Entry = tuple[str, int, bool, int]  # (etag, last_modified, flag, checked): epoch seconds


class FlagIndex:
    """An avatar's flag index: document name -> Entry, and the S3 ETag it was read with."""

    def __init__(self, entries: dict[str, Entry], s3_etag: str | None) -> None:
        self.entries = entries
        self.s3_etag = s3_etag
        self._names: list[str] | None = None

    def names(self) -> list[str]:
        if self._names is None:
            self._names = sorted(self.entries)
        return self._names

    def flag(self, name: str, etag: str, last_modified: int, now: float) -> bool | None:
        """The flag if the entry proves it for this version of the object, else None."""
        entry = self.entries.get(name)
        if entry is None or entry[0] != etag.strip('"') or entry[1] != last_modified:
            return None
        if entry[3] < last_modified + INDEX_SETTLE_SECONDS:
            return None
        if now - entry[3] > INDEX_MAX_AGE_SECONDS * (0.5 + (zlib.crc32(name.encode()) % 1000) / 2000):
            return None
        return entry[2]

    def reach(self, first: int, flag: bool | None, need: int | None) -> int:
        """Index position (exclusive) up to which a listing from `first` should expect `need`
        matches, with slack; len(names) means to the end."""
        names = self.names()
        if need is None:
            return len(names)
        slack = need // 16 + 8
        if flag is None:
            return min(len(names), first + need + slack)
        found = 0
        for i in range(first, len(names)):
            if self.entries[names[i]][2] == flag:
                found += 1
                if found >= need:
                    return min(len(names), i + 1 + slack)
        return len(names)

    @staticmethod
    def encode(entries: dict[str, Entry]) -> bytes:
        body = {"version": INDEX_VERSION, "entries": {n: [e[0], e[1], int(e[2]), e[3]] for n, e in entries.items()}}
        return json.dumps(body, separators=(",", ":")).encode()

    @staticmethod
    def decode(data: bytes, s3_etag: str) -> FlagIndex:
        """An unreadable or foreign index counts as empty (and is replaced on the next write)."""
        try:
            body = json.loads(data)
            if body.get("version") != INDEX_VERSION:
                return FlagIndex({}, s3_etag)
            entries = {str(n): (str(e[0]), int(e[1]), bool(e[2]), int(e[3])) for n, e in body["entries"].items()}
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return FlagIndex({}, s3_etag)
        return FlagIndex(entries, s3_etag)


@dataclass
class ListingScan:
    """What one listing saw: names listed, flags read, and the name range it covered."""

    start: str | None
    covered: str | None = None
    reached_end: bool = False
    seen: set[str] = field(default_factory=set)
    verified: dict[str, Entry] = field(default_factory=dict)
    tag_reads: int = 0

    def cover(self, upper: str | None) -> None:
        """A page was processed that covers names up to `upper` (None: to the end)."""
        if upper is None:
            self.reached_end = True
        else:
            self.covered = upper

    def verify(self, name: str, etag: str, last_modified: int, flag: bool, checked: int) -> None:
        """The tag of `name` (this ETag and LastModified) was read at `checked`: an entry to keep."""
        self.verified[name] = (etag.strip('"'), last_modified, flag, checked)

    def _in_range(self, name: str) -> bool:
        if self.start is not None and name <= self.start:
            return False
        return self.reached_end or (self.covered is not None and name <= self.covered)

    def gone(self, entries: dict[str, Entry]) -> list[str]:
        """Index names inside the covered range that the listing did not show (deleted)."""
        return [n for n in entries if n not in self.seen and self._in_range(n)]

    def changes(self, index: FlagIndex) -> bool:
        return bool(self.verified) or bool(self.gone(index.entries))

    def merged(self, entries: dict[str, Entry]) -> dict[str, Entry]:
        merged = dict(entries)
        for name in self.gone(entries):
            del merged[name]
        merged.update(self.verified)
        return merged


class _IndexCache:
    """Parsed indexes of the most recently listed avatars, per process. Safe to serve stale:
    every entry is checked against the current listing anyway."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[tuple[str, str], FlagIndex] = OrderedDict()

    def get(self, bucket: str, key: str) -> FlagIndex | None:
        index = self._items.get((bucket, key))
        if index is not None:
            self._items.move_to_end((bucket, key))
        return index

    def put(self, bucket: str, key: str, index: FlagIndex) -> None:
        self._items[(bucket, key)] = index
        self._items.move_to_end((bucket, key))
        while len(self._items) > self._size:
            self._items.popitem(last=False)

    def drop(self, bucket: str, key: str) -> None:
        self._items.pop((bucket, key), None)

    def clear(self) -> None:
        self._items.clear()


_CACHE = _IndexCache(INDEX_CACHE_AVATARS)


def clear_index_cache() -> None:
    """Forget every index held in process memory (tests and benchmarks: a fresh process)."""
    _CACHE.clear()


class FlagIndexes:
    """The flag indexes of one bucket's avatars: read through the process cache, written back
    with conditional writes."""

    def __init__(self, objects: S3Json) -> None:
        self._objects = objects

    def cached(self, ref: AvatarRef) -> FlagIndex | None:
        """The avatar's index held in process memory, if any (no S3 request)."""
        return _CACHE.get(self._objects.bucket, training_data_index_key(ref.user_id, ref.avatar_id))

    async def load(self, ref: AvatarRef) -> FlagIndex:
        """The avatar's index from S3 (empty when there is none), now also held in memory."""
        key = training_data_index_key(ref.user_id, ref.avatar_id)
        loaded = await self._objects.read(key)
        if loaded is None:
            return FlagIndex({}, None)
        index = FlagIndex.decode(*loaded)
        _CACHE.put(self._objects.bucket, key, index)
        return index

    async def save(self, ref: AvatarRef, index: FlagIndex, scan: ListingScan) -> None:
        """Merge what a listing learnt into the index it started from (conditional write; one
        merge on a lost race, then give up: the index is a cache). Never raises."""
        key = training_data_index_key(ref.user_id, ref.avatar_id)
        try:
            if not scan.changes(index):
                return
            for attempt in write_attempts(f"the flag index {key}", limit=INDEX_WRITE_ATTEMPTS):
                if attempt:  # lost the race: merge into the index that won
                    index = await self.load(ref)
                entries = scan.merged(index.entries)
                etag = await self._objects.put_if(key, FlagIndex.encode(entries), index.s3_etag)
                if etag is not None:
                    _CACHE.put(self._objects.bucket, key, FlagIndex(entries, etag))
                    return
        except Exception:
            _CACHE.drop(self._objects.bucket, key)
            log.warning("could not update the flag index %s", key, exc_info=True)

    async def forget(self, ref: AvatarRef) -> None:
        """Drop the avatar's index, in memory and in S3, so that no listing trusts an entry
        after a flag change it cannot see (a PutObjectTagging)."""
        key = training_data_index_key(ref.user_id, ref.avatar_id)
        _CACHE.drop(self._objects.bucket, key)
        await self._objects.delete(key)
