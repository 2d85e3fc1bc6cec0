"""Generation jobs end to end: API -> GenerateRequest on the train queue -> a real trainer runs
one greedy completion on its cached tiny base (alone or with an adapter version from S3) ->
the job's `result`. The completions must be exactly what base / base + adapter give locally,
and the cached base must come out of an adapter generation untouched."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch

from contracts.keys import adapter_version_prefix
from contracts.messages import GENERATE_REQUEST_SCHEMA, GenerateRequest
from tests.conftest import TEST_BUCKET, Api, keys_under
from tests.pipeline import Pipeline, chat_document, train_through_api, wait_for_job
from trainer.completion import generate_completion
from trainer.rag.prompts import build_rag_messages, fit_rag_messages

FAST = {"num_epochs": 2, "batch_size": 4, "learning_rate": 0.01, "r": 4}
MAX_GENERATION_TOKENS = 6  # the worker's cap, below what a request may ask for
QUESTION = "question 3: how are you?"
RESULT_FIELDS = {
    "completion",
    "adapter_version",
    "prompt_tokens",
    "completion_tokens",
    "seconds",
    "finish_reason",
    "prompt",
    "max_new_tokens",
}


@pytest.fixture(scope="module")
def worker(pipeline: Pipeline):
    proc = pipeline.start_worker(MAX_GENERATION_TOKENS=str(MAX_GENERATION_TOKENS))
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


def generate(api: Api, body: dict, **kwargs):
    return api.post(f"{api.base}/generations", json=body, **kwargs)


def run_generation(pipeline: Pipeline, api: Api, body: dict) -> dict:
    r = generate(api, body)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["type"] == "generate" and job["status"] == "queued" and job["result"] is None
    done, seen = wait_for_job(api, job["id"], {"succeeded", "failed", "cancelled"}, pipeline=pipeline)
    assert done["status"] == "succeeded", done
    assert set(seen) <= {"queued", "running", "succeeded"}
    return done


def local_completion(model_dir: Path, adapter_dir: Path | None, messages: list[dict], max_new_tokens: int) -> str:
    """What the job should answer, computed here with the same helper on a fresh base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker (TORCH_THREADS=1): the same float sums, the same argmax
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, adapter_dir)
        text, _ = generate_completion(model, tokenizer, messages, max_new_tokens)
        return text
    finally:
        torch.set_num_threads(threads)


def test_generation_with_the_base_and_with_an_adapter(
    pipeline: Pipeline, trained: Api, s3, tiny_model_dir, tmp_path
) -> None:
    api = trained
    chat = [{"role": "user", "content": QUESTION}]

    # The base alone (adapter_version 0), from a bare prompt; max_new_tokens capped by the worker.
    base_job = run_generation(pipeline, api, {"prompt": QUESTION, "max_new_tokens": 50, "adapter_version": 0})
    result = base_job["result"]
    assert RESULT_FIELDS <= set(result), result
    assert result["adapter_version"] == 0 and base_job["adapter_version"] == 0
    assert result["max_new_tokens"] == MAX_GENERATION_TOKENS
    assert 1 <= result["completion_tokens"] <= MAX_GENERATION_TOKENS
    assert result["finish_reason"] in ("stop", "length") and result["prompt_tokens"] > 0
    # The prompt went through the base's chat template, ending with the assistant's header.
    assert result["prompt"].startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")
    assert QUESTION in result["prompt"] and result["prompt"].endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert "passages" not in result
    assert (
        base_job["request"]["prompt"] == QUESTION
        and base_job["progress"]["step"] == base_job["progress"]["total_steps"]
    )

    # The current adapter (no adapter_version: version 1), from messages, with fewer tokens than the cap.
    key = "gen-" + uuid.uuid4().hex
    r = generate(api, {"messages": chat, "max_new_tokens": 4}, headers={"Idempotency-Key": key})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert r.json()["request"]["adapter_version"] == 1  # resolved when queued
    assert (
        generate(api, {"messages": chat, "max_new_tokens": 4}, headers={"Idempotency-Key": key}).json()["id"] == job_id
    )
    tuned_job, _ = wait_for_job(api, job_id, {"succeeded", "failed"}, pipeline=pipeline)
    assert tuned_job["status"] == "succeeded", tuned_job
    tuned = tuned_job["result"]
    assert tuned["adapter_version"] == 1 and tuned_job["adapter_version"] == 1
    assert tuned["max_new_tokens"] == 4 and 1 <= tuned["completion_tokens"] <= 4
    assert tuned["prompt"] == result["prompt"]  # a prompt is one user message
    assert tuned_job["metrics"]["base_model_reused"] is True  # the base training left loaded

    # Exactly what base and base + version 1 answer here, and the adapter changed the answer.
    adapter_dir = tmp_path / "adapter"
    prefix = adapter_version_prefix(api.user_id, api.avatar_id, 1)
    for key_ in keys_under(s3, prefix):
        adapter_dir.mkdir(exist_ok=True)
        s3.download_file(TEST_BUCKET, key_, str(adapter_dir / key_[len(prefix) :]))
    assert result["completion"] == local_completion(tiny_model_dir, None, chat, MAX_GENERATION_TOKENS)
    assert tuned["completion"] == local_completion(tiny_model_dir, adapter_dir, chat, 4)
    assert tuned["completion"] != local_completion(tiny_model_dir, None, chat, 4)

    # The cached base came out untouched: the same greedy text from version 0 again, without reloading.
    again = run_generation(pipeline, api, {"prompt": QUESTION, "max_new_tokens": 50, "adapter_version": 0})
    assert again["result"]["completion"] == result["completion"]
    assert again["metrics"]["base_model_reused"] is True

    # Events as for every job type.
    assert pipeline.wait_events(job_id, "job.succeeded") == ["job.started", "job.succeeded"]
    event = [e for e in pipeline.seen_events if e["job_id"] == job_id and e["event"] == "job.succeeded"][0]
    assert event["job_type"] == "generate" and event["adapter_version"] == 1


def test_bad_generation_requests_are_refused_and_queue_nothing(pipeline: Pipeline, trained: Api) -> None:
    api = trained
    before = api.get(f"{api.base}/training-jobs").json()["items"]
    chat = [{"role": "user", "content": "hi"}]
    for body, where in [
        ({"prompt": "hi", "messages": chat}, "exactly one of prompt or messages"),
        ({"max_new_tokens": 5}, "exactly one of prompt or messages"),
        ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompt": "hi", "max_new_tokens": 2049}, "max_new_tokens"),
        ({"prompt": ""}, "prompt"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
        ({"messages": [*chat, {"role": "assistant", "content": "yo"}]}, "assistant"),
        ({"prompt": "hi", "adapter_version": -1}, "adapter_version"),
        ({"prompt": "hi", "rag": {"top_k": 0}}, "top_k"),
        ({"prompt": "hi", "temperature": 0.7}, "temperature"),
        ({"prompt": "é" * 60_000}, "at most 98304"),  # 120,000 bytes: more than a queue message carries
    ]:
        r = generate(api, body)
        assert r.status_code == 422, (body, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert where in r.json()["detail"], (body, r.json())
    with Api(pipeline.api_url, "u-" + uuid.uuid4().hex[:10], api.avatar_id) as stranger:  # another user's avatar
        r = stranger.post(f"{api.base}/generations", json={"prompt": "hi", "adapter_version": 0})
        assert r.status_code == 403 and r.headers["content-type"].startswith("application/problem+json")
    r = generate(api, {"prompt": "hi", "adapter_version": 99})
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/problem+json")
    assert "no adapter version 99" in r.json()["detail"] and r.json()["adapter_version"] == 99
    with pipeline.client() as fresh:  # no adapter yet: the current adapter is refused, the base alone is not
        r = generate(fresh, {"prompt": "hi"})
        assert r.status_code == 404 and "adapter_version 0" in r.json()["detail"], r.text
        assert fresh.get(f"{fresh.base}/training-jobs").json()["items"] == []
        done = run_generation(pipeline, fresh, {"prompt": "hi", "max_new_tokens": 2, "adapter_version": 0})
        assert done["result"]["adapter_version"] == 0 and done["result"]["completion_tokens"] <= 2
    assert api.get(f"{api.base}/training-jobs").json()["items"] == before

    # Only the worker can count tokens: a prompt beyond the model's window fails the job, saying why.
    r = generate(api, {"prompt": "apple " * 2100, "adapter_version": 0})
    assert r.status_code == 202, r.text
    done, _ = wait_for_job(api, r.json()["id"], {"succeeded", "failed"}, pipeline=pipeline)
    assert done["status"] == "failed" and "context window of 2048 tokens" in done["error"], done
    assert done["result"] is None and done["attempts"] == 1


def test_a_generation_sent_straight_to_the_queue_uses_the_current_adapter(pipeline: Pipeline, trained: Api) -> None:
    api = trained
    job_id = "ext-" + uuid.uuid4().hex[:12]
    request = GenerateRequest(
        schema_=GENERATE_REQUEST_SCHEMA,
        job_id=job_id,
        user_id=api.user_id,
        avatar_id=api.avatar_id,
        messages=[{"role": "user", "content": QUESTION}],
        max_new_tokens=3,
    )
    pipeline.sqs.send_message(
        QueueUrl=pipeline.train_queue_url,
        MessageBody=request.to_message_body(),
        MessageGroupId=request.message_group_id(),
        MessageDeduplicationId=job_id,
    )
    done, _ = wait_for_job(api, job_id, {"succeeded", "failed"}, pipeline=pipeline)
    assert done["status"] == "succeeded", done
    assert done["type"] == "generate" and done["adapter_version"] == 1 and done["result"]["adapter_version"] == 1
    assert done["request"]["adapter_version"] is None  # as sent; resolved by the worker
    assert 1 <= done["result"]["completion_tokens"] <= 3


PASSAGES = [
    {
        "text": "The lighthouse keeper's cat is named Biscuit.",
        "score": 0.91,
        "source": "cats.md",
        "chunk_id": "c1",
        "metadata": {},
    },
    {
        "text": "Biscuit sleeps on the warm lamp room floor.",
        "score": 0.72,
        "source": "cats.md",
        "chunk_id": "c2",
        "metadata": {},
    },
]


def test_rag_passages_go_into_a_system_message_through_the_chat_template(tiny_model_dir) -> None:
    from transformers import AutoTokenizer

    from trainer.completion import render_prompt

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    question = [{"role": "user", "content": "What is the cat called?"}]
    chat = build_rag_messages(question, PASSAGES)
    assert [m["role"] for m in chat] == ["system", "user"] and chat[1] == question[0]
    prompt = render_prompt(tokenizer, chat)
    # system (both passages, best first, with sources) -> the question -> the assistant's header
    system_at = prompt.index("<|start_header_id|>system<|end_header_id|>")
    first, second = prompt.index(PASSAGES[0]["text"]), prompt.index(PASSAGES[1]["text"])
    user_at = prompt.index("<|start_header_id|>user<|end_header_id|>\n\nWhat is the cat called?")
    assert system_at < first < second < user_at and "(source: cats.md)" in prompt
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")

    # A caller's own system message keeps its text and gets the context appended (one system message).
    own = [{"role": "system", "content": "Be brief."}, *question]
    merged = build_rag_messages(own, PASSAGES)
    assert [m["role"] for m in merged] == ["system", "user"]
    assert merged[0]["content"].startswith("Be brief.") and PASSAGES[0]["text"] in merged[0]["content"]
    assert own[0]["content"] == "Be brief."  # the input is not modified
    assert build_rag_messages(question, []) == question

    # Too little room: the weakest passages are dropped first, down to none.
    full_tokens = len(tokenizer(render_prompt(tokenizer, chat), add_special_tokens=False)["input_ids"])
    one = build_rag_messages(question, PASSAGES[:1])
    one_tokens = len(tokenizer(render_prompt(tokenizer, one), add_special_tokens=False)["input_ids"])
    assert fit_rag_messages(tokenizer, question, PASSAGES, full_tokens) == (chat, PASSAGES)
    assert fit_rag_messages(tokenizer, question, PASSAGES, full_tokens - 1) == (one, PASSAGES[:1])
    assert fit_rag_messages(tokenizer, question, PASSAGES, one_tokens - 1) == (question, [])


FACTS_MD = b"""# The lighthouse

The lighthouse keeper's cat is named Biscuit and sleeps on the warm floor of the lamp room.

# The harbour

Fishing boats leave the harbour at four in the morning and come back before noon with mackerel.

# The village

The village bakery sells rye bread on Tuesdays and apple cake on Sundays.
"""


def test_rag_generation_puts_the_retrieved_passage_into_the_prompt(pipeline: Pipeline, worker) -> None:
    with pipeline.client() as api:
        r = api.put(f"{api.base}/context/facts.md", content=FACTS_MD)
        assert r.status_code == 201, r.text
        r = api.post(f"{api.base}/context/index", json={"chunk_size": 120, "chunk_overlap": 0})
        assert r.status_code == 202, r.text
        indexed, _ = wait_for_job(api, r.json()["id"], {"succeeded", "failed"}, pipeline=pipeline)
        assert indexed["status"] == "succeeded", indexed

        question = "What is the name of the lighthouse keeper's cat?"
        done = run_generation(
            pipeline, api, {"prompt": question, "max_new_tokens": 3, "adapter_version": 0, "rag": {"top_k": 1}}
        )
        result = done["result"]
        assert done["request"]["rag"] == {"top_k": 1, "score_threshold": None}
        [passage] = result["passages"]
        assert passage["source"] == "facts.md" and "Biscuit" in passage["text"]
        assert {"text", "score", "source", "chunk_id", "metadata"} <= set(passage)
        # The passage went into a system message ahead of the question, through the chat template.
        prompt = result["prompt"]
        system_at = prompt.index("<|start_header_id|>system<|end_header_id|>")
        assert system_at < prompt.index(passage["text"].strip()) < prompt.index(question)
        assert result["prompt_tokens"] > 40 and result["completion_tokens"] <= 3

        # A threshold nothing reaches: no passages, and the prompt is the plain question.
        done = run_generation(
            pipeline,
            api,
            {
                "prompt": question,
                "max_new_tokens": 2,
                "adapter_version": 0,
                "rag": {"top_k": 3, "score_threshold": 0.999},
            },
        )
        assert done["result"]["passages"] == []
        assert "system" not in done["result"]["prompt"] and question in done["result"]["prompt"]

    with pipeline.client() as empty:  # no index: the job fails with the store's reason
        r = generate(empty, {"prompt": question, "adapter_version": 0, "rag": {"top_k": 2}})
        assert r.status_code == 202, r.text
        failed, _ = wait_for_job(empty, r.json()["id"], {"succeeded", "failed"}, pipeline=pipeline)
        assert failed["status"] == "failed" and "index" in failed["error"], failed


def test_cli_generate_prints_the_completion(pipeline: Pipeline, trained: Api) -> None:
    from tests.first_hour.test_cli import Cli, failed, ok

    cli = Cli(pipeline.api_url, trained.user_id, trained.avatar_id)
    result = ok(
        cli("generate", QUESTION, "--version", "0", "--max-new-tokens", "4", "--interval", "0.1", "--timeout", "120")
    )
    jobs = trained.get(f"{trained.base}/training-jobs").json()["items"]
    newest = jobs[0]
    assert newest["type"] == "generate" and newest["request"]["max_new_tokens"] == 4
    # stdout is the completion alone (what the job answered); the rest went to stderr.
    assert result.stdout == newest["result"]["completion"] + "\n"
    assert f"generation job {newest['id']}" in result.stderr and "adapter version 0" in result.stderr
    failed(cli("generate", QUESTION, "--version", "99"), "error 404", "no adapter version 99")
