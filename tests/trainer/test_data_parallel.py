"""A 2-process data-parallel job (gloo on the CPU) trains the same adapter as one process with
the same global batch: the ranks trained on disjoint halves of each batch and rank 0 alone
wrote the result."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load

from contracts.keys import adapter_version_prefix
from tests.conftest import TEST_BUCKET
from tests.pipeline import Pipeline, chat_document, wait_for_job

# No held-out split: every example trains, so both runs see exactly the same batches.
SAME = {
    "method": "lora",
    "lora_dropout": 0.0,
    "num_epochs": 1,
    "r": 4,
    "seed": 7,
    "learning_rate": 0.001,
    "eval_fraction": 0.0,
}


@pytest.fixture(scope="module")
def worker(pipeline: Pipeline):
    proc = pipeline.start_worker()
    yield proc
    assert proc.poll() is None, pipeline.worker_log()


def train(pipeline: Pipeline, s3, overrides: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    with pipeline.client() as api:
        # 24 examples, none held out: 6 full global batches of 4 (a ragged last batch would be
        # padded by repeating samples on the ranks).
        api.put_doc("chat.jsonl", chat_document(24))
        r = api.post(f"{api.base}/training-jobs", json=dict(SAME, **overrides))
        assert r.status_code == 202, r.text
        done, _ = wait_for_job(api, r.json()["id"], {"succeeded", "failed"}, pipeline=pipeline, timeout=240)
        if done["status"] != "succeeded":
            return done, {}
        key = adapter_version_prefix(api.user_id, api.avatar_id, done["adapter_version"]) + "adapter_model.safetensors"
        return done, load(s3.get_object(Bucket=TEST_BUCKET, Key=key)["Body"].read())


def test_two_process_job_matches_one_process(pipeline: Pipeline, worker, s3) -> None:
    parallel, parallel_weights = train(pipeline, s3, {"gpus": 2, "batch_size": 2})
    single, single_weights = train(pipeline, s3, {"gpus": 1, "batch_size": 4})
    assert parallel["status"] == single["status"] == "succeeded", (parallel, single)
    assert parallel["metrics"]["world_size"] == 2 and "world_size" not in single["metrics"]
    assert parallel["metrics"]["steps"] == single["metrics"]["steps"]
    assert set(parallel_weights) == set(single_weights)
    moved = max(w.abs().max().item() for k, w in single_weights.items() if "lora_B" in k)
    assert moved > 0
    # lora_B starts at zero, so its size is what training changed: the two runs must agree far
    # more closely than that (float summation order differs between one and two processes).
    for name, weight in single_weights.items():
        diff = (parallel_weights[name] - weight).abs().max().item()
        assert diff <= 1e-3 * moved, (name, diff, moved)


def test_more_gpus_than_the_worker_has_fails_clearly(pipeline: Pipeline, worker, s3) -> None:
    too_many = (os.cpu_count() or 1) + 1
    done, _ = train(pipeline, s3, {"gpus": too_many, "batch_size": 2})
    assert done["status"] == "failed"
    assert f"asks for {too_many} GPUs" in done["error"]
