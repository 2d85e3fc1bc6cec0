"""The full job spec in `POST {base}/training-jobs`: impossible specs refused with a 422 naming
the field (nothing stored), the flat and spec forms stored as the job's config and spec,
explicit `datasets` and inline `training_data` trained on by a real trainer, and
`artifacts.output_uri` receiving a copy of the published version. A dataset outside the
caller's prefix on a request sent straight to the queue fails the job."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator

import pytest

from contracts.jobs import new_job_id
from contracts.keys import adapter_version_prefix, job_key, user_prefix
from contracts.messages import TrainRequest
from contracts.spec import Artifacts, DatasetSource
from infra.processes import api_server
from tests.conftest import TEST_BUCKET, Api, chat_line, keys_under
from tests.pipeline import Pipeline, chat_document, wait_for_job

FAST = {"num_epochs": 2, "batch_size": 4, "learning_rate": 0.01, "r": 4}
CHAT = chat_line("How was the trip?", "Long, but the food was great.")


def post(api: Api, body) -> object:
    return api.post(f"{api.base}/training-jobs", json=body)


def refused(api: Api, s3, body, field: str, words: str) -> None:
    """`body` is a 422 problem naming `field`, and the user's prefix holds only what it held."""
    before = keys_under(s3, user_prefix(api.user_id))
    r = post(api, body)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert problem["field"] == field, problem
    assert field in problem["detail"] and words in problem["detail"], problem["detail"]
    assert keys_under(s3, user_prefix(api.user_id)) == before


# -- refused before queueing -----------------------------------------------------------------


def test_impossible_specs_are_422_naming_the_field(api: Api, s3) -> None:
    assert api.put_doc("chat.jsonl", CHAT).status_code == 201  # so a refusal is never the 409
    me = f"s3://{TEST_BUCKET}/users/{api.user_id}"
    cases = [
        ({"target_modules": ["q_proj", "wq"]}, "target_modules", "'wq'"),
        (
            {"base_model": {"name": "meta-llama/Llama-3.2-1B-Instruct"}, "target_modules": ["c_attn"]},
            "target_modules",
            "'c_attn'",
        ),
        ({"method": "full", "qlora": {"quant_type": "nf4"}}, "qlora", "4-bit"),
        ({"method": "full", "double_quant": True}, "double_quant", "4-bit"),
        (
            {"base_model": {"name": "meta-llama/Llama-3.2-1B-Instruct"}, "trainable_layers": [0, 16]},
            "trainable_layers",
            "16 decoder layers",
        ),
        ({"gpus": 9}, "gpus", "MAX_GPUS_PER_JOB"),
        ({"resources": {"gpus": 16}}, "resources.gpus", "at most 8"),
        ({"tuning": {"batch_size": 0}}, "tuning.batch_size", "greater than or equal to 1"),
        ({"batch_size": 0}, "batch_size", "greater than or equal to 1"),
        (
            {"datasets": [{"uri": f"s3://{TEST_BUCKET}/users/someone-else/x.jsonl"}]},
            "datasets.0.uri",
            "caller's prefix",
        ),
        (
            {"datasets": [{"uri": f"{me}/ok.jsonl"}, {"uri": f"s3://other-bucket/users/{api.user_id}/x.jsonl"}]},
            "datasets.1.uri",
            "caller's prefix",
        ),
        ({"datasets": [{"uri": f"{me}/../someone-else/x.jsonl"}]}, "datasets.0.uri", "'..'"),
        ({"datasets": [{"uri": f"{me}//x.jsonl"}]}, "datasets.0.uri", "empty path segments"),
        ({"datasets": [{"uri": f"{me}/folder/"}]}, "datasets.0.uri", "name a key"),
        ({"datasets": [{"uri": f"https://example.com/{api.user_id}/x.jsonl"}]}, "datasets.0.uri", "s3://"),
        ({"datasets": [{"uri": f"{me}/data.csv"}]}, "datasets.0.format", "format 'auto'"),
        ({"datasets": [{"uri": f"{me}/x.jsonl", "format": "xml"}]}, "datasets.0.format", "Input should be"),
        ({"artifacts": {"output_uri": f"s3://{TEST_BUCKET}/users/"}}, "artifacts.output_uri", "caller's prefix"),
        (
            {"base_model": {"name": f"s3://{TEST_BUCKET}/users/someone-else/models/base/"}},
            "base_model.name",
            "caller's prefix",
        ),
        ({"artifacts": {"log_uri": f"{me}/logs/../../x/"}}, "artifacts.log_uri", "'..'"),
        ({"integrations": {"report_to": ["comet"]}}, "integrations.report_to.0", "Input should be"),
        ({"training_data": []}, "training_data", "at least one record"),
        (
            {"training_data": ["fine", {"messages": [{"role": "user", "content": "no answer"}]}]},
            "training_data.1",
            "assistant",
        ),
        ({"training_data": ["x" * 1000] * 300}, "training_data", "MAX_UPLOAD_BYTES"),  # 256 KiB in tests
        ({"warm_start": True, "method": "full"}, "warm_start", "LoRA"),
        ({"promote": "if_better", "method": "full"}, "promote", "no current one"),
        ({"bogus": 1}, "bogus", "Extra inputs"),
        # Without the flagged documents a job trains on its training datasets, so it needs one.
        ({"use_flagged_documents": False}, "use_flagged_documents", "nothing to train on"),
        (
            {"use_flagged_documents": False, "datasets": [{"uri": f"{me}/x.jsonl", "split": "eval"}]},
            "use_flagged_documents",
            "split train",
        ),
        ({"use_flagged_documents": False, "training_data": ["hi"]}, "use_flagged_documents", "flagged document"),
        ({"datasets": [{"uri": f"{me}/x.jsonl", "split": "test"}]}, "datasets.0.split", "Input should be"),
    ]
    for body, field, words in cases:
        refused(api, s3, body, field, words)
    # Nothing of any refused request is on the avatar: no job, no inline document.
    assert api.get(f"{api.base}/training-jobs").json()["items"] == []
    names = [d["name"] for d in api.get(api.docs).json()["items"]]
    assert names == ["chat.jsonl"]


def test_flat_and_spec_fields_make_the_jobs_config_and_spec(api: Api, s3) -> None:
    me = f"s3://{TEST_BUCKET}/users/{api.user_id}"
    # No flagged document: datasets are data enough (no 409).
    body = {
        "r": 8,
        "learning_rate": 0.001,
        "target_modules": ["q_proj", "v_proj"],
        "tuning": {"learning_rate": 0.002, "max_steps": 7},
        "resources": {"gpus": 1, "max_duration_minutes": 5},
        "base_model": {"name": "meta-llama/Llama-3.2-1B-Instruct", "token_env": "HF_TOKEN"},
        "trainable_layers": [15],
        "datasets": [{"uri": f"{me}/sets/a.jsonl", "format": "chat"}],
        "artifacts": {"output_uri": f"{me}/exports/run"},
        "promote": "if_better",
    }
    r = post(api, body)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["config"] == {
        "r": 8,
        "learning_rate": 0.002,
        "max_steps": 7,
        "gpus": 1,
        "target_modules": ["q_proj", "v_proj"],
        "trainable_layers": [15],
    }
    assert job["spec"]["datasets"] == [{"uri": f"{me}/sets/a.jsonl", "format": "chat"}]
    assert job["spec"]["base_model"]["token_env"] == "HF_TOKEN" and job["spec"]["promote"] == "if_better"
    assert job["spec"]["resources"] == {"gpus": 1, "max_duration_minutes": 5}
    stored = json.loads(
        s3.get_object(Bucket=TEST_BUCKET, Key=job_key(api.user_id, api.avatar_id, job["id"]))["Body"].read()
    )
    assert stored["spec"]["artifacts"]["output_uri"] == f"{me}/exports/run"
    assert stored["config"]["learning_rate"] == 0.002


# -- end to end on a real trainer -----------------------------------------------------------


@pytest.fixture(scope="module")
def worker(pipeline: Pipeline):
    proc = pipeline.start_worker()
    yield proc
    assert proc.poll() is None, "the worker died:\n" + pipeline.worker_log()


def test_datasets_train_and_output_uri_gets_the_version(pipeline: Pipeline, worker, s3) -> None:
    with pipeline.client() as api:
        key = f"users/{api.user_id}/sets/chats.jsonl"
        etag = s3.put_object(Bucket=TEST_BUCKET, Key=key, Body=chat_document())["ETag"].strip('"')
        uri = f"s3://{TEST_BUCKET}/{key}"
        output = f"s3://{TEST_BUCKET}/users/{api.user_id}/exports/run-1/"
        r = post(api, {**FAST, "datasets": [{"uri": uri, "format": "chat"}], "artifacts": {"output_uri": output}})
        assert r.status_code == 202, r.text  # no flagged document: no 409
        done, _ = wait_for_job(api, r.json()["id"], {"succeeded", "failed"}, pipeline=pipeline)
        assert done["status"] == "succeeded", done
        # The job trained on the dataset alone, pinned by its ETag.
        assert [(d["name"], d["etag"]) for d in done["data"]] == [(uri, etag)]
        assert done["metrics"]["documents"] == 1 and done["metrics"]["train_examples"] > 0
        # The version's files (adapter + metrics) were copied to output_uri, byte for byte.
        version_prefix = adapter_version_prefix(api.user_id, api.avatar_id, done["adapter_version"])
        exported = {k.rsplit("/", 1)[-1] for k in keys_under(s3, f"users/{api.user_id}/exports/run-1/")}
        assert {"adapter_config.json", "adapter_model.safetensors", "metrics.json"} <= exported
        assert done["metrics"]["output_uri"] == output and set(done["metrics"]["output_files"]) == exported
        for name in ("adapter_model.safetensors", "metrics.json"):
            copy = s3.get_object(Bucket=TEST_BUCKET, Key=f"users/{api.user_id}/exports/run-1/{name}")["Body"].read()
            assert copy == s3.get_object(Bucket=TEST_BUCKET, Key=version_prefix + name)["Body"].read()


def test_inline_training_data_is_stored_then_trained_on(pipeline: Pipeline, worker, s3) -> None:
    with pipeline.client() as api:
        records = [f"plain text record {i}: the avatar says hello" for i in range(10)] + [
            {"messages": [{"role": "user", "content": f"q{i}?"}, {"role": "assistant", "content": f"a{i}."}]}
            for i in range(20)
        ]
        r = post(api, {**FAST, "training_data": records})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        name = f"inline-{job_id}.jsonl"
        # Stored as a flagged training document before the job was queued.
        doc = api.get(f"{api.docs}/{name}")
        assert doc.status_code == 200
        lines = [json.loads(line) for line in doc.text.splitlines()]
        assert lines[0] == {"text": records[0]} and lines[10] == records[10] and len(lines) == 30
        listed = api.get(api.docs, params={"use_for_training": "true"}).json()["items"]
        assert [d["name"] for d in listed] == [name]
        done, _ = wait_for_job(api, job_id, {"succeeded", "failed"}, pipeline=pipeline)
        assert done["status"] == "succeeded", done
        assert [d["name"] for d in done["data"]] == [name]


def test_queue_request_with_foreign_dataset_or_output_fails_the_job(pipeline: Pipeline, worker, s3) -> None:
    with pipeline.client() as api, pipeline.client() as victim:
        secret_key = f"users/{victim.user_id}/private/chats.jsonl"
        s3.put_object(Bucket=TEST_BUCKET, Key=secret_key, Body=chat_document())
        assert api.put_doc("chat.jsonl", chat_document()).status_code == 201
        requests = {
            "outside the caller's prefix": TrainRequest(
                schema="avatune.train-request/v1",
                job_id=new_job_id(),
                user_id=api.user_id,
                avatar_id=api.avatar_id,
                config=FAST,
                datasets=[DatasetSource(uri=f"s3://{TEST_BUCKET}/{secret_key}")],
            ),
            "artifacts.output_uri": TrainRequest(
                schema="avatune.train-request/v1",
                job_id=new_job_id(),
                user_id=api.user_id,
                avatar_id=api.avatar_id,
                config=FAST,
                artifacts=Artifacts(output_uri=f"s3://{TEST_BUCKET}/users/{victim.user_id}/out/"),
            ),
        }
        for words, request in requests.items():
            pipeline.sqs.send_message(
                QueueUrl=pipeline.train_queue_url,
                MessageBody=request.to_message_body(),
                MessageGroupId=request.message_group_id(),
                MessageDeduplicationId=request.job_id,
            )
            done, _ = wait_for_job(api, request.job_id, {"succeeded", "failed"}, pipeline=pipeline)
            assert done["status"] == "failed" and words in done["error"], done
            assert done["data"] == [] and done["adapter_version"] is None
        # Nothing was read into a version nor written to the victim's prefix.
        assert keys_under(s3, user_prefix(victim.user_id)) == [secret_key]


# -- inline data is removed again when the job cannot be queued ------------------------------


@pytest.fixture(scope="module")
def no_queue_api(stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An API whose train queue does not exist: every send fails."""
    env = dict(os.environ, TRAIN_QUEUE_NAME=f"missing-{uuid.uuid4().hex[:8]}.fifo")
    with api_server(env, tmp_path_factory.mktemp("no-queue") / "api.log") as url:
        yield url


def test_inline_data_is_removed_when_queueing_fails(no_queue_api: str, s3) -> None:
    with Api(no_queue_api, "u-" + uuid.uuid4().hex[:12], "avatar-1") as api:
        assert api.put_doc("kept.jsonl", CHAT).status_code == 201
        before = keys_under(s3, user_prefix(api.user_id))
        r = post(api, {"training_data": ["one record", "two records"]})
        assert r.status_code == 503, r.text
        assert keys_under(s3, user_prefix(api.user_id)) == before  # no inline document, no job
        assert [d["name"] for d in api.get(api.docs).json()["items"]] == ["kept.jsonl"]
