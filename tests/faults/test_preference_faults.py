"""Preference jobs keep the worker's fault behaviour: SIGTERM checkpoints and hands the job back,
the next worker resumes it from that checkpoint (with the same reference) and publishes; a
cancel ends it with nothing published."""

from __future__ import annotations

import signal

from contracts.keys import adapter_prefix, checkpoint_prefix
from tests.conftest import keys_under
from tests.pipeline import Pipeline, jsonl, pairs, wait_for_checkpoint, wait_for_job

# 14 training pairs a step at a time for 20 epochs: ~280 steps on the tiny model.
LONG_DPO = {
    "method": "lora",
    "r": 4,
    "batch_size": 1,
    "num_epochs": 20,
    "objective": "dpo",
    "preference": {"learning_rate": 0.001},
}


def start_long_job(api) -> dict:
    assert api.put_doc("pairs.jsonl", jsonl(pairs())).status_code == 201
    r = api.post(f"{api.base}/training-jobs", json=LONG_DPO)
    assert r.status_code == 202, r.text
    return r.json()


def test_sigterm_hands_a_dpo_job_back_and_the_next_worker_resumes_it(pipeline: Pipeline, s3) -> None:
    first = pipeline.start_worker()
    with pipeline.client() as api:
        job = start_long_job(api)
        wait_for_checkpoint(pipeline, api, job["id"], s3)
        first.send_signal(signal.SIGTERM)
        first.wait(30)
        assert first.returncode == 0, pipeline.worker_log()
        assert api.get(f"{api.base}/training-jobs/{job['id']}").json()["status"] == "queued"
        second = pipeline.start_worker()
        try:
            done, _ = wait_for_job(api, job["id"], {"succeeded", "failed"}, pipeline=pipeline, timeout=300)
            assert done["status"] == "succeeded", done
            m = done["metrics"]
            assert m["resumed_from_step"] >= 5 and done["attempts"] == 2 and done["adapter_version"] == 1
            assert m["objective"] == "dpo" and m["steps"] == done["progress"]["total_steps"]
            assert pipeline.wait_events(job["id"], "job.succeeded")[-1] == "job.succeeded"
            assert keys_under(s3, checkpoint_prefix(api.user_id, api.avatar_id, job["id"])) == []
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(30)


def test_cancel_ends_a_running_kto_job_with_nothing_published(pipeline: Pipeline, s3) -> None:
    worker = pipeline.start_worker()
    try:
        with pipeline.client() as api:
            job = start_long_job(api)  # pairs: KTO trains on each half
            r = api.post(f"{api.base}/training-jobs", json={**LONG_DPO, "objective": "kto"})
            assert r.status_code == 409  # the DPO job holds the avatar
            api.post(f"{api.base}/training-jobs/{job['id']}/cancel")
            wait_for_job(api, job["id"], {"cancelled"}, pipeline=pipeline)
            r = api.post(f"{api.base}/training-jobs", json={**LONG_DPO, "objective": "kto"})
            assert r.status_code == 202, r.text
            kto = r.json()
            wait_for_job(api, kto["id"], {"running"}, pipeline=pipeline, condition=lambda j: j["progress"]["step"] > 0)
            assert api.post(f"{api.base}/training-jobs/{kto['id']}/cancel").status_code == 202
            done, _ = wait_for_job(api, kto["id"], {"cancelled", "succeeded", "failed"}, pipeline=pipeline)
            assert done["status"] == "cancelled" and done["adapter_version"] is None
            # The final event follows the job's tail (slot freed, checkpoints dropped): the
            # record can read "cancelled" a moment before its checkpoints are gone.
            assert pipeline.wait_events(kto["id"], "job.cancelled")[-1] == "job.cancelled"
            keys = keys_under(s3, adapter_prefix(api.user_id, api.avatar_id))
            assert not [k for k in keys if "/versions/" in k or k.endswith(".safetensors") or "/checkpoints/" in k]
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
