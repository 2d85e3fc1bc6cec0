"""The serving handoff end to end, proved by a real engine: llama.cpp's `llama-server`.

API + a real trainer with SERVING_TARGETS=vllm,llama_cpp -> a trained version records both
engines' verdicts -> `POST {base}/exports` (gguf with the base, peft) -> the files from their
presigned URLs, sha256 checked -> llama-server on base.gguf + adapter.gguf answers with PEFT's
greedy tokens and log-probabilities (tests/engines.py states the tolerance) -> the serving hook
(infra/serving_hook.py) follows a new version, a rollback and a roll forward on a running server.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest

from tests.conftest import Api, token_for
from tests.engines import LlamaServer, assert_engine_matches, prompt_ids, reference_logprobs
from tests.pipeline import Pipeline, chat_document, start_pipeline, train_through_api, wait_for_job

TARGETS = {"SERVING_TARGETS": "vllm,llama_cpp", "SERVING_MAX_LORA_RANK": "16"}
# Strong enough that the adapter moves the tiny model's log-probabilities far beyond the tolerance.
FAST = {"num_epochs": 2, "batch_size": 4, "learning_rate": 0.01, "r": 8}
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def pipeline(stack, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    p = start_pipeline(tmp_path_factory.mktemp("serving"), tiny_model_dir, env=TARGETS)
    p.start_worker()
    try:
        yield p
    finally:
        p.stop_workers()


def train(pipeline: Pipeline, api: Api, **overrides) -> dict:
    return train_through_api(pipeline, api, {**FAST, **overrides})


def export(pipeline: Pipeline, api: Api, body: dict) -> dict:
    r = api.post(f"{api.base}/exports", json=body)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["type"] == "export", job
    done, _ = wait_for_job(api, job["id"], {"succeeded", "failed"}, pipeline=pipeline)
    assert done["status"] == "succeeded", done
    view = api.get(done["links"]["export"])
    assert view.status_code == 200, view.text
    return view.json()


def download(view: dict, dest: Path) -> Path:
    """Every file of an export from its presigned URL, checked against its sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    for file in view["files"]:
        data = httpx.get(file["url"]).content
        assert hashlib.sha256(data).hexdigest() == file["sha256"], file["name"]
        (dest / file["name"]).write_bytes(data)
    return dest


@pytest.fixture(scope="module")
def avatar(pipeline: Pipeline) -> Api:
    """An avatar with version 1 trained."""
    api = pipeline.client("served")
    assert api.put_doc("chat.jsonl", chat_document()).status_code == 201
    done = train(pipeline, api)
    assert done["adapter_version"] == 1
    yield api
    api.close()


def test_a_published_version_records_each_engines_verdict(avatar: Api) -> None:
    versions = avatar.get(f"{avatar.base}/adapter/versions").json()["items"]
    assert versions[0]["metrics"]["serving"] == {"vllm": "ok", "llama_cpp": "ok"}
    current = avatar.get(f"{avatar.base}/adapter").json()
    assert current["current_version"] == 1 and current["metrics"]["serving"]["llama_cpp"] == "ok"


def test_a_gguf_export_loads_in_llama_server_and_answers_like_peft(
    pipeline: Pipeline, avatar: Api, tiny_model_dir: Path, tmp_path: Path
) -> None:
    gguf = export(pipeline, avatar, {"format": "gguf", "include_base": True, "outtype": "f32"})
    assert gguf["adapter_version"] == 1 and gguf["format"] == "gguf" and gguf["outtype"] == "f32"
    assert sorted(f["name"] for f in gguf["files"]) == ["adapter.gguf", "base.gguf"]
    assert gguf["prefix"].endswith(f"/avatars/{avatar.avatar_id}/exports/1/gguf/")
    peft = export(pipeline, avatar, {"format": "peft"})
    versions = avatar.get(f"{avatar.base}/adapter/versions").json()["items"]
    # the peft export is the version's own files, byte for byte
    assert {f["name"]: f["sha256"] for f in peft["files"]} == json.loads(
        avatar.get(f"{avatar.base}/adapter/versions/1/files/metrics.json").content
    )["files"]
    assert versions[0]["version"] == 1
    listed = avatar.get(f"{avatar.base}/exports").json()["items"]
    assert [(e["adapter_version"], e["format"]) for e in listed] == [(1, "gguf"), (1, "peft")]

    gguf_dir, peft_dir = download(gguf, tmp_path / "gguf"), download(peft, tmp_path / "peft")
    server = LlamaServer(gguf_dir / "base.gguf", [gguf_dir / "adapter.gguf"], tmp_path / "llama.log")
    try:
        done = server.complete(prompt_ids(tiny_model_dir), NEW_TOKENS)
    finally:
        server.stop()
    ids = done.prompt + done.tokens
    reference = reference_logprobs(tiny_model_dir, peft_dir, ids)
    worst = assert_engine_matches(done, reference, reference_logprobs(tiny_model_dir, None, ids))
    print(f"llama-server vs PEFT: {len(done.tokens)} greedy tokens equal, log-probabilities within {worst:.1e}")


class Restarts:
    """The llama_cpp engine's restart for the hook: llama-server started again on the same port
    with every adapter the hook fetched so far, only the new one applied."""

    def __init__(self, base: Path, log: Path) -> None:
        self.base, self.log = base, log
        self.adapters: list[Path] = []
        self.server: LlamaServer | None = None
        self.count = 0

    def __call__(self, adapter: Path) -> None:
        port = self.server.port if self.server else None
        if self.server is not None:
            self.server.stop()
        self.adapters = [a for a in self.adapters if a != adapter] + [adapter]
        scales = [1.0 if a == adapter else 0.0 for a in self.adapters]
        self.server = LlamaServer(self.base, self.adapters, self.log, scales, port=port)
        self.count += 1


def test_the_serving_hook_follows_new_versions_and_rollbacks(
    pipeline: Pipeline, avatar: Api, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from infra.serving_hook import ApiExports, LlamaCppEngine, ServingHook

    base = download(export(pipeline, avatar, {"format": "gguf", "include_base": True, "outtype": "f32"}), tmp_path)
    restarts = Restarts(base / "base.gguf", tmp_path / "llama.log")
    restarts(base / "adapter.gguf")  # the endpoint serves version 1
    engine = LlamaCppEngine(restarts.server.url, restarts)
    token = token_for("serving-hook", role="service")
    hook = ServingHook(ApiExports(pipeline.api_url, token, tmp_path / "hook"), engine)
    ids = prompt_ids(tiny_model_dir)

    def served_version_matches(version: int) -> None:
        peft = download(api_view(version, "peft"), tmp_path / f"peft-{version}")
        done = restarts.server.complete(ids, NEW_TOKENS)
        full = done.prompt + done.tokens
        reference = reference_logprobs(tiny_model_dir, peft, full)
        assert_engine_matches(done, reference, reference_logprobs(tiny_model_dir, None, full))

    def api_view(version: int, fmt: str) -> dict:
        r = avatar.get(f"{avatar.base}/exports/{version}/{fmt}")
        return (
            r.json() if r.status_code == 200 else export(pipeline, avatar, {"format": fmt, "adapter_version": version})
        )

    try:
        # a new version trained: its job.succeeded makes it current; llama.cpp needs a restart
        job = train(pipeline, avatar, seed=7, learning_rate=0.02)
        assert job["adapter_version"] == 2 and job["metrics"]["promoted"] is True
        events = [e for e in _drain(pipeline, job["id"]) if e["event"] == "job.succeeded"]
        assert [hook.handle(json.dumps(e)) for e in events] == [f"restarted with {_adapter(tmp_path, avatar, 2)}"]
        served_version_matches(2)

        # a rollback (promote 1): adapter.promoted; version 1's file is not loaded yet: restart
        assert avatar.post(f"{avatar.base}/adapter/versions/1/promote").status_code == 200
        (rollback,) = pipeline.adapter_events(avatar.avatar_id)
        assert rollback["adapter_version"] == 1 and rollback["previous_version"] == 2
        assert hook.handle(json.dumps(rollback)).startswith("restarted with")
        served_version_matches(1)

        # a roll forward (promote 2): both files are loaded now, so the scales switch in place
        pid = restarts.server.proc.pid
        assert avatar.post(f"{avatar.base}/adapter/versions/2/promote").status_code == 200
        forward = pipeline.adapter_events(avatar.avatar_id)[-1]
        assert forward["adapter_version"] == 2
        assert hook.handle(json.dumps(forward)).startswith("switched to adapter.gguf of version 2")
        assert restarts.server.proc.pid == pid and restarts.count == 3
        served_version_matches(2)

        # a stale event (version 1 is no longer current) is skipped; other events are ignored
        assert hook.handle(json.dumps(rollback)) is None
        started = next(e for e in pipeline.seen_events if e.get("job_id") == job["id"] and e["event"] == "job.started")
        assert hook.handle(json.dumps(started)) is None
    finally:
        if restarts.server is not None:
            restarts.server.stop()


def _drain(pipeline: Pipeline, job_id: str) -> list[dict]:
    pipeline.wait_events(job_id, "job.succeeded")
    return [e for e in pipeline.seen_events if e.get("job_id") == job_id]


def _adapter(tmp_path: Path, avatar: Api, version: int) -> Path:
    return (tmp_path / "hook" / avatar.user_id / avatar.avatar_id / str(version) / "gguf" / "adapter.gguf").resolve()
