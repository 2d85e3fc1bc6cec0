"""Context documents, index jobs and retrievals (RAG), API side, over real HTTP against moto.

No trainer runs here: index and retrieve requests stay on private train queues, which the
tests read, and the tests play the trainer by editing job records in S3. Three API servers of
this module's own: AUTO_INDEX off, AUTO_INDEX on, and AUTO_INDEX on with a train queue that
does not exist (every send fails)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest

from contracts.context_documents import DocumentError, parse_context_document
from contracts.job_kinds import parse_train_queue_message
from contracts.keys import context_data_prefix, job_key, jobs_prefix, user_prefix, vectorstore_prefix
from contracts.messages import IndexRequest, RetrieveRequest
from tests.api.test_jobs_api import Server, drain, pointer, record, serve, set_status
from tests.conftest import TEST_BUCKET, Api, keys_under, stop

MAX = 4096  # MAX_UPLOAD_BYTES of this module's servers
AUTO = "Avatune-Auto-Index"
AUTO_JOB = "Avatune-Index-Job"

TXT = b"Lighthouses guide ships.\n\nThe keeper climbs 120 steps.\n"
MD = "# Recipes\n\n* bread: flour, water, salt — bake 40 min\n".encode()
JSONL = (
    json.dumps({"text": "Paris is the capital of France.", "metadata": {"lang": "en", "year": 2024, "ok": True}})
    + "\n\n"
    + json.dumps({"text": "Berlin ist die Hauptstadt.", "metadata": {"lang": "de", "score": 0.5}})
    + "\n"
).encode()


# -- fixtures and helpers --------------------------------------------------------------------


def _server(
    stack, tmp_path_factory: pytest.TempPathFactory, label: str, *, queue_exists: bool = True, **env: str
) -> tuple[object, Server]:
    from infra.bootstrap import StackNames, bootstrap

    tag = uuid.uuid4().hex[:8]
    names = StackNames(
        bucket=TEST_BUCKET, train_queue=f"avatune-ctx-{tag}.fifo", events_queue=f"avatune-ctx-{tag}-events"
    )
    queues = bootstrap(names)
    train_queue = names.train_queue if queue_exists else f"missing-{tag}.fifo"
    proc, url = serve(
        tmp_path_factory.mktemp(label),
        TRAIN_QUEUE_NAME=train_queue,
        EVENTS_QUEUE_NAME=names.events_queue,
        MAX_UPLOAD_BYTES=str(MAX),
        **env,
    )
    return proc, Server(url, queues["train_queue_url"], queues["events_queue_url"])


@pytest.fixture(scope="module")
def plain(stack, tmp_path_factory) -> Iterator[Server]:
    proc, server = _server(stack, tmp_path_factory, "ctx-api", AUTO_INDEX="false")
    try:
        yield server
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def auto(stack, tmp_path_factory) -> Iterator[Server]:
    proc, server = _server(stack, tmp_path_factory, "ctx-api-auto", AUTO_INDEX="true")
    try:
        yield server
    finally:
        stop(proc)


def client(server: Server, user_id: str | None = None) -> Api:
    return Api(server.url, user_id or "u-" + uuid.uuid4().hex[:12], "avatar-1")


@pytest.fixture
def capi(plain: Server) -> Iterator[Api]:
    """A fresh user and avatar on the AUTO_INDEX=false server."""
    with client(plain) as c:
        yield c


def ctx(api: Api) -> str:
    return f"{api.base}/context"


def put(api: Api, name: str, data: bytes) -> httpx.Response:
    return api.put(f"{ctx(api)}/{quote(name)}", content=data)


def assert_problem(r: httpx.Response, status: int, needle: str = "") -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == status and needle in body["detail"], body
    assert "Traceback" not in r.text
    return body


def queued(sqs, server: Server) -> list:
    # the API sends before it answers: one empty receive means nothing more is coming
    return [parse_train_queue_message(m["Body"]) for m in drain(sqs, server.train_queue_url, rounds=1)]


def fake_index(s3, api: Api) -> None:
    """Stand in for an index job's output: something under the user's vector index."""
    s3.put_object(
        Bucket=TEST_BUCKET, Key=vectorstore_prefix(api.user_id) + "chunks.lance/_versions/1.manifest", Body=b"x"
    )


# -- the parser (pure) -----------------------------------------------------------------------


def test_parser_records_offsets_and_metadata() -> None:
    (txt,) = parse_context_document("a.txt", "\ufeff".encode() + TXT)
    assert (txt.text, txt.start_offset, txt.line, txt.metadata) == (TXT.decode(), 0, 1, {})
    first, second = parse_context_document("a.JSONL", JSONL)
    assert first.metadata == {"lang": "en", "year": 2024, "ok": True} and isinstance(first.metadata["ok"], bool)
    assert (second.line, second.index, second.metadata) == (3, 1, {"lang": "de", "score": 0.5})
    assert JSONL.decode()[second.start_offset :].startswith('{"text": "Berlin')
    with pytest.raises(DocumentError) as bad:
        parse_context_document("a.jsonl", JSONL + b'{"text": "x", "metadata": {"a": null}}\n')
    assert bad.value.line == 4 and "metadata.a" in bad.value.message


# -- documents -------------------------------------------------------------------------------


def test_documents_round_trip_in_each_format(capi: Api, plain: Server, s3, sqs) -> None:
    for name, data in (("notes.txt", TXT), ("recipes.md", MD), ("facts.jsonl", JSONL)):
        r = put(capi, name, data)
        assert r.status_code == 201, r.text
        assert AUTO not in r.headers  # AUTO_INDEX is off
        doc = r.json()
        assert (doc["name"], doc["size"]) == (name, len(data)) and doc["etag"]
    assert put(capi, "notes.txt", TXT + b"more\n").status_code == 200  # replaced

    got = capi.get(f"{ctx(capi)}/recipes.md")
    assert got.status_code == 200 and got.content == MD
    assert got.headers["content-type"].startswith("text/markdown")
    assert capi.get(f"{ctx(capi)}/facts.jsonl").headers["content-type"] == "application/jsonl"

    items = capi.get(ctx(capi)).json()
    assert items["next_cursor"] is None
    assert [(d["name"], d["size"], d["content_type"]) for d in items["items"]] == [
        ("facts.jsonl", len(JSONL), "application/jsonl"),
        ("notes.txt", len(TXT) + 5, "text/plain; charset=utf-8"),
        ("recipes.md", len(MD), "text/markdown; charset=utf-8"),
    ]
    prefix = context_data_prefix(capi.user_id, capi.avatar_id)
    assert sorted(keys_under(s3, user_prefix(capi.user_id))) == [
        prefix + "facts.jsonl",
        prefix + "notes.txt",
        prefix + "recipes.md",
    ]
    assert not s3.get_object_tagging(Bucket=TEST_BUCKET, Key=prefix + "notes.txt")["TagSet"]  # no use_for_training

    r = capi.delete(f"{ctx(capi)}/notes.txt")
    assert r.status_code == 204 and AUTO not in r.headers
    assert_problem(capi.get(f"{ctx(capi)}/notes.txt"), 404, "notes.txt")
    assert_problem(capi.delete(f"{ctx(capi)}/notes.txt"), 404, "notes.txt")
    assert [d["name"] for d in capi.get(ctx(capi)).json()["items"]] == ["facts.jsonl", "recipes.md"]
    assert queued(sqs, plain) == []  # documents alone never queue jobs without AUTO_INDEX
    assert keys_under(s3, jobs_prefix(capi.user_id, capi.avatar_id)) == []


def test_listing_pages_with_cursor(capi: Api, s3) -> None:
    names = [f"doc-{i}.txt" for i in range(5)]
    for name in names:
        assert put(capi, name, b"text of " + name.encode()).status_code == 201
    # a nested key under the prefix is not a document
    s3.put_object(Bucket=TEST_BUCKET, Key=context_data_prefix(capi.user_id, capi.avatar_id) + "sub/x.txt", Body=b"x")
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = capi.get(ctx(capi), params=params).json()
        pages += 1
        seen += [d["name"] for d in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == names and pages == 3
    assert_problem(capi.get(ctx(capi), params={"cursor": "not-ours!"}), 400, "cursor")
    assert capi.get(ctx(capi), params={"limit": 0}).status_code == 422


BAD_DOCUMENTS = [
    ("bad.jsonl", JSONL + b"{not json\n", "malformed JSON", 4),
    ("bad.jsonl", b'{"text": "ok"}\n[1, 2]\n', "JSON object", 2),
    ("bad.jsonl", b'{"metadata": {"a": 1}}\n', "text", 1),
    ("bad.jsonl", b'{"text": "  "}\n', "must not be empty", 1),
    ("bad.jsonl", b'{"text": 5}\n', "text", 1),
    ("bad.jsonl", b'{"text": "x", "meta": {}}\n', "meta", 1),
    ("bad.jsonl", b'{"text": "x", "metadata": {"bad-key": 1}}\n', "bad-key", 1),
    ("bad.jsonl", b'{"text": "x"}\n{"text": "y", "metadata": {"a": {"b": 1}}}\n', "metadata.a", 2),
    ("bad.jsonl", b'{"text": "x", "metadata": {"a": [1]}}\n', "metadata.a", 1),
    ("bad.jsonl", b"\n\n", "empty", None),
    ("bad.txt", b"\xff\xfe\x00bad", "UTF-8", None),
    ("bad.txt", b"", "empty", None),
    ("bad.md", b"  \n\n\t", "empty", None),
]


@pytest.mark.parametrize(("name", "data", "needle", "line"), BAD_DOCUMENTS)
def test_invalid_documents_are_refused_and_nothing_stored(capi: Api, s3, name, data, needle, line) -> None:
    body = assert_problem(put(capi, name, data), 422, needle)
    assert body.get("line") == line and body["title"] == "Invalid context document"
    assert keys_under(s3, user_prefix(capi.user_id)) == []


def test_bad_content_keeps_the_old_document_and_oversize_is_refused(capi: Api, s3) -> None:
    assert put(capi, "keep.md", MD).status_code == 201
    assert_problem(put(capi, "keep.md", b" "), 422, "empty")
    assert_problem(put(capi, "keep.md", b"x" * (MAX + 1)), 413, "context/uploads")
    # a chunked body (no Content-Length) is cut off at the cap just the same
    chunked = capi.put(f"{ctx(capi)}/keep.md", content=iter([b"y" * 1024] * 5))
    assert_problem(chunked, 413, "MAX_UPLOAD_BYTES")
    assert capi.get(f"{ctx(capi)}/keep.md").content == MD
    assert put(capi, "edge.txt", b"z" * MAX).status_code == 201  # exactly the cap is fine
    assert sorted(keys_under(s3, user_prefix(capi.user_id))) == [
        context_data_prefix(capi.user_id, capi.avatar_id) + n for n in ("edge.txt", "keep.md")
    ]


@pytest.mark.parametrize(
    "name",
    [
        "doc.exe",
        "dialog.json",
        "noext",
        ".hidden.md",
        "a..b.txt",
        "sp ace.md ",
        "x" * 250 + ".txt",
        "tab\t.txt",
        "back\\slash.txt",
        "../escape.txt",
        "..%2F..%2Fother%2Favatars%2Fa%2Fx.txt",
    ],
)
def test_bad_names_are_refused_everywhere(capi: Api, s3, name: str) -> None:
    path = f"{ctx(capi)}/{quote(name, safe='%')}"
    r = capi.put(path, content=b"text")
    assert r.status_code in (400, 404, 405), (name, r.status_code, r.text)
    assert r.headers["content-type"] == "application/problem+json"
    for method in ("GET", "DELETE"):
        assert capi.request(method, path).status_code in (400, 404, 405)
    up = capi.post(f"{ctx(capi)}/uploads", json={"name": name, "size": 4})
    assert_problem(up, 400)
    assert keys_under(s3, user_prefix(capi.user_id)) == []


def test_other_tenants_documents_are_out_of_reach(plain: Server, s3) -> None:
    with client(plain) as owner, client(plain) as intruder:
        assert put(owner, "private.txt", TXT).status_code == 201
        foreign = f"/v1/users/{owner.user_id}/avatars/{owner.avatar_id}/context"
        for r in (
            intruder.get(foreign),
            intruder.get(f"{foreign}/private.txt"),
            intruder.put(f"{foreign}/evil.txt", content=b"x"),
            intruder.delete(f"{foreign}/private.txt"),
            intruder.post(f"{foreign}/uploads", json={"name": "evil.txt", "size": 1}),
            intruder.post(f"{foreign}/index"),
            intruder.post(f"/v1/users/{owner.user_id}/avatars/{owner.avatar_id}/retrievals", json={"query": "q"}),
        ):
            assert_problem(r, 403)
        assert keys_under(s3, user_prefix(owner.user_id)) == [
            context_data_prefix(owner.user_id, owner.avatar_id) + "private.txt"
        ]
        assert keys_under(s3, user_prefix(intruder.user_id)) == []


def test_presigned_upload_for_large_documents(capi: Api) -> None:
    big = JSONL * (MAX // len(JSONL) + 2)
    assert len(big) > MAX
    r = capi.post(f"{ctx(capi)}/uploads", json={"name": "big.jsonl", "size": len(big)})
    assert r.status_code == 200, r.text
    up = r.json()
    assert set(up) == {"url", "headers", "expires_at"}
    assert up["headers"] == {"Content-Type": "application/jsonl", "Content-Length": str(len(big))}
    assert {"content-type", "content-length"} <= set(httpx.URL(up["url"]).params["X-Amz-SignedHeaders"].split(";"))
    assert httpx.put(up["url"], content=big, headers=up["headers"]).status_code == 200
    assert [(d["name"], d["size"]) for d in capi.get(ctx(capi)).json()["items"]] == [("big.jsonl", len(big))]
    assert capi.get(f"{ctx(capi)}/big.jsonl").content == big
    for body in ({"name": "a.exe", "size": 1}, {}, {"name": "ok.txt", "size": 1, "use_for_training": True}):
        r = capi.post(f"{ctx(capi)}/uploads", json=body)
        assert r.status_code in (400, 422) and r.headers["content-type"] == "application/problem+json", body


# -- index jobs ------------------------------------------------------------------------------


def test_index_job_is_queued_with_its_parameters(capi: Api, plain: Server, s3, sqs) -> None:
    index = f"{ctx(capi)}/index"
    assert_problem(capi.post(index), 409, "no context documents")
    assert queued(sqs, plain) == [] and keys_under(s3, user_prefix(capi.user_id)) == []

    assert put(capi, "facts.jsonl", JSONL).status_code == 201
    for bad in (
        {"chunk_size": 10},
        {"chunk_size": 100, "chunk_overlap": 100},
        {"chunk_overlap": -1},
        {"full": "yes"},
        {"chunk_size": 256, "extra": 1},
    ):
        assert_problem(capi.post(index, json=bad), 422)
    assert queued(sqs, plain) == []

    r = capi.post(index, json={"chunk_size": 256, "chunk_overlap": 32, "full": True}, headers={"Idempotency-Key": "k1"})
    assert r.status_code == 202, r.text
    job = r.json()
    params = {"chunk_size": 256, "chunk_overlap": 32, "full": True}
    assert (job["type"], job["status"], job["request"], job["result"]) == ("index", "queued", params, None)
    assert capi.get(f"{capi.base}/training-jobs/{job['id']}").json() == job
    rec = record(s3, capi, job["id"])
    assert (rec.type, rec.source, rec.request) == ("index", "api", params)
    assert pointer(s3, capi) == job["id"]

    (message,) = queued(sqs, plain)
    assert isinstance(message, IndexRequest)
    assert (message.job_id, message.user_id, message.avatar_id, message.origin) == (
        job["id"],
        capi.user_id,
        capi.avatar_id,
        "api",
    )
    assert (message.chunk_size, message.chunk_overlap, message.full) == (256, 32, True)

    again = capi.post(
        index, json={"full": True, "chunk_overlap": 32, "chunk_size": 256}, headers={"Idempotency-Key": "k1"}
    )
    assert again.status_code == 202 and again.json()["id"] == job["id"]  # same key and request: same job
    assert_problem(capi.post(index, json={"chunk_size": 256}, headers={"Idempotency-Key": "k1"}), 422, job["id"])
    assert_problem(capi.post(index), 409, job["id"])  # the avatar's slot is taken
    assert queued(sqs, plain) == []

    # Once it ended, an avatar without documents may still re-index (to drop deleted chunks)
    # when the user has an index; with defaults the request carries no chunk parameters.
    set_status(s3, capi, job["id"], "succeeded")
    assert capi.delete(f"{ctx(capi)}/facts.jsonl").status_code == 204
    assert_problem(capi.post(index), 409, "no context documents")
    fake_index(s3, capi)
    second = capi.post(index)
    assert second.status_code == 202, second.text
    assert second.json()["request"] == {"chunk_size": None, "chunk_overlap": None, "full": False}
    (message,) = queued(sqs, plain)
    assert isinstance(message, IndexRequest) and message.job_id == second.json()["id"]


# -- retrievals ------------------------------------------------------------------------------


def test_retrieval_is_queued_with_query_and_filters(capi: Api, plain: Server, s3, sqs) -> None:
    url = f"{capi.base}/retrievals"
    assert_problem(capi.post(url, json={"query": "capital of France?"}), 409, "no vector index")
    fake_index(s3, capi)
    for bad in (
        {},
        {"query": ""},
        {"query": "   "},
        {"query": "q", "top_k": 0},
        {"query": "q", "top_k": 101},
        {"query": "q", "score_threshold": 2},
        {"query": "q", "filters": {"bad-key": 1}},
        {"query": "q", "filters": {"a": {"b": 1}}},
        {"query": "q", "filters": {"a": None}},
        {"query": "q", "filters": {f"k{i}": i for i in range(17)}},
        {"query": "q", "k": 3},
        {"query": "x" * 10_001},
    ):
        assert_problem(capi.post(url, json=bad), 422)
    assert queued(sqs, plain) == []

    r = capi.post(
        url,
        json={
            "query": "capital of France?",
            "score_threshold": 0.25,
            "filters": {"lang": "en", "year": 2024, "ok": True},
        },
    )
    assert r.status_code == 202, r.text
    job = r.json()
    expected = {
        "query": "capital of France?",
        "top_k": 5,
        "score_threshold": 0.25,
        "filters": {"lang": "en", "year": 2024, "ok": True},
    }
    assert (job["type"], job["status"], job["request"]) == ("retrieve", "queued", expected)
    rec = record(s3, capi, job["id"])
    assert rec.type == "retrieve" and rec.request == expected
    (message,) = queued(sqs, plain)
    assert isinstance(message, RetrieveRequest) and message.job_id == job["id"]
    assert (message.query, message.top_k, message.score_threshold) == ("capital of France?", 5, 0.25)
    # types survive the queue: a bool filter stays a bool, an int an int
    assert message.filters == {"lang": "en", "year": 2024, "ok": True}
    assert type(message.filters["ok"]) is bool and type(message.filters["year"]) is int

    # the trainer's answer shows on the job
    rec = record(s3, capi, job["id"])
    rec.status, rec.result = "succeeded", {"passages": [{"text": "Paris is the capital of France.", "score": 0.9}]}
    s3.put_object(Bucket=TEST_BUCKET, Key=job_key(capi.user_id, capi.avatar_id, job["id"]), Body=rec.to_json())
    shown = capi.get(f"{capi.base}/training-jobs/{job['id']}").json()
    assert shown["status"] == "succeeded" and shown["result"]["passages"][0]["score"] == 0.9


# -- AUTO_INDEX ------------------------------------------------------------------------------


def test_auto_index_queues_on_change_and_never_fails_the_change(auto: Server, s3, sqs) -> None:
    with client(auto) as api:
        r = put(api, "notes.txt", TXT)
        assert r.status_code == 201 and r.headers[AUTO] == "queued", r.headers
        first = r.headers[AUTO_JOB]
        (message,) = queued(sqs, auto)
        assert isinstance(message, IndexRequest) and message.job_id == first and message.full is False
        assert record(s3, api, first).type == "index"

        # the queued index job lists documents when it starts: this change is covered
        r = put(api, "more.md", MD)
        assert (r.status_code, r.headers[AUTO], r.headers[AUTO_JOB]) == (201, "pending", first)
        # once it runs, a change is not covered: skipped, and the running job named
        set_status(s3, api, first, "running")
        r = api.delete(f"{ctx(api)}/more.md")
        assert (r.status_code, r.headers[AUTO], r.headers[AUTO_JOB]) == (204, "skipped", first)
        assert queued(sqs, auto) == []

        # after it ended, a delete queues the next index job
        set_status(s3, api, first, "succeeded")
        r = api.delete(f"{ctx(api)}/notes.txt")
        assert r.status_code == 204 and r.headers[AUTO] == "queued" and r.headers[AUTO_JOB] != first
        (message,) = queued(sqs, auto)
        assert message.job_id == r.headers[AUTO_JOB]

        # a refused upload queues nothing
        set_status(s3, api, message.job_id, "succeeded")
        assert_problem(put(api, "bad.jsonl", b"{oops\n"), 422, "line 1")
        assert queued(sqs, auto) == []


def test_auto_index_failure_keeps_the_upload(stack, tmp_path_factory, s3) -> None:
    proc, broken = _server(stack, tmp_path_factory, "ctx-api-noqueue", queue_exists=False, AUTO_INDEX="true")
    try:
        with client(broken) as api:
            r = put(api, "notes.txt", TXT)
            assert r.status_code == 201 and r.headers[AUTO] == "failed" and AUTO_JOB not in r.headers
            assert api.get(f"{ctx(api)}/notes.txt").content == TXT
            # the job that could not be queued was rolled back
            assert keys_under(s3, jobs_prefix(api.user_id, api.avatar_id)) == []
            assert pointer(s3, api) is None
    finally:
        stop(proc)
