"""Fuse (merge) jobs end to end: API -> FuseRequest on the train queue -> a real trainer merges
an adapter version into the 16-bit base -> merged/{version}/ in S3 -> events. The merged
model must reproduce base + adapter's logits (within bf16 rounding) and differ from the base."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import httpx
import pytest
import torch

from contracts.adapters import MergedManifest
from contracts.keys import MERGED_MANIFEST_FILE, adapter_version_prefix, merged_version_prefix
from contracts.messages import FuseRequest
from tests.conftest import TEST_BUCKET, Api, keys_under
from tests.pipeline import Pipeline, chat_document, train_through_api, wait_for_job

FAST = {"num_epochs": 2, "batch_size": 4, "learning_rate": 0.01, "r": 4}
# bf16 keeps 8 bits of mantissa (relative rounding 2**-8 per weight): the merged model's logits
# may drift from base + adapter by about 1% of the logits' scale; allow 2%.
BF16_RELATIVE_TOLERANCE = 2e-2


@pytest.fixture(scope="module")
def worker(pipeline: Pipeline):
    proc = pipeline.start_worker()
    yield proc
    assert proc.poll() is None, "the worker died:\n" + pipeline.worker_log()


@pytest.fixture(scope="module")
def trained(pipeline: Pipeline, worker) -> Api:
    """An avatar with adapter version 1 trained (through the API)."""
    api = pipeline.client()
    assert api.put_doc("chat.jsonl", chat_document()).status_code == 201
    assert train_through_api(pipeline, api, FAST)["adapter_version"] == 1
    yield api
    api.close()


def fuse(api: Api, body: dict | None = None, **kwargs):
    return api.post(f"{api.base}/fuse-jobs", **({"json": body} if body is not None else {}), **kwargs)


def download(s3, prefix: str, dest: Path) -> list[str]:
    names = []
    for key in keys_under(s3, prefix):
        name = key[len(prefix) :]
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(TEST_BUCKET, key, str(dest / name))
        names.append(name)
    return sorted(names)


def test_fuse_merges_the_adapter_into_the_base(pipeline: Pipeline, trained: Api, s3, tiny_model_dir, tmp_path) -> None:
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    api = trained
    key = "fuse-" + uuid.uuid4().hex
    r = fuse(api, headers={"Idempotency-Key": key})  # no body: the current version
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["type"] == "fuse" and job["status"] == "queued" and job["adapter_version"] == 1
    assert fuse(api, headers={"Idempotency-Key": key}).json()["id"] == job["id"]  # a retry: the same job

    done, seen = wait_for_job(api, job["id"], {"succeeded", "failed"}, pipeline=pipeline)
    assert done["status"] == "succeeded", done
    assert set(seen) <= {"queued", "running", "succeeded"}
    assert done["type"] == "fuse" and done["adapter_version"] == 1 and done["error"] is None
    assert done["progress"]["step"] == done["progress"]["total_steps"] > 0
    m = done["metrics"]
    assert m["dtype"] == "bfloat16" and m["merged_version"] == 1
    assert m["merged_prefix"] == merged_version_prefix(api.user_id, api.avatar_id, 1)

    # Events as for training jobs, saying which type of job and which version.
    assert pipeline.wait_events(job["id"], "job.succeeded") == ["job.started", "job.succeeded"]
    succeeded = [e for e in pipeline.seen_events if e["job_id"] == job["id"] and e["event"] == "job.succeeded"][0]
    assert succeeded["job_type"] == "fuse" and succeeded["adapter_version"] == 1

    # Shown with the avatar's jobs, newest first; the avatar's slot is free again.
    items = api.get(f"{api.base}/training-jobs").json()["items"]
    assert [(j["type"], j["status"]) for j in items[:2]] == [("fuse", "succeeded"), ("train", "succeeded")]
    assert api.get(f"{api.base}/training-jobs/{job['id']}").json()["type"] == "fuse"

    # merged/1/: safetensors weights in bf16, config, tokenizer; the manifest (written last) names them all.
    prefix = merged_version_prefix(api.user_id, api.avatar_id, 1)
    merged_dir = tmp_path / "merged"
    names = download(s3, prefix, merged_dir)
    assert MERGED_MANIFEST_FILE in names and "config.json" in names and "tokenizer.json" in names
    assert any(n.endswith(".safetensors") for n in names)
    assert not [n for n in names if n.endswith((".bin", ".pt")) or n.startswith("adapter_")]
    manifest = MergedManifest.model_validate_json((merged_dir / MERGED_MANIFEST_FILE).read_text())
    assert set(manifest.files) == set(names) - {MERGED_MANIFEST_FILE}
    assert manifest.adapter_version == 1 and manifest.job_id == job["id"] and manifest.dtype == "bfloat16"
    # The API hands the same files out: presigned URLs whose bytes match the manifest's sha256.
    assert [m["version"] for m in api.get(f"{api.base}/merged-models").json()["items"]] == [1]
    assert done["links"] == {"model": f"{api.base}/merged-models/1"}
    view = api.get(done["links"]["model"]).json()
    assert view["job_id"] == job["id"] and {f["name"] for f in view["files"]} == set(manifest.files)
    for f in view["files"]:
        assert hashlib.sha256(httpx.get(f["url"]).content).hexdigest() == f["sha256"] == manifest.files[f["name"]]
    weights = next(n for n in names if n.endswith(".safetensors"))
    with safe_open(str(merged_dir / weights), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}

    adapter_dir = tmp_path / "adapter"
    download(s3, adapter_version_prefix(api.user_id, api.avatar_id, 1), adapter_dir)

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "question 3: how are you?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir)  # nothing but transformers
        assert merged.dtype == torch.bfloat16
        merged_logits = merged(ids).logits.float()
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        base_logits = base(ids).logits
        tuned_logits = PeftModel.from_pretrained(base, adapter_dir)(ids).logits
    tolerance = BF16_RELATIVE_TOLERANCE * tuned_logits.abs().max().item()
    assert torch.allclose(merged_logits, tuned_logits, rtol=0, atol=tolerance), (
        (merged_logits - tuned_logits).abs().max().item(),
        tolerance,
    )
    # ... and the comparison can fail: the adapter moved the logits well beyond that tolerance.
    assert (tuned_logits - base_logits).abs().max().item() > 5 * tolerance
    assert (merged_logits - base_logits).abs().max().item() > 5 * tolerance


def test_fuse_of_a_missing_version_or_adapter_is_404(pipeline: Pipeline, trained: Api, s3) -> None:
    api = trained
    for body in ({"adapter_version": 99}, {"version": 99}):  # `version`: what `avatune fuse --version` sends
        r = fuse(api, body)
        assert r.status_code == 404, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert "no adapter version 99" in r.json()["detail"] and r.json()["adapter_version"] == 99
    for body in ({"adapter_version": 0}, {"adapter_version": "x"}, {"bogus": 1}):
        assert fuse(api, body).status_code == 422
    with pipeline.client() as fresh:  # no adapter at all
        r = fuse(fresh)
        assert r.status_code == 404 and "no trained adapter" in r.json()["detail"]
        assert fresh.get(f"{fresh.base}/training-jobs").json()["items"] == []
    # Nothing was queued or written for the refused requests.
    assert not keys_under(s3, merged_version_prefix(api.user_id, api.avatar_id, 99))


def test_fuse_waits_for_the_avatars_active_job(pipeline: Pipeline, trained: Api) -> None:
    api = trained
    training = api.post(f"{api.base}/training-jobs", json=FAST)
    assert training.status_code == 202, training.text
    r = fuse(api)
    assert r.status_code == 409 and r.json()["active_job_id"] == training.json()["id"]
    done, _ = wait_for_job(api, training.json()["id"], {"succeeded", "failed"}, pipeline=pipeline)
    assert done["status"] == "succeeded" and done["adapter_version"] == 2
    # An explicit older version merges that version, not the current one.
    r = fuse(api, {"adapter_version": 1})
    assert r.status_code == 202 and r.json()["adapter_version"] == 1
    assert wait_for_job(api, r.json()["id"], {"succeeded", "failed"}, pipeline=pipeline)[0]["status"] == "succeeded"


def test_fuse_request_from_another_service(pipeline: Pipeline, trained: Api, s3) -> None:
    api = trained

    def send(request: FuseRequest) -> None:
        pipeline.sqs.send_message(
            QueueUrl=pipeline.train_queue_url,
            MessageBody=request.to_message_body(),
            MessageGroupId=request.message_group_id(),
            MessageDeduplicationId=request.job_id,
        )

    # No API call first, no version: the trainer creates the record and merges the current version.
    current = api.get(f"{api.base}/adapter").json()["current_version"]
    request = FuseRequest(
        schema="avatune.fuse-request/v1",
        job_id="ext-fuse-" + uuid.uuid4().hex[:8],
        user_id=api.user_id,
        avatar_id=api.avatar_id,
    )
    assert json.loads(request.to_message_body())["schema"] == "avatune.fuse-request/v1"
    send(request)
    done, _ = wait_for_job(api, request.job_id, {"succeeded", "failed"}, pipeline=pipeline)
    assert done["status"] == "succeeded", done
    assert done["type"] == "fuse" and done["adapter_version"] == current
    assert pipeline.wait_events(request.job_id, "job.succeeded") == ["job.started", "job.succeeded"]
    keys = keys_under(s3, merged_version_prefix(api.user_id, api.avatar_id, current))
    assert merged_version_prefix(api.user_id, api.avatar_id, current) + MERGED_MANIFEST_FILE in keys

    # A version that does not exist: the job fails with the reason, and the avatar is free again.
    missing = FuseRequest(
        schema="avatune.fuse-request/v1",
        job_id="ext-fuse-" + uuid.uuid4().hex[:8],
        user_id=api.user_id,
        avatar_id=api.avatar_id,
        adapter_version=42,
    )
    send(missing)
    failed, _ = wait_for_job(api, missing.job_id, {"succeeded", "failed"}, pipeline=pipeline)
    assert failed["status"] == "failed" and "adapter version 42 does not exist" in failed["error"]
    assert pipeline.wait_events(missing.job_id, "job.failed")[-1] == "job.failed"
    again = fuse(api)
    assert again.status_code == 202, again.text
    assert wait_for_job(api, again.json()["id"], {"succeeded", "failed"}, pipeline=pipeline)[0]["status"] == "succeeded"
