"""The training-data API over real HTTP against moto in server mode."""

from __future__ import annotations

import io
import json
import zipfile

import httpx
import pytest

from contracts.keys import training_data_prefix
from tests.conftest import TEST_BUCKET, Api, chat_line, keys_under

CHAT = chat_line("hi", "hello there")
DIALOG = json.dumps(
    {"dialog": [{"speaker": "Bob", "content": "hey"}, {"speaker": "Ann", "content": "hi Bob"}], "speaker": "Ann"}
).encode()


def flag_in_s3(s3, api: Api, name: str) -> str:
    key = training_data_prefix(api.user_id, api.avatar_id) + name
    tags = s3.get_object_tagging(Bucket=TEST_BUCKET, Key=key)["TagSet"]
    return {t["Key"]: t["Value"] for t in tags}["use_for_training"]


def test_healthz_needs_no_auth(api_url: str) -> None:
    assert httpx.get(api_url + "/healthz").json() == {"status": "ok"}


def test_multipart_upload_defaults_flag_true(api: Api, s3) -> None:
    r = api.post(api.docs, files={"file": ("chat.jsonl", CHAT, "application/jsonl")})
    assert r.status_code == 201, r.text
    doc = r.json()
    assert doc["name"] == "chat.jsonl" and doc["use_for_training"] is True and doc["size"] == len(CHAT)
    assert set(doc) == {"name", "size", "etag", "last_modified", "use_for_training", "content_type"}
    assert flag_in_s3(s3, api, "chat.jsonl") == "true"


def test_multipart_upload_with_flag_false(api: Api, s3) -> None:
    r = api.post(api.docs, files={"file": ("d.json", DIALOG)}, data={"use_for_training": "false"})
    assert r.status_code == 201, r.text
    assert r.json()["use_for_training"] is False
    assert flag_in_s3(s3, api, "d.json") == "false"


def test_put_creates_then_replace_keeps_flag(api: Api, s3) -> None:
    assert api.put_doc("a.txt", b"one", flag=False).status_code == 201
    r = api.put_doc("a.txt", b"two")  # no flag given: the existing false must survive
    assert r.status_code == 200 and r.json()["use_for_training"] is False
    assert flag_in_s3(s3, api, "a.txt") == "false"
    assert api.get(f"{api.docs}/a.txt").content == b"two"
    r = api.put_doc("a.txt", b"three", flag=True)
    assert r.json()["use_for_training"] is True and flag_in_s3(s3, api, "a.txt") == "true"


def test_plain_put_object_drops_tags(api: Api, s3) -> None:
    """Why the API re-sends the flag on replace: S3 itself forgets tags on PutObject."""
    api.put_doc("b.txt", b"one", flag=False)
    key = training_data_prefix(api.user_id, api.avatar_id) + "b.txt"
    s3.put_object(Bucket=TEST_BUCKET, Key=key, Body=b"two")
    assert s3.get_object_tagging(Bucket=TEST_BUCKET, Key=key)["TagSet"] == []
    # ... and an untagged document counts as used for training (the default).
    assert api.get(f"{api.docs}/b.txt", headers={}).status_code == 200
    assert [d["use_for_training"] for d in api.get(api.docs).json()["items"]] == [True]


def test_download_returns_content(api: Api) -> None:
    api.put_doc("d.json", DIALOG)
    r = api.get(f"{api.docs}/d.json")
    assert r.status_code == 200 and r.content == DIALOG
    assert r.headers["content-type"].startswith("application/json")
    assert api.get(f"{api.docs}/missing.txt").status_code == 404


def test_list_filters_by_flag(api: Api) -> None:
    api.put_doc("used1.txt", b"x")
    api.put_doc("used2.jsonl", CHAT, flag=True)
    api.put_doc("unused.txt", b"y", flag=False)
    names = lambda params: [d["name"] for d in api.get(api.docs, params=params).json()["items"]]  # noqa: E731
    assert names({}) == ["unused.txt", "used1.txt", "used2.jsonl"]
    assert names({"use_for_training": "true"}) == ["used1.txt", "used2.jsonl"]
    assert names({"use_for_training": "false"}) == ["unused.txt"]


def test_list_pages_with_cursor(api: Api) -> None:
    for i in range(7):
        api.put_doc(f"doc{i}.txt", f"text {i}".encode(), flag=i % 2 == 0)
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        body = api.get(api.docs, params=params).json()
        seen += [d["name"] for d in body["items"]]
        pages += 1
        cursor = body["next_cursor"]
        if not cursor:
            break
    assert seen == [f"doc{i}.txt" for i in range(7)] and pages == 4
    # Filtered paging: only flagged documents, across several underlying items.
    seen, cursor = [], None
    while True:
        params = {"limit": 1, "use_for_training": "false", **({"cursor": cursor} if cursor else {})}
        body = api.get(api.docs, params=params).json()
        seen += [d["name"] for d in body["items"]]
        cursor = body["next_cursor"]
        if not cursor:
            break
    assert seen == ["doc1.txt", "doc3.txt", "doc5.txt"]


def test_list_rejects_bad_paging(api: Api) -> None:
    for params in ({"limit": 0}, {"limit": 1001}, {"cursor": "!!!"}, {"use_for_training": "maybe"}):
        r = api.get(api.docs, params=params)
        assert r.status_code in (400, 422), params
        assert r.headers["content-type"] == "application/problem+json"


def test_patch_flag(api: Api, s3) -> None:
    api.put_doc("p.txt", b"x")
    r = api.patch(f"{api.docs}/p.txt", json={"use_for_training": False})
    assert r.status_code == 200 and r.json()["use_for_training"] is False
    assert flag_in_s3(s3, api, "p.txt") == "false"
    assert api.patch(f"{api.docs}/nope.txt", json={"use_for_training": False}).status_code == 404
    assert api.patch(f"{api.docs}/p.txt", json={"use_for_training": "perhaps"}).status_code == 422
    assert api.patch(f"{api.docs}/p.txt", json={}).status_code == 422


def test_delete_one(api: Api, s3) -> None:
    api.put_doc("gone.txt", b"x")
    assert api.delete(f"{api.docs}/gone.txt").status_code == 204
    assert keys_under(s3, training_data_prefix(api.user_id, api.avatar_id)) == []
    assert api.delete(f"{api.docs}/gone.txt").status_code == 404


def test_delete_unused_only_and_refuse_delete_all(api: Api, s3) -> None:
    api.put_doc("keep.txt", b"x")
    for i in range(3):
        api.put_doc(f"drop{i}.txt", b"y", flag=False)
    r = api.delete(api.docs)
    assert r.status_code == 400 and r.headers["content-type"] == "application/problem+json"
    assert len(keys_under(s3, training_data_prefix(api.user_id, api.avatar_id))) == 4
    r = api.delete(api.docs, params={"use_for_training": "false"})
    assert r.status_code == 200 and r.json() == {"deleted": 3}
    assert [d["name"] for d in api.get(api.docs).json()["items"]] == ["keep.txt"]


def test_archive_contains_flagged_documents(api: Api) -> None:
    api.put_doc("a.jsonl", CHAT)
    api.put_doc("b.json", DIALOG)
    api.put_doc("c.txt", b"not used", flag=False)

    def archive(params: dict) -> dict[str, bytes]:
        r = api.get(f"{api.docs}/archive", params=params)
        assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
        with zipfile.ZipFile(io.BytesIO(r.content)) as z:
            return {n: z.read(n) for n in z.namelist()}

    assert archive({}) == {"a.jsonl": CHAT, "b.json": DIALOG}
    assert archive({"use_for_training": "false"}) == {"c.txt": b"not used"}
    assert set(archive({"use_for_training": "all"})) == {"a.jsonl", "b.json", "c.txt"}


def test_archive_of_empty_avatar_is_valid_zip(api: Api) -> None:
    r = api.get(f"{api.docs}/archive")
    assert zipfile.ZipFile(io.BytesIO(r.content)).namelist() == []


@pytest.mark.parametrize("flag", [True, False])
def test_presigned_upload_keeps_signed_tag(api: Api, flag: bool) -> None:
    r = api.post(f"{api.docs}/uploads", json={"name": "big.jsonl", "size": len(CHAT) * 3, "use_for_training": flag})
    assert r.status_code == 200, r.text
    up = r.json()
    assert set(up) == {"url", "headers", "expires_at"}
    signed = set(httpx.URL(up["url"]).params["X-Amz-SignedHeaders"].split(";"))
    assert {"x-amz-tagging", "content-length"} <= signed and up["headers"]["Content-Length"] == str(len(CHAT) * 3)
    assert "x-amz-tagging" not in httpx.URL(up["url"]).params
    put = httpx.put(up["url"], content=CHAT * 3, headers=up["headers"])
    assert put.status_code == 200, put.text
    items = api.get(api.docs, params={"use_for_training": str(flag).lower()}).json()["items"]
    assert [(d["name"], d["size"]) for d in items] == [("big.jsonl", len(CHAT) * 3)]


def test_presigned_upload_validates_name(api: Api) -> None:
    too_big = {"name": "ok.txt", "size": 64 * 1024 * 1024 + 1}  # past MAX_PRESIGNED_UPLOAD_BYTES: 413
    for body in ({"name": "../x.jsonl", "size": 1}, {"name": "a.exe", "size": 1}, {}, {"name": "ok.txt"}, too_big):
        r = api.post(f"{api.docs}/uploads", json=body)
        assert r.status_code in (400, 413, 422), body
        assert r.headers["content-type"] == "application/problem+json"
