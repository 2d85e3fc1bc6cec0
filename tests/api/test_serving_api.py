"""Serving profiles over real HTTP and real workers: with SERVING_TARGETS=vllm,llama_cpp and
SERVING_MAX_LORA_RANK=16 the API refuses settings the engines cannot load (`PUT {base}/adapter`,
`POST {base}/training-jobs`: 422 problem+json naming the field and the engine's rule, nothing
stored), the trainer refuses the same for requests sent straight to the queue, and a version
trained where no targets were set (modules_to_save: whole weights) is recorded as unloadable,
refused as gguf and never made current again. The export API's own checks close the module."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import pytest

from contracts.messages import TrainRequest
from tests.conftest import Api
from tests.pipeline import Pipeline, chat_document, start_pipeline, wait_for_job

TARGETS = {"SERVING_TARGETS": "vllm,llama_cpp", "SERVING_MAX_LORA_RANK": "16"}
RANK_RULE = "vLLM loads adapters of rank at most max_lora_rank (16, SERVING_MAX_LORA_RANK)"


@pytest.fixture(scope="module")
def pipeline(stack, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    p = start_pipeline(tmp_path_factory.mktemp("serving-api"), tiny_model_dir, env=TARGETS)
    try:
        yield p
    finally:
        p.stop_workers()


@pytest.fixture
def api(pipeline: Pipeline):
    with pipeline.client("avatar-" + uuid.uuid4().hex[:6]) as client:
        yield client


def _refused(resp, field: str, engines: list[str]) -> dict:
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    problem = resp.json()
    assert problem["field"] == field, problem
    assert [v["engine"] for v in problem["violations"]] == engines, problem
    assert "SERVING_TARGETS=vllm,llama_cpp" in problem["detail"]
    return problem


def test_put_adapter_refuses_what_the_targets_cannot_load(api: Api) -> None:
    rank = _refused(api.put(f"{api.base}/adapter", json={"r": 32}), "r", ["vllm"])
    assert rank["detail"].startswith(f"r: {RANK_RULE}")
    dora = _refused(api.put(f"{api.base}/adapter", json={"use_dora": True}), "use_dora", ["vllm", "llama_cpp"])
    assert "vLLM does not support DoRA" in dora["detail"] and "magnitude vectors" in dora["detail"]
    saved = _refused(
        api.put(f"{api.base}/adapter", json={"modules_to_save": ["lm_head"]}), "modules_to_save", ["vllm", "llama_cpp"]
    )
    assert "classification heads" in saved["detail"]
    assert api.get(f"{api.base}/adapter").status_code == 404, "a refused PUT stores nothing"

    ok = api.put(f"{api.base}/adapter", json={"r": 16, "use_dora": False})
    assert ok.status_code == 200 and ok.json()["config"]["r"] == 16
    # the stored configuration is judged with the patch: a later PUT cannot sneak a rank in
    _refused(api.put(f"{api.base}/adapter", json={"learning_rate": 0.001, "r": 64}), "r", ["vllm"])
    assert api.get(f"{api.base}/adapter").json()["config"]["learning_rate"] != 0.001


def test_job_specs_refuse_the_same(api: Api) -> None:
    assert api.put_doc("chat.jsonl", chat_document(8)).status_code == 201
    jobs = f"{api.base}/training-jobs"
    _refused(api.post(jobs, json={"r": 32}), "r", ["vllm"])
    _refused(
        api.post(jobs, json={"use_dora": True, "tuning": {"learning_rate": 0.01}}), "use_dora", ["vllm", "llama_cpp"]
    )
    _refused(api.post(jobs, json={"modules_to_save": ["embed_tokens"]}), "modules_to_save", ["vllm", "llama_cpp"])
    assert api.get(jobs).json()["items"] == [], "no job was created"


def _send(pipeline: Pipeline, api: Api, **spec) -> str:
    """A train request straight on the queue, as another service would send it."""
    identity = {"job_id": "srv-" + uuid.uuid4().hex[:10], "user_id": api.user_id, "avatar_id": api.avatar_id}
    return pipeline.send(TrainRequest.model_validate({"schema": "avatune.train-request/v1", **identity, **spec}))


def test_the_trainer_refuses_queue_requests_the_targets_cannot_load(pipeline: Pipeline, api: Api) -> None:
    worker = pipeline.start_worker()
    try:
        assert api.put_doc("chat.jsonl", chat_document(8)).status_code == 201
        for config, rule in [
            ({"r": 32}, f"r: {RANK_RULE}"),
            ({"use_dora": True}, "use_dora: vLLM does not support DoRA"),
            ({"modules_to_save": ["lm_head"]}, "modules_to_save: vLLM supports modules_to_save only"),
        ]:
            job_id = _send(pipeline, api, config=config)
            done, _ = wait_for_job(api, job_id, {"succeeded", "failed"}, pipeline=pipeline)
            assert done["status"] == "failed", done
            assert done["error"].startswith("the serving targets could not load this adapter: " + rule), done
            assert done["adapter_version"] is None and done["attempts"] == 1
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)


def test_a_version_the_targets_cannot_load_is_recorded_and_never_made_current_again(
    pipeline: Pipeline, api: Api
) -> None:
    # A worker that serves no engine (SERVING_TARGETS unset) trains what the API would refuse.
    worker = pipeline.start_worker(SERVING_TARGETS="")
    try:
        assert api.put_doc("chat.jsonl", chat_document(16)).status_code == 201
        job_id = _send(pipeline, api, config={"r": 4, "num_epochs": 1, "batch_size": 8, "modules_to_save": ["lm_head"]})
        done, _ = wait_for_job(api, job_id, {"succeeded", "failed"}, pipeline=pipeline)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
    assert done["status"] == "succeeded" and done["adapter_version"] == 1, done
    serving = done["metrics"]["serving"]
    assert "adapter_config.json modules_to_save: vLLM supports modules_to_save only" in serving["vllm"]
    assert "adapter_model.safetensors: llama.cpp converts only lora_A and lora_B" in serving["llama_cpp"]
    assert api.get(f"{api.base}/adapter").json()["metrics"]["serving"] == serving, "the manifest records it"

    gguf = api.post(f"{api.base}/exports", json={"format": "gguf"})
    assert gguf.status_code == 422 and gguf.json()["field"] == "format", gguf.text
    assert "cannot be exported as gguf: adapter_config.json modules_to_save: llama.cpp" in gguf.json()["detail"]
    promote = api.post(f"{api.base}/adapter/versions/1/promote")
    assert promote.status_code == 409 and "a serving target cannot load it" in promote.json()["detail"]
    assert not pipeline.adapter_events(api.avatar_id), "a refused promote announces nothing"


def test_the_export_api_checks_its_input(pipeline: Pipeline, api: Api) -> None:
    exports = f"{api.base}/exports"
    assert api.post(exports, json={"format": "gguf"}).status_code == 404  # no adapter yet
    for body in ({"format": "onnx"}, {}, {"format": "peft", "include_base": True}, {"format": "gguf", "x": 1}):
        r = api.post(exports, json=body)
        assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json"), body
    assert api.post(exports, json={"format": "gguf", "adapter_version": 0}).status_code == 422
    assert api.get(exports).json() == {"items": []}
    assert api.get(f"{exports}/1/gguf").status_code == 404
    assert api.get(f"{exports}/1/onnx").status_code == 422
    assert api.get(f"{exports}/0/gguf").status_code == 422
    with pipeline.client(api.avatar_id) as other:
        forbidden = other.get(f"/v1/users/{api.user_id}/avatars/{api.avatar_id}/exports")
        assert forbidden.status_code == 403
