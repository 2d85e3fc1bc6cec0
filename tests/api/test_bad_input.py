"""Bad input gets a clear problem+json 4xx, and nothing reaches S3."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest

from contracts.keys import training_data_prefix, user_prefix
from tests.conftest import Api, chat_line, keys_under

MAX = 256 * 1024  # MAX_UPLOAD_BYTES of the test API server

BAD_DOCUMENTS = [
    ("bad.jsonl", b'{"messages": [{"role": "user", "content": "hi"}]}\n', "assistant", 1),
    ("bad.jsonl", chat_line("a", "b") + b"{not json\n", "malformed JSON", 2),
    ("bad.jsonl", chat_line("a", "b") + b"[1, 2]\n", "JSON object", 2),
    ("bad.jsonl", b'{"messages": [{"role": "robot", "content": "x"}]}\n', "role", 1),
    ("bad.jsonl", b'{"foo": 1}\n', "messages", 1),
    ("bad.jsonl", b'{"prompt": "p"}\n', "completion", 1),
    ("bad.txt", b"\xff\xfe\x00bad", "UTF-8", None),
    ("bad.txt", b"   \n\n ", "empty", None),
    ("bad.json", b'{"dialog": [{"speaker": "A", "content": "x"}], "speaker": "Z"}', "'Z' does not occur", None),
    ("bad.json", b'{"messages": []}', "dialog", None),
    ("bad.json", b"[1", "malformed JSON", 1),
]


def assert_problem(r, status: int, needle: str = "") -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == status and body["detail"]
    assert "Traceback" not in r.text
    assert needle in body["detail"], body["detail"]
    return body


@pytest.mark.parametrize(("name", "data", "needle", "line"), BAD_DOCUMENTS)
def test_invalid_documents_are_refused_on_every_path(api: Api, s3, name, data, needle, line) -> None:
    body = assert_problem(api.put_doc(name, data), 422, needle)
    assert body.get("line") == line
    assert_problem(api.post(api.docs, files={"file": (name, data)}), 422, needle)
    assert keys_under(s3, user_prefix(api.user_id)) == []


def test_replacing_with_bad_content_keeps_the_old_document(api: Api) -> None:
    good = chat_line("a", "b")
    api.put_doc("keep.jsonl", good, flag=False)
    assert_problem(api.put_doc("keep.jsonl", b"{oops"), 422, "line 1")
    assert api.get(f"{api.docs}/keep.jsonl").content == good
    assert api.get(api.docs).json()["items"][0]["use_for_training"] is False


@pytest.mark.parametrize(
    "name",
    [
        "doc.exe",
        "noext",
        "archive",
        "uploads",
        ".hidden.txt",
        "a..b.txt",
        "sp ace.txt ",
        "x" * 250 + ".txt",
        "tab\t.txt",
        "back\\slash.txt",
    ],
)
def test_bad_document_names(api: Api, s3, name: str) -> None:
    r = api.put(f"{api.docs}/{quote(name)}", content=b"text")
    assert r.status_code in (400, 404, 405, 422), (name, r.status_code)
    assert r.headers["content-type"] == "application/problem+json"
    r = api.post(api.docs, files={"file": (name, b"text")})
    assert r.status_code in (400, 422), name
    assert keys_under(s3, user_prefix(api.user_id)) == []


def test_encoded_slash_cannot_escape_the_prefix(api: Api, s3) -> None:
    for path in (f"{api.docs}/..%2F..%2Fmedia%2Fx.txt", f"{api.docs}/%2e%2e%2fx.txt", f"{api.docs}/a%2Fb.txt"):
        r = api.put(path, content=b"text")
        assert 400 <= r.status_code < 500, path
    r = api.post(api.docs, files={"file": ("../../media/x.txt", b"text")})
    assert r.status_code == 400
    assert keys_under(s3, user_prefix(api.user_id)) == []


@pytest.mark.parametrize("avatar", ["..", ".hidden", "a b", "x" * 200, "semi;colon"])
def test_bad_avatar_ids(api: Api, s3, avatar: str) -> None:
    r = api.put(f"/v1/users/{api.user_id}/avatars/{avatar}/training-data/a.txt", content=b"x")
    assert r.status_code in (400, 404), r.text
    assert keys_under(s3, user_prefix(api.user_id)) == []


def test_oversized_bodies_are_refused(api: Api, s3) -> None:
    big = b"a" * (MAX + 1)
    # The detail names the real limit, whichever upload path refused the body.
    assert_problem(api.put_doc("big.txt", big), 413, f"MAX_UPLOAD_BYTES ({MAX} bytes)")
    assert_problem(api.post(api.docs, files={"file": ("big.txt", big * 2)}), 413, f"MAX_UPLOAD_BYTES ({MAX} bytes)")
    assert_problem(api.post(api.docs, files={"file": ("big.txt", big)}), 413, "MAX_UPLOAD_BYTES")

    def chunked():  # no Content-Length: the cap must hold while streaming
        for _ in range(MAX // 65536 + 2):
            yield b"b" * 65536

    assert_problem(api.put(f"{api.docs}/stream.txt", content=chunked()), 413, "MAX_UPLOAD_BYTES")
    assert keys_under(s3, user_prefix(api.user_id)) == []
    # Exactly at the limit is fine.
    assert api.put_doc("edge.txt", b"a" * MAX).status_code == 201


def test_missing_multipart_file(api: Api) -> None:
    assert_problem(api.post(api.docs, data={"use_for_training": "true"}), 422, "file")
    assert_problem(api.post(api.docs, files={"file": ("a.txt", b"x")}, data={"use_for_training": "nah"}), 422)


def test_unknown_route_is_problem_json(api: Api) -> None:
    assert_problem(api.get("/v1/nothing-here"), 404, "no route")


def test_reserved_prefixes_are_untouched(api: Api, s3) -> None:
    from tests.conftest import TEST_BUCKET

    reserved = [
        f"users/{api.user_id}/avatars/{api.avatar_id}/vectorstore_data/v.bin",
        f"users/{api.user_id}/avatars/{api.avatar_id}/media/m.png",
        f"users/{api.user_id}/vectorstore/v.bin",
        f"users/{api.user_id}/image/i.png",
        f"users/{api.user_id}/avatars/{api.avatar_id}/adapters/training_data/nested/deep.txt",
    ]
    for key in reserved:
        s3.put_object(Bucket=TEST_BUCKET, Key=key, Body=b"x", Tagging="use_for_training=false")
    api.put_doc("a.txt", b"x", flag=False)
    assert [d["name"] for d in api.get(api.docs).json()["items"]] == ["a.txt"]
    assert api.delete(api.docs, params={"use_for_training": "false"}).json() == {"deleted": 1}
    assert sorted(keys_under(s3, user_prefix(api.user_id))) == sorted(reserved)
    assert training_data_prefix(api.user_id, api.avatar_id) in reserved[-1]
    json.dumps(reserved)


# -- found by a property-based fuzz of the OpenAPI and a hostile-input run ----------------------


def test_cursors_that_decode_to_control_characters_are_a_400(api: Api) -> None:
    import base64

    for raw in (b"\x00", b"a\x01b", b"x\x7f"):
        cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        for path in (api.docs, f"{api.base}/context"):
            assert_problem(api.get(path, params={"cursor": cursor}), 400, "invalid cursor")
    assert api.get("/healthz").status_code == 200  # the keep-alive connection survived


def test_oversized_headers_are_a_431(api: Api) -> None:
    for size in (1 << 20, 10 * 1024 * 1024):
        r = api.get(api.docs, headers={"X-Padding": "a" * size})
        assert_problem(r, 431, "MAX_HEADER_BYTES")


def test_oversized_json_bodies_are_refused_before_parsing(api: Api, s3) -> None:
    path = f"{api.base}/training-jobs"
    big = b'{"training_data": [' + b'"x",' * (10 * 1024 * 1024 // 4) + b'"x"]}'
    assert_problem(
        api.post(path, content=big, headers={"Content-Type": "application/json"}), 413, "MAX_JSON_BODY_BYTES"
    )

    def chunks():  # no Content-Length: refused as it streams past the limit
        yield b'{"training_data": ['
        for _ in range(80):
            yield b'"x",' * 25_000
        yield b'"x"]}'

    streamed = api.post(path, content=chunks(), headers={"Content-Type": "application/json"})
    assert_problem(streamed, 413, "MAX_JSON_BODY_BYTES")
    assert keys_under(s3, user_prefix(api.user_id)) == []
    assert api.get("/healthz").status_code == 200


def test_impossible_layer_indices_are_refused_where_they_are_written(api: Api, s3) -> None:
    for body in ({"trainable_layers": [2**63]}, {"trainable_layers": [-1]}, {"trainable_layers": [1024]}):
        body_problem = assert_problem(api.put(f"{api.base}/adapter", json=body), 422)
        assert body_problem["field"].startswith("trainable_layers")
        assert_problem(api.post(f"{api.base}/training-jobs", json=body), 422)
    assert keys_under(s3, user_prefix(api.user_id)) == []


def test_malformed_json_names_no_field(api: Api) -> None:
    r = api.post(f"{api.base}/training-jobs", content=b'{"r": 4,, }', headers={"Content-Type": "application/json"})
    body = assert_problem(r, 422, "not valid JSON")
    assert body.get("field") is None and "character" in body["detail"]


def test_token_env_may_name_only_hub_token_variables(api: Api) -> None:
    for name in ("AWS_SECRET_ACCESS_KEY", "CALLBACK_SEAL_KEY", "hf_token", "HF_TOKEN_"):
        r = api.post(f"{api.base}/training-jobs", json={"base_model": {"name": "x/y", "token_env": name}})
        assert assert_problem(r, 422)["field"] == "base_model.token_env", name
