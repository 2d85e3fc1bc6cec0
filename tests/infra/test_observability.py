"""Structured logs carry the job's ids, no secret reaches a log line or an S3 object, and the
trainer serves Prometheus metrics."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from tests.conftest import TEST_BUCKET, TEST_SECRET, free_port, keys_under
from tests.pipeline import Pipeline, chat_document, wait_for_job

HF_TOKEN = "hf_" + uuid.uuid4().hex + "SECRETSECRET"


@pytest.fixture(scope="module")
def observed(pipeline: Pipeline):
    port = free_port()
    proc = pipeline.start_worker(METRICS_PORT=str(port), HF_TOKEN=HF_TOKEN)
    yield pipeline, port
    assert proc.poll() is None


def test_full_run_logs_json_with_ids_and_no_secrets(observed, s3) -> None:
    pipeline, metrics_port = observed
    with pipeline.client() as api:
        token = api.headers["authorization"].split()[1]
        api.put_doc("chat.jsonl", chat_document(20))
        job = api.post(f"{api.base}/training-jobs", json={"num_epochs": 1, "batch_size": 4}).json()
        done, _ = wait_for_job(api, job["id"], {"succeeded", "failed"}, pipeline=pipeline)
        assert done["status"] == "succeeded"
        assert pipeline.wait_events(job["id"], "job.succeeded")[-1] == "job.succeeded"
        # A presigned URL's signature must not end up in a log either.
        api.post(f"{api.docs}/uploads", json={"name": "x.jsonl", "size": 10})

        worker_lines = [
            json.loads(line)
            for line in (pipeline.logs / "worker-1.log").read_text().splitlines()
            if line.startswith("{")
        ]
        job_lines = [line for line in worker_lines if line.get("job_id") == job["id"]]
        assert job_lines, "no log line names the job"
        assert all(line["user_id"] == api.user_id and line["avatar_id"] == api.avatar_id for line in job_lines)
        assert any("job.started" in line["message"] for line in job_lines)

        everything = "\n".join(p.read_text(errors="replace") for p in pipeline.logs.glob("*.log"))
        for secret in (HF_TOKEN, token, TEST_SECRET):
            assert secret not in everything
        for key in keys_under(s3, f"users/{api.user_id}/"):
            body = s3.get_object(Bucket=TEST_BUCKET, Key=key)["Body"].read()
            for secret in (HF_TOKEN, token, TEST_SECRET):
                assert secret.encode() not in body, key

    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    assert 'avatune_jobs_total{outcome="succeeded"} 1.0' in text
    assert "avatune_job_duration_seconds_count" in text and "avatune_queue_wait_seconds_count" in text
    assert "avatune_train_tokens_per_second" in text


def test_api_logs_are_json_with_request_ids(observed) -> None:
    pipeline, _ = observed
    with pipeline.client() as api:
        api.put_doc("a.txt", b"hello")
    lines = [json.loads(line) for line in (pipeline.logs / "api.log").read_text().splitlines() if line.startswith("{")]
    assert lines and all(line["service"] == "api" for line in lines)
