"""The training-jobs API over real HTTP against moto in server mode. No trainer runs here:
train requests stay on the queue, and the tests play the trainer by editing records in S3.

Tests that read queues use an API server of their own (module scope, one per xdist worker)
with private train and events queues, so they never see or disturb another test's messages."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from contracts.adapters import ActiveJobPointer, IdempotencyRecord
from contracts.jobs import JobRecord, new_job_id, utcnow
from contracts.keys import (
    active_job_key,
    adapter_prefix,
    idempotency_key,
    job_key,
    training_data_prefix,
    user_prefix,
)
from contracts.messages import JobEvent, TrainRequest
from tests.conftest import ROOT, TEST_BUCKET, Api, chat_line, free_port, keys_under, stop, wait_http

CHAT = chat_line("How was the trip?", "Long, but the food was great.")
VIEW_FIELDS = {
    "id",
    "type",
    "status",
    "created_at",
    "updated_at",
    "started_at",
    "finished_at",
    "avatar_id",
    "config",
    "progress",
    "metrics",
    "error",
    "adapter_version",
    "data",
    "cancel_requested",
    "attempts",
    "failures",
    "spec",
    "request",
    "result",
    "links",
}


# -- fixtures and helpers --------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    url: str
    train_queue_url: str
    events_queue_url: str


def serve(tmp: Path, **env: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(tmp / f"api-{port}.log", "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "handlers.app:app", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=dict(os.environ, **env),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthz", proc)
    return proc, url


@pytest.fixture(scope="module")
def private(stack: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """An API with train and events queues no other test uses."""
    from infra.bootstrap import StackNames, bootstrap

    tag = uuid.uuid4().hex[:8]
    names = StackNames(
        bucket=TEST_BUCKET, train_queue=f"avatune-test-{tag}.fifo", events_queue=f"avatune-test-{tag}-events"
    )
    queues = bootstrap(names)
    proc, url = serve(
        tmp_path_factory.mktemp("private-api"), TRAIN_QUEUE_NAME=names.train_queue, EVENTS_QUEUE_NAME=names.events_queue
    )
    try:
        yield Server(url, queues["train_queue_url"], queues["events_queue_url"])
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def no_queue(stack: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An API whose train queue does not exist: every send fails."""
    proc, url = serve(tmp_path_factory.mktemp("no-queue-api"), TRAIN_QUEUE_NAME=f"missing-{uuid.uuid4().hex[:8]}.fifo")
    try:
        yield url
    finally:
        stop(proc)


@pytest.fixture
def papi(private: Server) -> Iterator[Api]:
    """A fresh user and avatar on the private server."""
    with Api(private.url, "u-" + uuid.uuid4().hex[:12], "avatar-1") as client:
        yield client


def drain(sqs, queue_url: str, rounds: int = 2) -> list[dict]:
    """Every message on a private queue (deleted once read)."""
    messages: list[dict] = []
    empty = 0
    while empty < rounds:
        resp = sqs.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=1,
            AttributeNames=["All"],
            MessageSystemAttributeNames=["All"],
        )
        batch = resp.get("Messages", [])
        empty = 0 if batch else empty + 1
        for m in batch:
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=m["ReceiptHandle"])
        messages += batch
    return messages


def ready(api: Api) -> None:
    assert api.put_doc("chat.jsonl", CHAT).status_code == 201


def start(api: Api, **kwargs) -> dict:
    r = api.post(f"{api.base}/training-jobs", **kwargs)
    assert r.status_code == 202, r.text
    return r.json()


def cancel(api: Api, job_id: str) -> httpx.Response:
    return api.post(f"{api.base}/training-jobs/{job_id}/cancel")


def record(s3, api: Api, job_id: str) -> JobRecord:
    body = s3.get_object(Bucket=TEST_BUCKET, Key=job_key(api.user_id, api.avatar_id, job_id))["Body"].read()
    return JobRecord.model_validate_json(body)


def set_status(s3, api: Api, job_id: str, status: str) -> None:
    """Play the trainer: change the record's status in S3."""
    rec = record(s3, api, job_id)
    rec.status = status  # type: ignore[assignment]
    if status == "running":
        rec.started_at = utcnow()
    s3.put_object(Bucket=TEST_BUCKET, Key=job_key(api.user_id, api.avatar_id, job_id), Body=rec.to_json())


def pointer(s3, api: Api) -> str | None:
    try:
        body = s3.get_object(Bucket=TEST_BUCKET, Key=active_job_key(api.user_id, api.avatar_id))["Body"].read()
    except s3.exceptions.NoSuchKey:
        return None
    return ActiveJobPointer.model_validate_json(body).job_id


def state_keys(s3, api: Api) -> list[str]:
    """Every key of the avatar's adapter prefix but its training documents."""
    data = training_data_prefix(api.user_id, api.avatar_id)
    return [k for k in keys_under(s3, adapter_prefix(api.user_id, api.avatar_id)) if not k.startswith(data)]


# -- creating jobs ---------------------------------------------------------------------------


def test_create_answers_queued_job_and_sends_train_request(papi: Api, private: Server, s3, sqs) -> None:
    ready(papi)
    job = start(papi, json={"r": 8, "num_epochs": 1})
    assert set(job) == VIEW_FIELDS
    assert job["status"] == "queued" and job["type"] == "train" and job["avatar_id"] == papi.avatar_id
    assert job["config"] == {"r": 8, "num_epochs": 1}
    assert job["progress"]["step"] == 0 and job["cancel_requested"] is False and job["finished_at"] is None
    assert papi.get(f"{papi.base}/training-jobs/{job['id']}").json() == job

    rec = record(s3, papi, job["id"])
    assert (rec.status, rec.source, rec.config.r, rec.user_id) == ("queued", "api", 8, papi.user_id)
    assert pointer(s3, papi) == job["id"]

    messages = drain(sqs, private.train_queue_url)
    assert len(messages) == 1
    message = messages[0]
    req = TrainRequest.model_validate_json(message["Body"])
    assert (req.job_id, req.user_id, req.avatar_id, req.config.r) == (job["id"], papi.user_id, papi.avatar_id, 8)
    assert message["Attributes"]["MessageGroupId"] == req.message_group_id() == f"{papi.user_id}/{papi.avatar_id}"
    assert message["Attributes"]["MessageDeduplicationId"] == job["id"]


def test_create_without_or_with_empty_body(api: Api, api_url: str) -> None:
    ready(api)
    assert start(api)["config"] == {}
    with Api(api_url, api.user_id, "avatar-2") as other:
        ready(other)
        job = start(other, content=b"", headers={"content-type": "application/json"})
        assert job["config"] == {}
    with Api(api_url, api.user_id, "avatar-3") as third:
        ready(third)
        assert start(third, json={})["config"] == {}


@pytest.mark.parametrize(
    "body", [{"r": 0}, {"lora_dropout": 1}, {"unknown": 1}, {"method": "sgd"}, [1]], ids=lambda b: json.dumps(b)
)
def test_create_refuses_invalid_overrides(api: Api, s3, body) -> None:
    ready(api)
    r = api.post(f"{api.base}/training-jobs", json=body)
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert state_keys(s3, api) == []


def test_create_needs_a_flagged_document_and_writes_nothing(papi: Api, private: Server, s3, sqs) -> None:
    assert papi.put_doc("unused.jsonl", CHAT, flag=False).status_code == 201
    assert papi.put_doc("notes.txt", b"notes", flag=False).status_code == 201
    r = papi.post(f"{papi.base}/training-jobs", headers={"Idempotency-Key": "k1"})
    assert r.status_code == 409 and r.headers["content-type"] == "application/problem+json"
    assert "use_for_training" in r.json()["detail"]
    assert state_keys(s3, papi) == []
    assert drain(sqs, private.train_queue_url, rounds=1) == []
    assert papi.get(f"{papi.base}/training-jobs").json() == {"items": [], "next_cursor": None}


def test_second_job_of_an_avatar_is_409_naming_the_active_one(api: Api, s3) -> None:
    ready(api)
    first = start(api)
    r = api.post(f"{api.base}/training-jobs", json={"r": 4})
    assert r.status_code == 409, r.text
    problem = r.json()
    assert problem["active_job_id"] == first["id"] and first["id"] in problem["detail"]
    assert [j["id"] for j in api.get(f"{api.base}/training-jobs").json()["items"]] == [first["id"]]
    set_status(s3, api, first["id"], "running")
    assert api.post(f"{api.base}/training-jobs").json()["active_job_id"] == first["id"]


def test_idempotency_key_answers_the_same_job_and_sends_once(papi: Api, private: Server, s3, sqs) -> None:
    ready(papi)
    key = {"Idempotency-Key": "create-" + uuid.uuid4().hex}
    first = start(papi, headers=key, json={"r": 4})
    again = start(papi, headers=key, json={"r": 4})
    assert again["id"] == first["id"]
    # The same body with its keys reordered and spaced differently is the same request.
    assert start(papi, headers={**key, "content-type": "application/json"}, content=b'{ "r" : 4 }')["id"] == first["id"]
    # Still the same job once it has ended.
    set_status(s3, papi, first["id"], "succeeded")
    assert start(papi, headers=key, json={"r": 4})["id"] == first["id"]
    messages = drain(sqs, private.train_queue_url)
    assert [TrainRequest.model_validate_json(m["Body"]).job_id for m in messages] == [first["id"]]
    # Another key is another job.
    other = start(papi, headers={"Idempotency-Key": "other"})
    assert other["id"] != first["id"]
    assert len(drain(sqs, private.train_queue_url)) == 1


def test_idempotency_key_reused_for_another_request_is_422(papi: Api, private: Server, s3, sqs) -> None:
    ready(papi)
    key = {"Idempotency-Key": "reuse-" + uuid.uuid4().hex}
    first = start(papi, headers=key, json={"r": 4})
    set_status(s3, papi, first["id"], "succeeded")  # the slot is free: only the key stands in the way
    before = state_keys(s3, papi)
    for other in ({"json": {"r": 8}}, {}):  # another body, no body
        r = papi.post(f"{papi.base}/training-jobs", headers=key, **other)
        assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json", r.text
        assert r.json()["job_id"] == first["id"] and "different request" in r.json()["detail"]
    # The same key on another route is another request too.
    r = papi.post(f"{papi.base}/fuse-jobs", headers=key, json={"adapter_version": 1})
    assert r.status_code == 422 and "different request" in r.json()["detail"], r.text
    assert state_keys(s3, papi) == before
    assert [TrainRequest.model_validate_json(m["Body"]).job_id for m in drain(sqs, private.train_queue_url)] == [
        first["id"]
    ]


def test_request_fingerprint_is_canonical_and_leaves_the_auth_header_out() -> None:
    from handlers.idempotency import request_fingerprint

    path = "/v1/users/u/avatars/a/training-jobs"
    base = request_fingerprint("POST", path, b'{"r": 4, "callbacks": {"webhook_url": "https://x", "auth_header": "A"}}')
    assert base == request_fingerprint(
        "POST", path, b'{"callbacks":{"auth_header":"B","webhook_url":"https://x"},"r":4}'
    )
    assert base != request_fingerprint(
        "POST", path, b'{"r": 4, "callbacks": {"webhook_url": "https://y", "auth_header": "A"}}'
    )
    assert base != request_fingerprint(
        "POST",
        path.replace("training-jobs", "fuse-jobs"),
        b'{"r": 4, "callbacks": {"webhook_url": "https://x", "auth_header": "A"}}',
    )
    # No body, null and {} are all "no body" to the routes.
    empty = request_fingerprint("POST", path, b"")
    assert empty == request_fingerprint("POST", path, b"  ") == request_fingerprint("POST", path, b"{ }")
    assert empty == request_fingerprint("POST", path, b"null") != request_fingerprint("POST", path, b'{"r": 4}')


def test_idempotency_key_expires_after_its_ttl(api: Api, s3) -> None:
    ready(api)
    key = "ttl-" + uuid.uuid4().hex
    first = start(api, headers={"Idempotency-Key": key})
    set_status(s3, api, first["id"], "succeeded")
    stored = idempotency_key(api.user_id, api.avatar_id, hashlib.sha256(key.encode()).hexdigest())
    # The record carries the tag the bucket's lifecycle rule expires it by.
    tags = s3.get_object_tagging(Bucket=TEST_BUCKET, Key=stored)["TagSet"]
    assert tags == [{"Key": "avatune-record", "Value": "idempotency"}]
    # A day and an hour later (IDEMPOTENCY_KEY_TTL_HOURS defaults to 24) the key is free again.
    old = IdempotencyRecord.model_validate_json(s3.get_object(Bucket=TEST_BUCKET, Key=stored)["Body"].read())
    old.created_at -= timedelta(hours=23)
    s3.put_object(Bucket=TEST_BUCKET, Key=stored, Body=old.model_dump_json().encode())
    assert start(api, headers={"Idempotency-Key": key})["id"] == first["id"]  # 23 hours: still answered
    old.created_at -= timedelta(hours=2)
    s3.put_object(Bucket=TEST_BUCKET, Key=stored, Body=old.model_dump_json().encode())
    second = start(api, headers={"Idempotency-Key": key}, json={"r": 8})  # even with another body
    assert second["id"] != first["id"]
    renewed = IdempotencyRecord.model_validate_json(s3.get_object(Bucket=TEST_BUCKET, Key=stored)["Body"].read())
    assert renewed.job_id == second["id"]
    assert start(api, headers={"Idempotency-Key": key}, json={"r": 8})["id"] == second["id"]


def test_idempotency_key_length(api: Api, s3) -> None:
    ready(api)
    r = api.post(f"{api.base}/training-jobs", headers={"Idempotency-Key": "k" * 256})
    assert r.status_code == 400 and r.headers["content-type"] == "application/problem+json"
    assert state_keys(s3, api) == []
    assert start(api, headers={"Idempotency-Key": "k" * 255})["status"] == "queued"


def test_user_cap_is_429_with_retry_after(api_url: str, s3) -> None:
    user = "u-" + uuid.uuid4().hex[:12]
    avatars = [Api(api_url, user, f"av-{i}") for i in range(5)]
    try:
        for a in avatars:
            ready(a)
        jobs = [start(a) for a in avatars[:4]]  # MAX_ACTIVE_JOBS_PER_USER defaults to 4
        set_status(s3, avatars[0], jobs[0]["id"], "running")  # running counts as active too
        fifth = avatars[4]
        r = fifth.post(f"{fifth.base}/training-jobs", headers={"Idempotency-Key": "five"})
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"] == "60" and r.headers["content-type"] == "application/problem+json"
        assert state_keys(s3, fifth) == []
        # One ends: there is room again.
        assert cancel(avatars[1], jobs[1]["id"]).status_code == 202
        assert start(fifth, headers={"Idempotency-Key": "five"})["status"] == "queued"
        assert fifth.post(f"{avatars[1].base}/training-jobs").status_code == 429
        # A finished job whose pointer was left behind does not count.
        set_status(s3, avatars[2], jobs[2]["id"], "failed")
        assert start(avatars[1])["status"] == "queued"
    finally:
        for a in avatars:
            a.close()


def test_concurrent_creates_on_one_avatar_make_one_job(api: Api, s3) -> None:
    ready(api)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: api.post(f"{api.base}/training-jobs"), range(8)))
    accepted = [r.json()["id"] for r in answers if r.status_code == 202]
    assert len(accepted) == 1, [r.text for r in answers]
    assert all(
        r.status_code == 409 and r.json()["active_job_id"] == accepted[0] for r in answers if r.status_code != 202
    )
    assert [j["id"] for j in api.get(f"{api.base}/training-jobs").json()["items"]] == accepted
    assert pointer(s3, api) == accepted[0]


def test_concurrent_retries_with_one_idempotency_key_make_one_job(api: Api) -> None:
    ready(api)
    headers = {"Idempotency-Key": "retry-storm"}
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: api.post(f"{api.base}/training-jobs", headers=headers), range(6)))
    # A retry that races the first request may see its slot before its key (409); none makes a second job.
    assert {r.status_code for r in answers} <= {202, 409}
    jobs = api.get(f"{api.base}/training-jobs").json()["items"]
    assert len(jobs) == 1
    assert all(r.json()["id"] == jobs[0]["id"] for r in answers if r.status_code == 202)
    assert all(r.json()["active_job_id"] == jobs[0]["id"] for r in answers if r.status_code == 409)
    assert start(api, headers=headers)["id"] == jobs[0]["id"]


def test_concurrent_creates_across_avatars_never_pass_the_cap(api_url: str, s3) -> None:
    user = "u-" + uuid.uuid4().hex[:12]
    avatars = [Api(api_url, user, f"av-{i}") for i in range(7)]
    try:
        for a in avatars:
            ready(a)
        with ThreadPoolExecutor(len(avatars)) as pool:
            answers = list(pool.map(lambda a: a.post(f"{a.base}/training-jobs"), avatars))
        assert {r.status_code for r in answers} <= {202, 429}, [r.text for r in answers]
        accepted = [a for a, r in zip(avatars, answers, strict=True) if r.status_code == 202]
        assert len(accepted) <= 4
        assert sorted(a.avatar_id for a in avatars if pointer(s3, a)) == sorted(a.avatar_id for a in accepted)
    finally:
        for a in avatars:
            a.close()


def test_pointer_to_a_finished_job_is_stale(api: Api, s3) -> None:
    ready(api)
    first = start(api)
    set_status(s3, api, first["id"], "succeeded")  # the trainer died before clearing the pointer
    assert pointer(s3, api) == first["id"]
    second = start(api)
    assert second["id"] != first["id"] and pointer(s3, api) == second["id"]


def test_pointer_without_a_job_record_is_in_flight_then_stale(api: Api, s3) -> None:
    ready(api)
    key = active_job_key(api.user_id, api.avatar_id)
    young = ActiveJobPointer(job_id=new_job_id())  # another request is still writing its job
    s3.put_object(Bucket=TEST_BUCKET, Key=key, Body=young.model_dump_json())
    r = api.post(f"{api.base}/training-jobs")
    assert r.status_code == 409 and r.json()["active_job_id"] == young.job_id
    old = ActiveJobPointer(job_id=new_job_id(), created_at=utcnow() - timedelta(hours=1))  # its request died
    s3.put_object(Bucket=TEST_BUCKET, Key=key, Body=old.model_dump_json())
    assert pointer(s3, api) == old.job_id
    job = start(api)
    assert pointer(s3, api) == job["id"]


def test_failure_to_queue_rolls_everything_back(no_queue: str, api_url: str, s3) -> None:
    user = "u-" + uuid.uuid4().hex[:12]
    with Api(no_queue, user, "avatar-1") as broken, Api(api_url, user, "avatar-1") as working:
        ready(broken)
        before = keys_under(s3, user_prefix(user))
        r = broken.post(f"{broken.base}/training-jobs", headers={"Idempotency-Key": "same"}, json={"r": 4})
        assert r.status_code == 503, r.text
        assert r.headers["content-type"] == "application/problem+json" and "retry-after" in r.headers
        assert keys_under(s3, user_prefix(user)) == before
        # Nothing was left holding the avatar or the key.
        job = start(working, headers={"Idempotency-Key": "same"})
        assert job["status"] == "queued" and pointer(s3, working) == job["id"]
        assert s3.head_object(
            Bucket=TEST_BUCKET, Key=idempotency_key(user, "avatar-1", hashlib.sha256(b"same").hexdigest())
        )


# -- reading jobs ----------------------------------------------------------------------------


def test_get_job_404_and_400(api: Api) -> None:
    for job_id, code in (("job-missing", 404), ("bad..id", 400), ("-x", 400), ("x" * 129, 400)):
        for r in (api.get(f"{api.base}/training-jobs/{job_id}"), cancel(api, job_id)):
            assert r.status_code == code, (job_id, r.text)
            assert r.headers["content-type"] == "application/problem+json"


def test_list_pages_newest_first(api: Api) -> None:
    ready(api)
    created = []
    for _ in range(5):
        job = start(api)
        assert cancel(api, job["id"]).status_code == 202
        created.append(job["id"])
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        body = api.get(f"{api.base}/training-jobs", params=params).json()
        seen += [j["id"] for j in body["items"]]
        assert all(set(j) == VIEW_FIELDS for j in body["items"])
        pages += 1
        cursor = body["next_cursor"]
        if not cursor:
            break
    assert seen == created[::-1] and pages == 3
    everything = api.get(f"{api.base}/training-jobs").json()
    assert [j["id"] for j in everything["items"]] == created[::-1] and everything["next_cursor"] is None
    assert [j["status"] for j in everything["items"]] == ["cancelled"] * 5
    for params in ({"limit": 0}, {"limit": 101}, {"cursor": "!!!"}, {"cursor": "bm90LWEtY3Vyc29y"}):
        r = api.get(f"{api.base}/training-jobs", params=params)
        assert r.status_code in (400, 422), params
        assert r.headers["content-type"] == "application/problem+json"


def test_user_jobs_across_avatars(api: Api, api_url: str) -> None:
    ready(api)
    with Api(api_url, api.user_id, "avatar-2") as other:
        ready(other)
        a1 = start(api)
        cancel(api, a1["id"])
        b1 = start(other)
        a2 = start(api)
        url = f"/v1/users/{api.user_id}/training-jobs"
        body = api.get(url).json()
        assert [(j["id"], j["avatar_id"]) for j in body["items"]] == [
            (a2["id"], "avatar-1"),
            (b1["id"], "avatar-2"),
            (a1["id"], "avatar-1"),
        ]
        page1 = api.get(url, params={"limit": 2}).json()
        assert [j["id"] for j in page1["items"]] == [a2["id"], b1["id"]] and page1["next_cursor"]
        page2 = api.get(url, params={"limit": 2, "cursor": page1["next_cursor"]}).json()
        assert [j["id"] for j in page2["items"]] == [a1["id"]] and page2["next_cursor"] is None
        # The avatar-level list holds only that avatar's jobs.
        assert [j["id"] for j in other.get(f"{other.base}/training-jobs").json()["items"]] == [b1["id"]]


# -- cancelling ------------------------------------------------------------------------------


def test_cancel_queued_job(papi: Api, private: Server, s3, sqs) -> None:
    ready(papi)
    job = start(papi)
    r = cancel(papi, job["id"])
    assert r.status_code == 202, r.text
    view = r.json()
    assert view["status"] == "cancelled" and view["finished_at"] and view["id"] == job["id"]
    assert record(s3, papi, job["id"]).status == "cancelled"
    assert pointer(s3, papi) is None
    events = [JobEvent.model_validate_json(m["Body"]) for m in drain(sqs, private.events_queue_url)]
    assert [(e.event, e.job_id, e.user_id, e.avatar_id, e.status) for e in events] == [
        ("job.cancelled", job["id"], papi.user_id, papi.avatar_id, "cancelled")
    ]
    # The avatar is free again.
    assert start(papi)["id"] != job["id"]
    # Cancelling it again: it has ended.
    again = cancel(papi, job["id"])
    assert again.status_code == 409 and again.headers["content-type"] == "application/problem+json"
    assert drain(sqs, private.events_queue_url, rounds=1) == []


def test_cancel_running_job_requests_cancellation(papi: Api, private: Server, s3, sqs) -> None:
    ready(papi)
    job = start(papi)
    set_status(s3, papi, job["id"], "running")
    r = cancel(papi, job["id"])
    assert r.status_code == 202, r.text
    assert (r.json()["status"], r.json()["cancel_requested"]) == ("running", True)
    rec = record(s3, papi, job["id"])
    assert rec.status == "running" and rec.cancel_requested is True
    assert pointer(s3, papi) == job["id"]  # the trainer still holds the avatar until it stops
    assert cancel(papi, job["id"]).status_code == 202  # asking twice is fine
    assert drain(sqs, private.events_queue_url, rounds=1) == []  # the trainer publishes when it stops


@pytest.mark.parametrize("final", ["succeeded", "failed", "cancelled"])
def test_cancel_finished_job_is_409(api: Api, s3, final: str) -> None:
    ready(api)
    job = start(api)
    set_status(s3, api, job["id"], final)
    r = cancel(api, job["id"])
    assert r.status_code == 409 and final in r.json()["detail"]
    assert record(s3, api, job["id"]).status == final


# -- tenant isolation ------------------------------------------------------------------------

ROUTES = [
    ("POST", "{base}/training-jobs", {"json": {}}),
    ("GET", "{base}/training-jobs", {}),
    ("GET", "{base}/training-jobs/{job}", {}),
    ("POST", "{base}/training-jobs/{job}/cancel", {}),
    ("GET", "/v1/users/{user}/training-jobs", {}),
]


@pytest.fixture(scope="module")
def victim_job(api_url: str, s3) -> Iterator[tuple[Api, str]]:
    victim = Api(api_url, "victim-" + uuid.uuid4().hex[:8], "av")
    ready(victim)
    job = start(victim)
    yield victim, job["id"]
    victim.close()


@pytest.mark.parametrize(("method", "path", "kwargs"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_other_users_token_is_forbidden(api: Api, api_url: str, s3, victim_job, method, path, kwargs) -> None:
    victim, job_id = victim_job
    url = path.format(base=victim.base, job=job_id, user=victim.user_id)
    before = {k: s3.head_object(Bucket=TEST_BUCKET, Key=k)["ETag"] for k in keys_under(s3, user_prefix(victim.user_id))}
    r = api.request(method, url, **kwargs)
    assert r.status_code == 403, r.text
    assert r.headers["content-type"] == "application/problem+json" and "queued" not in r.text
    assert httpx.request(method, api_url + url, **kwargs).status_code == 401
    after = {k: s3.head_object(Bucket=TEST_BUCKET, Key=k)["ETag"] for k in keys_under(s3, user_prefix(victim.user_id))}
    assert after == before
    assert record(s3, victim, job_id).status == "queued"
