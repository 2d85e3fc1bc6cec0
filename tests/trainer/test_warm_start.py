"""`warm_start: true` end to end on a real trainer: without an adapter it is a normal run (and
says so); with one it continues that adapter and trains only on the documents added or changed
since its version (by ETag), following earlier warm starts back to the last full run; with
nothing new it fails clearly."""

from __future__ import annotations

import json

import pytest

from contracts.keys import adapter_manifest_key, adapter_version_prefix
from tests.conftest import TEST_BUCKET
from tests.pipeline import Pipeline, chat_document, wait_for_job

FAST = {"num_epochs": 2, "batch_size": 4, "learning_rate": 0.01, "r": 4}


@pytest.fixture(scope="module")
def worker(pipeline: Pipeline):
    proc = pipeline.start_worker()
    yield proc
    assert proc.poll() is None, "the worker died:\n" + pipeline.worker_log()


def train(api, pipeline: Pipeline, body: dict) -> dict:
    r = api.post(f"{api.base}/training-jobs", json=body)
    assert r.status_code == 202, r.text
    done, _ = wait_for_job(api, r.json()["id"], {"succeeded", "failed"}, pipeline=pipeline)
    return done


def version_file(s3, api, version: int, name: str) -> bytes:
    key = adapter_version_prefix(api.user_id, api.avatar_id, version) + name
    return s3.get_object(Bucket=TEST_BUCKET, Key=key)["Body"].read()


def test_warm_start_trains_only_on_new_documents(pipeline: Pipeline, worker, s3) -> None:
    with pipeline.client() as api:
        assert api.put_doc("first.jsonl", chat_document(40, seed="first ")).status_code == 201

        # No adapter yet: a normal run on every document, and the metrics say so.
        cold = train(api, pipeline, {**FAST, "warm_start": True})
        assert cold["status"] == "succeeded" and cold["adapter_version"] == 1, cold
        assert cold["metrics"]["warm_start"] is False and "no current adapter" in cold["metrics"]["warm_start_reason"]
        assert [d["name"] for d in cold["data"]] == ["first.jsonl"]

        # One new document: only it is trained on, continuing version 1.
        added = api.put_doc("second.jsonl", chat_document(40, seed="second "))
        assert added.status_code == 201
        # `r: 8` is ignored: a warm start continues the adapter it starts from (its LoRA shape included).
        warm = train(api, pipeline, {**FAST, "r": 8, "warm_start": True})
        assert warm["status"] == "succeeded" and warm["adapter_version"] == 2, warm
        assert [(d["name"], d["etag"]) for d in warm["data"]] == [("second.jsonl", added.json()["etag"])]
        m = warm["metrics"]
        assert m["warm_start"] is True and m["warm_start_from_version"] == 1 and m["documents_skipped"] == 1
        assert m["documents"] == 1
        v1_config = json.loads(version_file(s3, api, 1, "adapter_config.json"))
        v2_config = json.loads(version_file(s3, api, 2, "adapter_config.json"))
        assert v1_config["r"] == v2_config["r"] == 4  # a fresh adapter would have r 8
        assert version_file(s3, api, 1, "adapter_model.safetensors") != version_file(
            s3, api, 2, "adapter_model.safetensors"
        )

        # Nothing added or changed since version 2: nothing to train on.
        idle = train(api, pipeline, {**FAST, "warm_start": True})
        assert idle["status"] == "failed" and "nothing new to train on" in idle["error"], idle
        assert idle["adapter_version"] is None
        manifest = s3.get_object(Bucket=TEST_BUCKET, Key=adapter_manifest_key(api.user_id, api.avatar_id))[
            "Body"
        ].read()
        assert json.loads(manifest)["current_version"] == 2

        # A changed document (new ETag) is new again; what versions 1 and 2 saw is still skipped.
        changed = api.put_doc("first.jsonl", chat_document(30, seed="first, revised "))
        assert changed.status_code == 200
        again = train(api, pipeline, {**FAST, "warm_start": True})
        assert again["status"] == "succeeded" and again["adapter_version"] == 3, again
        assert [(d["name"], d["etag"]) for d in again["data"]] == [("first.jsonl", changed.json()["etag"])]
        assert again["metrics"]["warm_start_from_version"] == 2 and again["metrics"]["documents_skipped"] == 1
