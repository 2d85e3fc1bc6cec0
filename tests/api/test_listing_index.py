"""The flag index behind listings (handlers/flag_index.py, used by handlers/training_data_store.py):
it saves tag reads, and it never answers wrong when objects change behind the API's back
(presigned uploads, other writers' PutObject / CopyObject / DeleteObject) or through the API
itself.

Correctness is checked against the truth read straight from S3 (list + a tag read per object).
Entries only count once their tag was read `INDEX_SETTLE_SECONDS` after the object's
LastModified, so tests that want the index warm wait that long first (`settle`)."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from contracts.keys import training_data_index_key, training_data_prefix
from contracts.tags import flag_from_tagset
from handlers import flag_index
from handlers import training_data_store as tds
from handlers.avatar_ref import AvatarRef
from tests.conftest import TEST_BUCKET, Api, keys_under


class CountingS3:
    """Wraps an aiobotocore client and counts calls per operation."""

    def __init__(self, s3: Any) -> None:
        self._s3 = s3
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._s3, name)
        if name.startswith("_") or not callable(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return await attr(*args, **kwargs)

        return call


def run(body: Callable[[CountingS3, Callable[..., tds.TrainingDataStore]], Awaitable[Any]]) -> Any:
    """Run `body(s3, make_store)` on a fresh event loop with a counting S3 client."""
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    async def main() -> Any:
        async with get_session().create_client(
            "s3",
            endpoint_url=os.environ["AWS_ENDPOINT_URL"],
            region_name="us-east-1",
            config=AioConfig(signature_version="s3v4"),
        ) as raw:
            s3 = CountingS3(raw)
            return await body(s3, lambda **kw: tds.TrainingDataStore(s3, TEST_BUCKET, 16, **kw))

    return asyncio.run(main())


@pytest.fixture
def ref(stack) -> AvatarRef:
    flag_index.clear_index_cache()
    return AvatarRef("ix-" + uuid.uuid4().hex[:10], "avatar-1")


def prefix(ref: AvatarRef) -> str:
    return training_data_prefix(ref.user_id, ref.avatar_id)


def index_key(ref: AvatarRef) -> str:
    return training_data_index_key(ref.user_id, ref.avatar_id)


def put(s3, ref: AvatarRef, name: str, body: bytes, flag: bool | None) -> None:
    """Another writer's PutObject (None: no tag at all, which counts as true)."""
    extra = {} if flag is None else {"Tagging": f"use_for_training={str(flag).lower()}"}
    s3.put_object(Bucket=TEST_BUCKET, Key=prefix(ref) + name, Body=body, **extra)


def populate(s3, ref: AvatarRef, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        put(s3, ref, f"doc-{i:04d}.txt", f"text {i}".encode(), None if i % 9 == 4 else i % 4 != 1)


def truth(s3, ref: AvatarRef) -> dict[str, bool]:
    """Every document's flag, read straight from S3."""
    out = {}
    for key in keys_under(s3, prefix(ref)):
        out[key[len(prefix(ref)) :]] = flag_from_tagset(s3.get_object_tagging(Bucket=TEST_BUCKET, Key=key)["TagSet"])
    return out


def expected(s3, ref: AvatarRef, flag: bool | None, known: dict[str, bool] | None = None) -> list[tuple[str, bool]]:
    return sorted((n, f) for n, f in (known or truth(s3, ref)).items() if flag is None or f == flag)


def settle() -> None:
    time.sleep(flag_index.INDEX_SETTLE_SECONDS + 0.2)


async def listed(
    store: tds.TrainingDataStore, ref: AvatarRef, flag: bool | None, limit: int = 1000
) -> list[tuple[str, bool]]:
    """Every matching document, following cursors."""
    out, after = [], None
    while True:
        docs, after = await store.list(ref, flag, limit, after)
        out += [(d.name, d.use_for_training) for d in docs]
        if after is None:
            return out


def test_a_warm_index_answers_without_tag_reads(s3, ref: AvatarRef) -> None:
    populate(s3, ref, 80)
    settle()
    want = {flag: expected(s3, ref, flag) for flag in (True, False, None)}

    async def body(counting: CountingS3, store) -> None:
        assert await listed(store(), ref, False) == want[False]
        assert counting.calls["get_object_tagging"] == 80  # cold: every tag read once
        assert counting.calls["put_object"] == 1  # ... and the index written
        for flag in (True, False, None):
            counting.calls.clear()
            assert await listed(store(), ref, flag) == want[flag]
            assert counting.calls["get_object_tagging"] == 0 and counting.calls["put_object"] == 0
        flag_index.clear_index_cache()  # a fresh process: the index comes from S3
        counting.calls.clear()
        assert await listed(store(), ref, True) == want[True]
        assert dict(counting.calls) == {"list_objects_v2": 1, "get_object": 1}

    run(body)
    stored = json.loads(s3.get_object(Bucket=TEST_BUCKET, Key=index_key(ref))["Body"].read())
    assert sorted(stored["entries"]) == sorted(truth(s3, ref))


def test_writers_behind_the_api_are_seen(s3, ref: AvatarRef) -> None:
    populate(s3, ref, 70)
    settle()

    async def body(counting: CountingS3, store) -> None:
        await listed(store(), ref, None)  # the index is warm now
        before = truth(s3, ref)
        # A presigned upload of a new document, not used for training.
        up = await store().presign_upload(ref, "new-presigned.jsonl", False, 14, 300)
        assert httpx.put(up.url, content=b'{"text": "x"}\n', headers=up.headers).status_code == 200
        # A presigned re-upload of an existing document: same bytes (same ETag), other flag.
        name = "doc-0002.txt"
        up = await store().presign_upload(ref, name, not before[name], 6, 300)
        assert httpx.put(up.url, content=b"text 2", headers=up.headers).status_code == 200
        # Another writer's PutObject without a tag (counts as used), over an unused document.
        put(s3, ref, "doc-0001.txt", b"text 1", None)
        # Another writer's CopyObject onto itself with a new tag set.
        key = prefix(ref) + "doc-0003.txt"
        s3.copy_object(
            Bucket=TEST_BUCKET,
            Key=key,
            CopySource={"Bucket": TEST_BUCKET, "Key": key},
            MetadataDirective="REPLACE",
            TaggingDirective="REPLACE",
            Tagging=f"use_for_training={str(not before['doc-0003.txt']).lower()}",
        )
        # A delete, a new untagged and a new unused document.
        s3.delete_object(Bucket=TEST_BUCKET, Key=prefix(ref) + "doc-0005.txt")
        put(s3, ref, "doc-0005a.txt", b"new", None)
        put(s3, ref, "doc-0000a.txt", b"new unused", False)
        # And the API's own flag change.
        await store().set_flag(ref, "doc-0010.txt", not before["doc-0010.txt"])

        now = truth(s3, ref)
        assert now != before
        for _ in range(2):  # right after the changes, and once they have settled
            for flag in (True, False, None):
                assert await listed(store(), ref, flag) == expected(s3, ref, flag, now)
            settle()
        counting.calls.clear()
        for flag in (True, False, None):
            assert await listed(store(), ref, flag, limit=7) == expected(s3, ref, flag, now)
        assert counting.calls["get_object_tagging"] == 0  # all proven by the index again

    run(body)


def test_a_rewrite_within_the_same_second_is_not_trusted(s3, ref: AvatarRef) -> None:
    populate(s3, ref, 70)

    async def body(counting: CountingS3, store) -> None:
        for i in range(3):
            flag = i % 2 == 0
            put(s3, ref, "same.txt", b"same bytes", flag)  # same ETag every time
            assert ("same.txt", flag) in await listed(store(), ref, None)
            put(s3, ref, "same.txt", b"same bytes", not flag)  # most likely within the second
            assert ("same.txt", not flag) in await listed(store(), ref, None)

    run(body)


def test_ranges_and_cursors_cover_objects_added_and_removed(s3, ref: AvatarRef, monkeypatch) -> None:
    # Tiny pages and ranges, so that every continuation path runs.
    monkeypatch.setattr(tds, "LIST_PAGE_SIZE", 5)
    monkeypatch.setattr(tds, "RANGE_NAMES", 7)
    monkeypatch.setattr(tds, "RANGE_SLACK", 2)
    populate(s3, ref, 70)
    settle()

    async def body(counting: CountingS3, store) -> None:
        await listed(store(index_min_objects=4), ref, None)
        # Between every pair of indexed names, new documents; some old ones disappear.
        for i in range(0, 70, 3):
            put(s3, ref, f"doc-{i:04d}b.txt", b"between", i % 2 == 0)
        for i in range(0, 70, 5):
            s3.delete_object(Bucket=TEST_BUCKET, Key=prefix(ref) + f"doc-{i:04d}.txt")
        now = truth(s3, ref)
        for flag in (None, True, False):
            for limit in (2, 11, 1000):
                assert await listed(store(index_min_objects=4), ref, flag, limit) == expected(s3, ref, flag, now), (
                    flag,
                    limit,
                )
        names = [d.name async for d in store(index_min_objects=4).iter_all(ref, None)]
        assert names == sorted(now)

    run(body)
    stored = json.loads(s3.get_object(Bucket=TEST_BUCKET, Key=index_key(ref))["Body"].read())
    assert sorted(stored["entries"]) == sorted(truth(s3, ref))  # deleted names were pruned


def test_a_lost_index_write_race_merges(s3, ref: AvatarRef) -> None:
    populate(s3, ref, 70)
    settle()

    async def body(counting: CountingS3, store) -> None:
        await listed(store(), ref, None)
        # Another process rewrites the index meanwhile (here: with one entry only).
        stored = json.loads(s3.get_object(Bucket=TEST_BUCKET, Key=index_key(ref))["Body"].read())
        one = dict(list(stored["entries"].items())[:1])
        s3.put_object(Bucket=TEST_BUCKET, Key=index_key(ref), Body=json.dumps({"version": 1, "entries": one}).encode())
        put(s3, ref, "doc-9999.txt", b"late", False)
        counting.calls.clear()
        assert await listed(store(), ref, False) == expected(s3, ref, False)
        assert counting.calls["put_object"] == 2  # If-Match lost, merged once, written

    run(body)
    stored = json.loads(s3.get_object(Bucket=TEST_BUCKET, Key=index_key(ref))["Body"].read())
    assert "doc-9999.txt" in stored["entries"]


def test_an_unreadable_index_is_replaced(s3, ref: AvatarRef) -> None:
    populate(s3, ref, 70)
    s3.put_object(Bucket=TEST_BUCKET, Key=index_key(ref), Body=b"{not json")

    async def body(counting: CountingS3, store) -> None:
        assert await listed(store(), ref, True) == expected(s3, ref, True)

    run(body)
    stored = json.loads(s3.get_object(Bucket=TEST_BUCKET, Key=index_key(ref))["Body"].read())
    assert len(stored["entries"]) == 70


def test_entries_expire_so_a_bare_tag_change_is_seen_eventually(s3, ref: AvatarRef, monkeypatch) -> None:
    """PutObjectTagging does not change LastModified, so a listing cannot see it; the index
    re-reads entries after INDEX_MAX_AGE_SECONDS (here: at once) to bound how long."""
    populate(s3, ref, 70)
    settle()

    async def body(counting: CountingS3, store) -> None:
        await listed(store(), ref, None)
        s3.put_object_tagging(
            Bucket=TEST_BUCKET,
            Key=prefix(ref) + "doc-0000.txt",
            Tagging={"TagSet": [{"Key": "use_for_training", "Value": "false"}]},
        )
        monkeypatch.setattr(flag_index, "INDEX_MAX_AGE_SECONDS", 0)
        assert await listed(store(), ref, False) == expected(s3, ref, False)

    run(body)


def test_small_avatars_get_no_index(api: Api, s3) -> None:
    for i in range(5):
        assert api.put_doc(f"d{i}.txt", b"x", flag=i % 2 == 0).status_code == 201
    assert len(api.get(api.docs, params={"use_for_training": "true"}).json()["items"]) == 3
    assert keys_under(s3, training_data_index_key(api.user_id, api.avatar_id)) == []


def test_api_listing_follows_presigned_uploads_patches_and_deletes(api: Api, s3) -> None:
    ref = AvatarRef(api.user_id, api.avatar_id)
    populate(s3, ref, 70)
    settle()

    def names(flag: str) -> list[str]:
        return [d["name"] for d in api.get(api.docs, params={"use_for_training": flag, "limit": 1000}).json()["items"]]

    assert names("false") == [n for n, f in expected(s3, ref, False)]
    assert keys_under(s3, index_key(ref)) == [index_key(ref)]  # a large avatar: indexed
    body = {"name": "doc-0003.txt", "size": 6, "use_for_training": False}
    up = api.post(f"{api.docs}/uploads", json=body).json()
    assert httpx.put(up["url"], content=b"text 3", headers=up["headers"]).status_code == 200
    patched = api.patch(f"{api.docs}/doc-0001.txt", json={"use_for_training": True})
    assert patched.status_code == 200 and patched.json()["use_for_training"] is True
    assert api.delete(f"{api.docs}/doc-0002.txt").status_code == 204
    s3.delete_object(Bucket=TEST_BUCKET, Key=prefix(ref) + "doc-0006.txt")
    for flag in ("true", "false"):
        assert names(flag) == [n for n, f in expected(s3, ref, flag == "true")]


def test_patch_rewrites_the_object_keeping_content_metadata_and_tags(api: Api, s3) -> None:
    assert api.put_doc("p.jsonl", b'{"text": "hello"}\n').status_code == 201
    key = prefix(AvatarRef(api.user_id, api.avatar_id)) + "p.jsonl"
    s3.put_object_tagging(
        Bucket=TEST_BUCKET,
        Key=key,
        Tagging={"TagSet": [{"Key": "use_for_training", "Value": "true"}, {"Key": "owner", "Value": "bob"}]},
    )
    before = s3.head_object(Bucket=TEST_BUCKET, Key=key)
    r = api.patch(f"{api.docs}/p.jsonl", json={"use_for_training": False})
    assert r.status_code == 200, r.text
    doc = r.json()
    after = s3.head_object(Bucket=TEST_BUCKET, Key=key)
    assert doc["use_for_training"] is False and doc["etag"] == before["ETag"].strip('"') == after["ETag"].strip('"')
    assert doc["size"] == len(b'{"text": "hello"}\n') and doc["content_type"] == "application/jsonl"
    assert after["ContentType"] == before["ContentType"]
    tags = {t["Key"]: t["Value"] for t in s3.get_object_tagging(Bucket=TEST_BUCKET, Key=key)["TagSet"]}
    assert tags == {"use_for_training": "false", "owner": "bob"}
    assert s3.get_object(Bucket=TEST_BUCKET, Key=key)["Body"].read() == b'{"text": "hello"}\n'
    assert api.get(f"{api.docs}/p.jsonl").json() == {"text": "hello"}
