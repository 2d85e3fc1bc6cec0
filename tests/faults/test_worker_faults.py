"""Workers stopped mid-job: SIGTERM checkpoints and hands the job back; SIGKILL leaves it to
come back after the visibility timeout. Either way the job ends `succeeded`, resumed from its
last complete checkpoint."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from contracts.keys import checkpoint_prefix
from tests.conftest import keys_under
from tests.pipeline import Pipeline, chat_document, wait_for_checkpoint, wait_for_job

LONG = {"num_epochs": 8, "batch_size": 1, "r": 4}  # ~290 steps on the tiny model


def start_long_job(api) -> dict:
    api.put_doc("chat.jsonl", chat_document())
    r = api.post(f"{api.base}/training-jobs", json=LONG)
    assert r.status_code == 202, r.text
    return r.json()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_worker_stopped_mid_job_resumes_from_checkpoint(pipeline: Pipeline, s3, sig: signal.Signals) -> None:
    first = pipeline.start_worker()
    with pipeline.client() as api:
        job = start_long_job(api)
        wait_for_checkpoint(pipeline, api, job["id"], s3)
        stopped_at = time.monotonic()
        first.send_signal(sig)
        first.wait(30)
        if sig == signal.SIGTERM:
            assert time.monotonic() - stopped_at < 15, "SIGTERM must exit within seconds"
            assert first.returncode == 0, pipeline.worker_log()
            record = api.get(f"{api.base}/training-jobs/{job['id']}").json()
            assert record["status"] == "queued"  # handed back, lease released
        second = pipeline.start_worker()
        try:
            done, _ = wait_for_job(api, job["id"], {"succeeded", "failed"}, pipeline=pipeline, timeout=300)
            assert done["status"] == "succeeded", done
            assert done["metrics"]["resumed_from_step"] >= 5
            assert done["attempts"] == 2
            assert done["adapter_version"] == 1
            assert pipeline.wait_events(job["id"], "job.succeeded") == ["job.started", "job.succeeded"]
            assert keys_under(s3, checkpoint_prefix(api.user_id, api.avatar_id, job["id"])) == []
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(30)


def test_job_survives_s3_and_sqs_network_faults(pipeline: Pipeline, moto_endpoint: str) -> None:
    """The worker talks to S3/SQS through a proxy that resets every 3rd connection and drops
    every 5th one before it answers; botocore's retries carry the job through."""
    from urllib.parse import urlsplit

    from infra.faulty_proxy import FaultPlan, FaultyProxy

    proxy = FaultyProxy(urlsplit(moto_endpoint).port, FaultPlan()).start()
    worker = pipeline.start_worker(AWS_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}", DOWNLOAD_CONCURRENCY="8")
    try:
        with pipeline.client() as api:
            for i in range(6):  # several documents: several concurrent downloads, more connections
                api.put_doc(f"chat{i}.jsonl", chat_document(8, seed=f"{i} "))
            r = api.post(f"{api.base}/training-jobs", json={"num_epochs": 1, "batch_size": 4})
            done, _ = wait_for_job(api, r.json()["id"], {"succeeded", "failed"}, pipeline=pipeline, timeout=180)
            assert done["status"] == "succeeded", done
            assert len(done["data"]) == 6
        assert proxy.resets > 0 and proxy.cuts > 0, (proxy.connections, proxy.resets, proxy.cuts)
    finally:
        # The job's tail (active pointer, checkpoints, events, the message) still runs through
        # the proxy after the record says succeeded, each call retried with backoff (up to 8
        # attempts): under load that can take tens of seconds. The deployment's contract is the
        # pod's 120 s grace period, so that is the bound here.
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(120)
        except subprocess.TimeoutExpired:
            raise AssertionError("the worker did not stop within 120 s of SIGTERM:\n" + pipeline.worker_log()) from None
        finally:
            proxy.stop()
