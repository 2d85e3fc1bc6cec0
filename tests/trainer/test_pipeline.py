"""End to end: API -> SQS -> a real trainer process -> adapter in S3 -> events."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest
import torch

from contracts.keys import adapter_prefix, job_key
from contracts.messages import TrainRequest
from tests.conftest import TEST_BUCKET, Api, keys_under
from tests.pipeline import Pipeline, chat_document, wait_for_job

FAST = {"num_epochs": 2, "batch_size": 4, "learning_rate": 0.01, "r": 4}


@pytest.fixture(scope="module")
def worker(pipeline: Pipeline):
    proc = pipeline.start_worker()
    yield proc
    assert proc.poll() is None, "the worker died:\n" + pipeline.worker_log()


def start_job(api: Api, overrides: dict | None = None, **kwargs) -> dict:
    r = api.post(f"{api.base}/training-jobs", json=overrides or FAST, **kwargs)
    assert r.status_code == 202, r.text
    return r.json()


def download_adapter(api: Api, dest) -> None:
    adapter = api.get(f"{api.base}/adapter").json()
    dest.mkdir(parents=True, exist_ok=True)
    for f in adapter["files"]:
        (dest / f["name"]).write_bytes(httpx.get(f["url"]).raise_for_status().content)


def test_train_end_to_end(pipeline: Pipeline, worker, tiny_model_dir, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with pipeline.client() as api:
        assert api.put_doc("chat.jsonl", chat_document()).status_code == 201
        assert api.put_doc("private.txt", b"never train on this", flag=False).status_code == 201
        job = start_job(api)
        assert job["status"] == "queued" and job["id"]
        done, seen = wait_for_job(api, job["id"], {"succeeded", "failed"}, pipeline=pipeline)
        assert done["status"] == "succeeded", done
        assert seen[-1] == "succeeded" and set(seen) <= {"queued", "running", "succeeded"}
        assert pipeline.wait_events(job["id"], "job.succeeded") == ["job.started", "job.succeeded"]
        # Only the flagged document, pinned by its ETag.
        listed = {d["name"]: d["etag"] for d in api.get(api.docs).json()["items"]}
        assert [(d["name"], d["etag"]) for d in done["data"]] == [("chat.jsonl", listed["chat.jsonl"])]
        m = done["metrics"]
        assert m["trainable_tokens"] == m["assistant_tokens"] > 0
        assert m["eval_loss_before"] is not None and m["eval_loss_after"] is not None
        assert done["adapter_version"] == 1 and done["progress"]["step"] == done["progress"]["total_steps"] > 0

        adapter = api.get(f"{api.base}/adapter").json()
        assert adapter["current_version"] == 1
        download_adapter(api, tmp_path / "adapter")

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "question 3: how are you?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        base_logits = base(ids).logits
        tuned = PeftModel.from_pretrained(base, tmp_path / "adapter")
        tuned_logits = tuned(ids).logits
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-3)


def test_versions_and_promote(pipeline: Pipeline, worker, s3) -> None:
    with pipeline.client() as api:
        api.put_doc("chat.jsonl", chat_document())
        first = wait_for_job(api, start_job(api)["id"], {"succeeded", "failed"}, pipeline=pipeline)[0]
        v1 = s3.get_object(
            Bucket=TEST_BUCKET, Key=adapter_prefix(api.user_id, api.avatar_id) + "adapter_model.safetensors"
        )["Body"].read()
        api.put_doc("more.jsonl", chat_document(30, seed="more "))
        second = wait_for_job(api, start_job(api)["id"], {"succeeded", "failed"}, pipeline=pipeline)[0]
        assert (first["adapter_version"], second["adapter_version"]) == (1, 2)
        versions = api.get(f"{api.base}/adapter/versions").json()["items"]
        assert [v["version"] for v in versions] == [1, 2]
        assert [v["job_id"] for v in versions] == [first["id"], second["id"]]
        assert api.get(f"{api.base}/adapter").json()["current_version"] == 2

        r = api.post(f"{api.base}/adapter/versions/1/promote")
        assert r.status_code == 200 and r.json()["current_version"] == 1
        current = s3.get_object(
            Bucket=TEST_BUCKET, Key=adapter_prefix(api.user_id, api.avatar_id) + "adapter_model.safetensors"
        )["Body"].read()
        assert current == v1
        # A third job after a rollback still gets a new number.
        third = wait_for_job(api, start_job(api)["id"], {"succeeded", "failed"}, pipeline=pipeline)[0]
        assert third["adapter_version"] == 3


def test_cancel_running_job_keeps_current_adapter(pipeline: Pipeline, worker, s3) -> None:
    with pipeline.client() as api:
        api.put_doc("chat.jsonl", chat_document())
        job = start_job(api, {"num_epochs": 100, "batch_size": 1})
        wait_for_job(api, job["id"], {"running"}, pipeline=pipeline, condition=lambda j: j["progress"]["step"] > 0)
        r = api.post(f"{api.base}/training-jobs/{job['id']}/cancel")
        assert r.status_code == 202, r.text
        done, _ = wait_for_job(api, job["id"], {"cancelled", "succeeded", "failed"}, pipeline=pipeline)
        assert done["status"] == "cancelled" and done["adapter_version"] is None
        assert "job.cancelled" in pipeline.wait_events(job["id"], "job.cancelled")
        keys = keys_under(s3, adapter_prefix(api.user_id, api.avatar_id))
        assert not [k for k in keys if "/versions/" in k or k.endswith(".safetensors") or "/checkpoints/" in k]
        # The avatar is free again.
        assert (
            wait_for_job(api, start_job(api)["id"], {"succeeded", "failed"}, pipeline=pipeline)[0]["status"]
            == "succeeded"
        )


def test_malformed_message_goes_to_dlq_and_worker_survives(pipeline: Pipeline, worker) -> None:
    sqs = pipeline.sqs
    bodies = [
        "{not json",
        json.dumps({"schema": "avatune.train-request/v9", "job_id": "x"}),
        json.dumps({"schema": "avatune.train-request/v1", "job_id": "../../etc", "user_id": "u", "avatar_id": "a"}),
    ]
    for body in bodies:
        sqs.send_message(
            QueueUrl=pipeline.train_queue_url,
            MessageBody=body,
            MessageGroupId="poison-test",
            MessageDeduplicationId=uuid.uuid4().hex,
        )
    received: dict[str, str] = {}
    deadline = time.monotonic() + 60
    while len(received) < len(bodies) and time.monotonic() < deadline:
        resp = sqs.receive_message(
            QueueUrl=pipeline.train_dlq_url, MaxNumberOfMessages=10, WaitTimeSeconds=1, MessageAttributeNames=["All"]
        )
        for m in resp.get("Messages", []):
            received[m["Body"]] = m["MessageAttributes"]["avatune-reason"]["StringValue"]
            sqs.delete_message(QueueUrl=pipeline.train_dlq_url, ReceiptHandle=m["ReceiptHandle"])
    assert set(received) == set(bodies), pipeline.worker_log()
    assert "not JSON" in received[bodies[0]] and "unknown schema" in received[bodies[1]]
    assert "job_id" in received[bodies[2]]
    assert worker.poll() is None


def _queue_drained(pipeline: Pipeline) -> bool:
    attrs = pipeline.sqs.get_queue_attributes(
        QueueUrl=pipeline.train_queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return attrs["ApproximateNumberOfMessages"] == "0" and attrs["ApproximateNumberOfMessagesNotVisible"] == "0"


def test_request_from_another_service_and_duplicate_delivery(pipeline: Pipeline, worker, s3) -> None:
    with pipeline.client() as api:
        api.put_doc("chat.jsonl", chat_document())
        request = TrainRequest(
            schema="avatune.train-request/v1",
            job_id="ext-" + uuid.uuid4().hex[:8],
            user_id=api.user_id,
            avatar_id=api.avatar_id,
            config=FAST,
        )
        send = lambda: pipeline.sqs.send_message(  # noqa: E731
            QueueUrl=pipeline.train_queue_url,
            MessageBody=request.to_message_body(),
            MessageGroupId=request.message_group_id(),
            MessageDeduplicationId=uuid.uuid4().hex,
        )
        send()  # no API call first
        done, _ = wait_for_job(api, request.job_id, {"succeeded", "failed"}, pipeline=pipeline)
        assert done["status"] == "succeeded"
        key = job_key(api.user_id, api.avatar_id, request.job_id)
        deadline = time.monotonic() + 30  # the record is final once its event is marked published
        while time.monotonic() < deadline:
            before = s3.get_object(Bucket=TEST_BUCKET, Key=key)["Body"].read()
            if f"{request.job_id}:job.succeeded".encode() in before:
                break
            time.sleep(0.1)
        send()  # delivered again: nothing happens
        deadline = time.monotonic() + 30
        while not _queue_drained(pipeline) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _queue_drained(pipeline)
        after = s3.get_object(Bucket=TEST_BUCKET, Key=job_key(api.user_id, api.avatar_id, request.job_id))[
            "Body"
        ].read()
        assert after == before
        assert [v["version"] for v in api.get(f"{api.base}/adapter/versions").json()["items"]] == [1]


def test_invalid_document_fails_the_job_with_a_reason(pipeline: Pipeline, worker) -> None:
    with pipeline.client() as api:
        broken = b'{"messages": oops}\n'
        up = api.post(f"{api.docs}/uploads", json={"name": "broken.jsonl", "size": len(broken)}).json()
        httpx.put(up["url"], content=broken, headers=up["headers"]).raise_for_status()
        job = start_job(api)
        done, _ = wait_for_job(api, job["id"], {"succeeded", "failed"}, pipeline=pipeline)
        assert done["status"] == "failed"
        assert "broken.jsonl" in done["error"] and "line 1" in done["error"]
        assert pipeline.wait_events(job["id"], "job.failed")[-1] == "job.failed"
        assert api.post(f"{api.base}/training-jobs", json=FAST).status_code == 202  # avatar freed


def test_second_job_reuses_the_loaded_base_model(pipeline: Pipeline, worker) -> None:
    with pipeline.client() as api:
        api.put_doc("chat.jsonl", chat_document(10))
        first = wait_for_job(api, start_job(api)["id"], {"succeeded"}, pipeline=pipeline)[0]
        second = wait_for_job(api, start_job(api)["id"], {"succeeded"}, pipeline=pipeline)[0]
    # The module's worker has trained before: neither job loaded the base again.
    assert first["metrics"]["base_model_reused"] and second["metrics"]["base_model_reused"]


def test_rolled_back_api_job_is_dropped_and_queue_job_without_data_fails(pipeline: Pipeline, worker) -> None:
    with pipeline.client() as api:
        send = lambda req: pipeline.sqs.send_message(  # noqa: E731
            QueueUrl=pipeline.train_queue_url,
            MessageBody=req.to_message_body(),
            MessageGroupId=req.message_group_id(),
            MessageDeduplicationId=req.job_id,
        )
        # The API wrote no record (it rolled back) but its message went out: nothing must run.
        ghost = TrainRequest(
            schema="avatune.train-request/v1",
            job_id="ghost-" + uuid.uuid4().hex[:8],
            user_id=api.user_id,
            avatar_id=api.avatar_id,
            origin="api",
        )
        send(ghost)
        # Another service's request for an avatar with no flagged document: failed, with the reason.
        empty = TrainRequest(
            schema="avatune.train-request/v1",
            job_id="empty-" + uuid.uuid4().hex[:8],
            user_id=api.user_id,
            avatar_id=api.avatar_id,
        )
        send(empty)
        done, _ = wait_for_job(api, empty.job_id, {"succeeded", "failed"}, pipeline=pipeline)
        assert done["status"] == "failed" and "use_for_training=true" in done["error"]
        assert api.get(f"{api.base}/training-jobs/{ghost.job_id}").status_code == 404
