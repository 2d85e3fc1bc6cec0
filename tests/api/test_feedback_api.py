"""The feedback API and preference documents over HTTP (a real API server on moto; no worker):
the three feedback shapes, their refusals naming the field, listing newest first, deleting,
feedback as ordinary training documents (flag, delete-unused, archive, tenants), every malformed
preference line refused naming its line, and the refusals of a preference job (409, 422)."""

from __future__ import annotations

import io
import json
import zipfile

import pytest

from tests.conftest import Api, keys_under
from tests.contracts.test_preference_documents import BAD_LINES, GOOD, PAIR_SHAPES, jsonl

USER = [{"role": "user", "content": "How was the trip?"}]


def post(api: Api, body: dict):
    return api.post(f"{api.base}/feedback", json=body)


def problem(r, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    return r.json()


@pytest.mark.parametrize(("line", "message"), BAD_LINES, ids=[m for _, m in BAD_LINES])
def test_a_malformed_preference_upload_is_a_422_naming_the_line(api: Api, s3, line: object, message: str) -> None:
    body = problem(api.put_doc("pairs.jsonl", jsonl(GOOD, line)), 422)
    assert body["line"] == 2 and message in body["detail"]
    assert keys_under(s3, f"users/{api.user_id}/") == []  # nothing stored


def test_every_preference_shape_uploads_and_lists_as_a_training_document(api: Api) -> None:
    for i, shape in enumerate(sorted(PAIR_SHAPES)):
        assert api.put_doc(f"pairs-{i}.jsonl", jsonl(PAIR_SHAPES[shape])).status_code == 201, shape
    ratings = jsonl(
        {"prompt": USER, "completion": "Lovely", "label": True}, {"prompt": "q", "completion": "no", "label": False}
    )
    assert api.put_doc("ratings.jsonl", ratings).status_code == 201
    names = [d["name"] for d in api.get(api.docs).json()["items"]]
    assert len(names) == len(PAIR_SHAPES) + 1


def test_the_three_feedback_shapes_are_stored_and_listed_newest_first(api: Api, s3) -> None:
    rated = post(api, {"messages": USER, "reply": "It was a trip.", "rating": "down"})
    assert rated.status_code == 201, rated.text
    pair = post(api, {"messages": USER, "chosen": "Lovely, thanks!", "rejected": "It was a trip."})
    assert pair.status_code == 201, pair.text
    up = post(api, {"messages": USER, "reply": "Lovely!", "rating": "up", "use_for_training": False})
    assert up.status_code == 201, up.text
    r, p, u = rated.json(), pair.json(), up.json()
    assert (r["kind"], r["rating"], r["rejected"], r["chosen"]) == ("rating", "down", "It was a trip.", None)
    assert (p["kind"], p["chosen"], p["rejected"], p["rating"]) == ("pair", "Lovely, thanks!", "It was a trip.", None)
    assert (u["kind"], u["chosen"], u["use_for_training"]) == ("rating", "Lovely!", False)
    assert r["messages"] == USER and r["document"] == r["id"] + ".jsonl"

    # One object per item, each a valid preference line of the documented shape.
    stored = json.loads(
        s3.get_object(
            Bucket="avatune-test",
            Key=f"users/{api.user_id}/avatars/{api.avatar_id}/adapters/training_data/{p['document']}",
        )["Body"].read()
    )
    assert stored["prompt"] == USER and stored["chosen"] == [{"role": "assistant", "content": "Lovely, thanks!"}]
    assert stored["avatune_feedback"]["id"] == p["id"]

    listed = api.get(f"{api.base}/feedback").json()
    assert [i["id"] for i in listed["items"]] == [u["id"], p["id"], r["id"]] and listed["next_cursor"] is None
    first = api.get(f"{api.base}/feedback", params={"limit": 2}).json()
    assert [i["id"] for i in first["items"]] == [u["id"], p["id"]] and first["next_cursor"]
    rest = api.get(f"{api.base}/feedback", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [i["id"] for i in rest["items"]] == [r["id"]] and rest["next_cursor"] is None

    assert api.delete(f"{api.base}/feedback/{p['id']}").status_code == 204
    problem(api.delete(f"{api.base}/feedback/{p['id']}"), 404)
    problem(api.delete(f"{api.base}/feedback/feedback-not-hex"), 400)
    problem(api.delete(f"{api.base}/feedback/job-1"), 400)
    assert [i["id"] for i in api.get(f"{api.base}/feedback").json()["items"]] == [u["id"], r["id"]]


def test_feedback_documents_obey_the_flag_delete_unused_archive_and_tenants(api: Api, api_url: str) -> None:
    kept = post(api, {"messages": USER, "reply": "Lovely!", "rating": "up"}).json()
    unused = post(api, {"messages": USER, "reply": "Meh.", "rating": "down", "use_for_training": False}).json()
    docs = {d["name"]: d["use_for_training"] for d in api.get(api.docs).json()["items"]}
    assert docs == {kept["document"]: True, unused["document"]: False}

    r = api.patch(f"{api.docs}/{kept['document']}", json={"use_for_training": False})
    assert r.status_code == 200
    assert {i["id"]: i["use_for_training"] for i in api.get(f"{api.base}/feedback").json()["items"]}[
        kept["id"]
    ] is False
    api.patch(f"{api.docs}/{kept['document']}", json={"use_for_training": True})

    archive = api.get(f"{api.docs}/archive", params={"use_for_training": "all"})
    assert sorted(zipfile.ZipFile(io.BytesIO(archive.content)).namelist()) == sorted(docs)

    assert api.delete(api.docs, params={"use_for_training": "false"}).json() == {"deleted": 1}
    assert [i["id"] for i in api.get(f"{api.base}/feedback").json()["items"]] == [kept["id"]]

    with Api(api_url, "intruder", api.avatar_id) as other:
        problem(other.get(f"{api.base}/feedback"), 403)
        problem(other.post(f"{api.base}/feedback", json={"messages": USER, "reply": "x", "rating": "up"}), 403)
        problem(other.delete(f"{api.base}/feedback/{kept['id']}"), 403)
        assert other.get(f"{other.base}/feedback").json()["items"] == []


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"messages": USER, "reply": "", "rating": "up"}, 422, "reply"),
        ({"messages": USER, "reply": "  ", "rating": "down"}, 422, "reply"),
        ({"messages": USER, "chosen": "Same.", "rejected": "Same."}, 422, "rejected"),
        ({"messages": USER, "chosen": "", "rejected": "no"}, 422, "chosen"),
        ({"messages": [{"role": "bot", "content": "hi"}], "reply": "x", "rating": "up"}, 422, "messages.0.role"),
        ({"messages": USER + [{"role": "assistant", "content": "a"}], "reply": "x", "rating": "up"}, 422, "messages"),
        ({"messages": USER, "reply": "x"}, 422, "rating"),
        ({"messages": USER, "reply": "x", "rating": "meh"}, 422, "rating"),
        ({"reply": "x", "rating": "up"}, 422, "messages"),
        ({}, 422, None),
        ({"messages": USER, "chosen": "a", "rejected": "b", "extra": 1}, 422, "extra"),
        ({"generation_id": "job-does-not-exist", "rating": "down"}, 404, None),
        ({"generation_id": "../other", "rating": "down"}, 422, "generation_id"),
        ({"generation_id": "job-1", "rating": "up", "correction": "better"}, 422, "rating"),
        ({"messages": USER, "reply": "x" * 90_000, "rating": "up", "chosen": None}, 201, None),
        ({"messages": [{"role": "user", "content": "q" * 99_000}] * 3, "reply": "x", "rating": "up"}, 413, None),
    ],
)
def test_bad_feedback_is_refused_naming_the_field_and_stores_nothing(
    api: Api, s3, body: dict, status: int, field: str | None
) -> None:
    r = post(api, body)
    if status == 201:
        assert r.status_code == 201, r.text
        return
    found = problem(r, status)
    assert found.get("field") == field, found
    assert keys_under(s3, f"users/{api.user_id}/") == []


def test_a_preference_job_without_preference_documents_is_a_409_saying_what_to_do(api: Api) -> None:
    for objective in ("dpo", "kto"):
        detail = problem(api.post(f"{api.base}/training-jobs", json={"objective": objective}), 409)["detail"]
        assert "no preference document" in detail and "POST .../feedback" in detail
    # Demonstrations do not count, nor does unflagged feedback.
    api.put_doc("chat.jsonl", jsonl({"messages": USER + [{"role": "assistant", "content": "Lovely"}]}))
    post(api, {"messages": USER, "reply": "Lovely!", "rating": "up", "use_for_training": False})
    problem(api.post(f"{api.base}/training-jobs", json={"objective": "dpo"}), 409)
    # A flagged preference document (uploaded, any name) does.
    api.put_doc("my pairs.jsonl", jsonl(GOOD))
    r = api.post(f"{api.base}/training-jobs", json={"objective": "dpo"})
    assert r.status_code == 202, r.text
    assert r.json()["spec"]["objective"] == "dpo"
    assert api.post(f"{api.base}/training-jobs/{r.json()['id']}/cancel").status_code == 202


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"objective": "dpo", "method": "full"}, "objective"),
        ({"objective": "kto", "resources": {"gpus": 2}}, "objective"),
        ({"objective": "dpo", "training_data": ["a demonstration"]}, "training_data"),
        ({"preference": {"beta": 0.2}}, "preference"),
        ({"objective": "dpo", "preference": {"desirable_weight": 2}}, "preference.desirable_weight"),
        ({"objective": "kto", "preference": {"loss_type": "ipo"}}, "preference.loss_type"),
        ({"objective": "dpo", "preference": {"beta": 0}}, "preference.beta"),
        ({"objective": "orpo"}, "objective"),
    ],
)
def test_impossible_preference_specs_are_422_naming_the_field(api: Api, body: dict, field: str) -> None:
    assert problem(api.post(f"{api.base}/training-jobs", json=body), 422)["field"] == field


def feedback_documents(s3, api: Api) -> list[str]:
    prefix = f"users/{api.user_id}/avatars/{api.avatar_id}/adapters/training_data/feedback-"
    return keys_under(s3, prefix)


def test_a_retried_feedback_post_with_an_idempotency_key_stores_one_item(api: Api, s3) -> None:
    body = {"messages": USER, "chosen": "Lovely, thanks!", "rejected": "It was a trip."}
    key = {"Idempotency-Key": "feedback-retry-1"}
    first = api.post(f"{api.base}/feedback", json=body, headers=key)
    assert first.status_code == 201, first.text
    # The app lost the answer and sends the same request again (keys reordered: the same request).
    again = api.post(f"{api.base}/feedback", json=dict(reversed(body.items())), headers=key)
    assert again.status_code == 201, again.text
    assert again.json() == first.json() and again.headers["Location"] == first.headers["Location"]
    assert feedback_documents(s3, api) != [] and len(feedback_documents(s3, api)) == 1
    # Without a key (or with another) each POST is a new item.
    assert post(api, body).json()["id"] != first.json()["id"]
    other = api.post(f"{api.base}/feedback", json=body, headers={"Idempotency-Key": "feedback-retry-2"})
    assert other.json()["id"] != first.json()["id"]
    assert len(feedback_documents(s3, api)) == 3
    # The key used for a different item: a 422 naming the item it made, and nothing stored.
    bad = problem(
        api.post(f"{api.base}/feedback", json={**body, "chosen": "Other"}, headers=key),
        422,
    )
    assert bad["feedback_id"] == first.json()["id"] and len(feedback_documents(s3, api)) == 3
    # Its records live apart from the job-creating routes' records (a key is scoped to a route).
    records = [k for k in keys_under(s3, f"users/{api.user_id}/") if "/idempotency/" in k]
    assert len(records) == 2 and all("/adapters/idempotency/feedback/" in k for k in records)


def test_concurrent_feedback_posts_with_one_key_store_one_item(api: Api, s3) -> None:
    from concurrent.futures import ThreadPoolExecutor

    body = {"messages": USER, "reply": "It was a trip.", "rating": "down"}

    def send(_: int):
        return api.post(f"{api.base}/feedback", json=body, headers={"Idempotency-Key": "feedback-burst"})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, range(8)))
    assert {r.status_code for r in answers} == {201}, [r.text for r in answers]
    created = {r.json()["id"] for r in answers}
    assert len(created) == 1  # every answer is the one item
    assert len(feedback_documents(s3, api)) == 1
    # A retry after the burst answers the one item.
    late = send(0)
    assert late.status_code == 201 and late.json()["id"] in created


def test_a_bad_idempotency_key_on_feedback_is_a_400_and_stores_nothing(api: Api, s3) -> None:
    body = {"messages": USER, "reply": "Lovely!", "rating": "up"}
    problem(api.post(f"{api.base}/feedback", json=body, headers={"Idempotency-Key": "k" * 256}), 400)
    assert keys_under(s3, f"users/{api.user_id}/") == []


def test_a_key_whose_first_request_failed_after_its_record_writes_that_item_once(api: Api, s3) -> None:
    """The first request recorded its key, then died before its item was stored (or lost the
    answer of that write): the retry stores the item under the recorded id, once. A record
    older than the key's TTL starts afresh, even for another body."""
    from datetime import timedelta

    from contracts.feedback import FeedbackKeyRecord, new_feedback_id
    from contracts.jobs import utcnow
    from contracts.keys import feedback_idempotency_key
    from handlers.idempotency import Idempotency

    body = {"messages": USER, "reply": "Lovely!", "rating": "up"}
    path = f"{api.base}/feedback"

    def leave_record(key: str, recorded_body: dict, age: timedelta) -> str:
        seen = Idempotency.of(key, "POST", path, json.dumps(recorded_body).encode())
        record = FeedbackKeyRecord(
            feedback_id=new_feedback_id(), fingerprint=seen.fingerprint, created_at=utcnow() - age
        )
        record_key = feedback_idempotency_key(api.user_id, api.avatar_id, seen.key_hash)
        s3.put_object(Bucket="avatune-test", Key=record_key, Body=record.model_dump_json().encode())
        return record.feedback_id

    recorded = leave_record("died-after-record", body, timedelta(seconds=1))
    first = api.post(path, json=body, headers={"Idempotency-Key": "died-after-record"})
    assert first.status_code == 201 and first.json()["id"] == recorded, first.text
    again = api.post(path, json=body, headers={"Idempotency-Key": "died-after-record"})
    assert again.json()["id"] == recorded and len(feedback_documents(s3, api)) == 1

    stale = leave_record("old-key", {**body, "reply": "Something else"}, timedelta(hours=25))
    fresh = api.post(path, json=body, headers={"Idempotency-Key": "old-key"})
    assert fresh.status_code == 201 and fresh.json()["id"] != stale, fresh.text
    assert len(feedback_documents(s3, api)) == 2
