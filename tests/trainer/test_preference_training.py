"""Preference training end to end: a real API, a real worker, the real tiny model.

- a DPO job over pairs raises the trained adapter's chosen-minus-rejected log-prob margin on
  those pairs above the reference's (measured here, independently of the job's own metrics: a
  job that trains nothing or the wrong way fails it); the same for KTO with up/down ratings;
- the whole loop through the API: a supervised job, a generation, feedback on it with a
  correction, a DPO job on top of the supervised adapter (its reference), the new version's
  metrics and samples.json; each job reads only its own kind of document;
- feedback on a generation the caller may not read: 403 on another user's path, 404 on one's own.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from contracts.keys import adapter_version_prefix
from tests.conftest import TEST_BUCKET, Api
from tests.pipeline import Pipeline, chat_document, jsonl, pairs, prompt, wait_for_job

FAST = {"num_epochs": 2, "batch_size": 4, "r": 4}
# The tiny random model needs a far higher rate than a real one to move in a few steps.
PREFERENCE = {"learning_rate": 0.005}
QUESTION = "question 3: how are you?"


def ratings(n: int = 16) -> list[dict]:
    """KTO's prompt/completion/label: the even questions get a good reply, the odd ones a bad one."""
    return [
        {
            "prompt": prompt(i, "rated "),
            "completion": [
                {
                    "role": "assistant",
                    "content": f"great, thanks for asking {i}" if i % 2 == 0 else f"leave me alone {i}",
                }
            ],
            "label": i % 2 == 0,
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def worker(pipeline: Pipeline):
    proc = pipeline.start_worker()
    yield proc
    assert proc.poll() is None, "the worker died:\n" + pipeline.worker_log()


def run_job(pipeline: Pipeline, api: Api, body: dict) -> dict:
    r = api.post(f"{api.base}/training-jobs", json=body)
    assert r.status_code == 202, r.text
    done, _ = wait_for_job(api, r.json()["id"], {"succeeded", "failed"}, pipeline=pipeline)
    assert done["status"] == "succeeded", done
    return done


def download_version(s3, api: Api, version: int, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        key = adapter_version_prefix(api.user_id, api.avatar_id, version) + name
        (dest / name).write_bytes(s3.get_object(Bucket=TEST_BUCKET, Key=key)["Body"].read())
    return dest


@torch.no_grad()
def reply_logp(model, tokenizer, messages: list[dict], reply: str) -> float:
    """log p(reply | messages): the reply's tokens after the chat template's assistant header."""
    head = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": reply}], return_dict=True)[
        "input_ids"
    ]
    assert full[: len(head)] == head
    ids = torch.tensor([full])
    logps = model(ids).logits[0, :-1].float().log_softmax(-1)
    return float(logps[len(head) - 1 :].gather(1, ids[0, len(head) :, None]).sum())


def models(tiny_model_dir: Path, adapter_dir: Path, reference_dir: Path | None = None):
    """(reference, policy): the base (or the base with the reference adapter) and the base with the new adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def load(adapter: Path | None):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        return (PeftModel.from_pretrained(model, adapter) if adapter else model).eval()

    return tokenizer, load(reference_dir), load(adapter_dir)


def test_dpo_job_raises_the_chosen_minus_rejected_margin_above_the_reference(
    pipeline: Pipeline, worker, s3, tiny_model_dir, tmp_path
) -> None:
    data = pairs()
    with pipeline.client() as api:
        assert api.put_doc("pairs.jsonl", jsonl(data)).status_code == 201
        done = run_job(pipeline, api, {**FAST, "method": "lora", "objective": "dpo", "preference": PREFERENCE})
        m = done["metrics"]
        assert m["objective"] == "dpo" and m["method"] == "lora" and m["reference_policy"] == "base model"
        assert "no current adapter" in m["reference_reason"]
        assert m["preference_pairs"] == 16 and m["train_examples"] + m["eval_examples"] == 16
        assert m["beta"] == 0.1 and m["learning_rate"] == 0.005 and m["reference_log_probs"] == "once per job"
        assert m["steps"] > 0 and done["adapter_version"] == 1
        adapter = download_version(s3, api, 1, tmp_path / "v1")

    tokenizer, reference, policy = models(tiny_model_dir, adapter)

    def margin(model, pair: dict) -> float:
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        return reply_logp(model, tokenizer, pair["prompt"], chosen) - reply_logp(
            model, tokenizer, pair["prompt"], rejected
        )

    before = [margin(reference, p) for p in data]
    after = [margin(policy, p) for p in data]
    gains = [a - b for a, b in zip(after, before)]
    # Trained, and towards the chosen replies: on average and on nearly every pair.
    assert sum(gains) / len(gains) > 1.0, (before, after)
    assert sum(g > 0 for g in gains) >= len(gains) - 1, gains
    # The job's own held-out numbers say the same.
    assert m["logp_margin_after"] > m["logp_margin_before"] and m["preference_accuracy"] > 0.5


def test_kto_job_raises_the_desirable_minus_undesirable_gap_above_the_reference(
    pipeline: Pipeline, worker, s3, tiny_model_dir, tmp_path
) -> None:
    data = ratings()
    with pipeline.client() as api:
        assert api.put_doc("ratings.jsonl", jsonl(data)).status_code == 201
        done = run_job(pipeline, api, {**FAST, "method": "qlora", "objective": "kto", "preference": PREFERENCE})
        m = done["metrics"]
        assert m["objective"] == "kto" and m["method"] == "qlora" and m["quant_type"] == "nf4"
        assert m["preference_ratings"] == 16 and m["preference_pairs"] == 0
        # Balanced by the training split's counts: thumbs-up weighed by (downs / ups).
        assert m["undesirable_weight"] == 1.0 and 0.5 <= m["desirable_weight"] <= 2.0
        adapter = download_version(s3, api, 1, tmp_path / "v1")

    tokenizer, reference, policy = models(tiny_model_dir, adapter)

    def gap(model) -> float:
        scores = [(reply_logp(model, tokenizer, r["prompt"], r["completion"][0]["content"]), r["label"]) for r in data]
        up = [s for s, label in scores if label]
        down = [s for s, label in scores if not label]
        return sum(up) / len(up) - sum(down) / len(down)

    before, after = gap(reference), gap(policy)
    assert after > before + 1.0, (before, after)
    assert m["logp_gap_after"] is None or m["logp_gap_after"] > m["logp_gap_before"]


def test_the_feedback_loop_through_the_api(pipeline: Pipeline, worker, s3, tiny_model_dir, tmp_path) -> None:
    with pipeline.client() as api:
        # Demonstrations and preferences side by side: each objective reads only its own kind.
        assert api.put_doc("chat.jsonl", chat_document(24)).status_code == 201
        assert api.put_doc("pairs.jsonl", jsonl(pairs(8))).status_code == 201
        sft = run_job(pipeline, api, {**FAST, "learning_rate": 0.01})
        assert [d["name"] for d in sft["data"]] == ["chat.jsonl"]
        assert sft["metrics"]["documents_of_other_objective"] == 1 and sft["adapter_version"] == 1

        # A generation by the supervised adapter, and a correction of it.
        r = api.post(f"{api.base}/generations", json={"prompt": QUESTION, "max_new_tokens": 8})
        assert r.status_code == 202, r.text
        generation, _ = wait_for_job(api, r.json()["id"], {"succeeded", "failed"}, pipeline=pipeline)
        assert generation["status"] == "succeeded", generation
        completion = generation["result"]["completion"]
        correction = "great, thanks for asking, and you?"
        r = api.post(
            f"{api.base}/feedback",
            json={"generation_id": generation["id"], "rating": "down", "correction": correction},
        )
        assert r.status_code == 201, r.text
        item = r.json()
        assert item["kind"] == "pair" and item["rating"] == "down"
        assert (item["chosen"], item["rejected"]) == (correction, completion)
        assert item["messages"] == [{"role": "user", "content": QUESTION}]
        assert item["generation_id"] == generation["id"] and item["adapter_version"] == 1
        assert r.headers["location"].endswith(f"/feedback/{item['id']}")
        # It is a training document like any other, flagged for training.
        docs = {d["name"]: d for d in api.get(api.docs).json()["items"]}
        assert docs[item["document"]]["use_for_training"] is True
        assert [i["id"] for i in api.get(f"{api.base}/feedback").json()["items"]] == [item["id"]]

        dpo = run_job(pipeline, api, {**FAST, "objective": "dpo", "preference": PREFERENCE, "promote": "if_better"})
        m = dpo["metrics"]
        assert sorted(d["name"] for d in dpo["data"]) == sorted(["pairs.jsonl", item["document"]])
        assert m["documents_of_other_objective"] == 1  # chat.jsonl, left out
        assert m["reference_policy"] == "adapter version 1" and m["warm_start_from_version"] == 1
        assert m["preference_pairs"] == 9 and m["base_model_reused"] is True
        for name in ("preference_accuracy", "reward_margin", "logp_margin_before", "logp_margin_after"):
            assert isinstance(m[name], float), (name, m)
        assert m["promote"] == "if_better" and m["promoted"] == (m["preference_accuracy"] > 0.5)
        assert m["compared_with"] == "the reference (adapter version 1)"
        assert dpo["adapter_version"] == 2

        # The new version's metrics and samples: the base, the previous adapter and the new one.
        versions = {v["version"]: v for v in api.get(f"{api.base}/adapter/versions").json()["items"]}
        assert versions[2]["metrics"]["preference_accuracy"] == m["preference_accuracy"]
        samples = api.get(dpo["links"]["samples"])
        assert samples.status_code == 200, samples.text
        assert samples.json()["samples"], samples.json()
        for sample in samples.json()["samples"]:
            assert sample["previous"] is not None and {"base", "adapter", "reference", "rejected"} <= set(sample)
        current = api.get(f"{api.base}/adapter").json()["current_version"]
        assert current == (2 if m["promoted"] else 1)


def test_feedback_on_a_generation_the_caller_may_not_read(pipeline: Pipeline, worker) -> None:
    with pipeline.client() as owner, pipeline.client() as other:
        r = owner.post(
            f"{owner.base}/generations", json={"prompt": QUESTION, "max_new_tokens": 4, "adapter_version": 0}
        )
        assert r.status_code == 202, r.text
        generation, _ = wait_for_job(owner, r.json()["id"], {"succeeded", "failed"}, pipeline=pipeline)
        assert generation["status"] == "succeeded"
        body = {"generation_id": generation["id"], "rating": "down"}

        # Another user, on the owner's avatar: the tenant rule.
        r = other.post(f"{owner.base}/feedback", json=body)
        assert r.status_code == 403 and r.headers["content-type"].startswith("application/problem+json")
        # Another user, on their own avatar: the id names nothing there.
        r = other.post(f"{other.base}/feedback", json=body)
        assert r.status_code == 404 and generation["id"] in r.json()["detail"]
        # The owner's other avatar: a generation belongs to the avatar it ran on.
        r = owner.post(f"/v1/users/{owner.user_id}/avatars/avatar-2/feedback", json=body)
        assert r.status_code == 404
        assert other.get(f"{other.base}/feedback").json()["items"] == []

        # A job that is no generation.
        owner.put_doc("chat.jsonl", chat_document(8))
        train = run_job(pipeline, owner, {**FAST, "num_epochs": 1})
        r = owner.post(f"{owner.base}/feedback", json={"generation_id": train["id"], "rating": "up"})
        assert r.status_code == 422 and r.json()["field"] == "generation_id"
        # The owner's own feedback on it goes through.
        r = owner.post(f"{owner.base}/feedback", json=body)
        assert r.status_code == 201, r.text
        assert r.json()["kind"] == "rating" and r.json()["rejected"] == generation["result"]["completion"]
