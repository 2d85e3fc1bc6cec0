"""The OpenAI-compatible files and fine-tuning API, driven by the official `openai` SDK over real
HTTP: against the session's API server (no trainer: jobs stay queued) for files, errors, paging,
the cap and cancelling; and end to end against a pipeline with a real trainer worker, where
OpenAI's own guide's example files train unchanged, `retrieve` is polled until `succeeded`, the
events and checkpoints are read, and the trained adapter is downloaded through the avatune
routes."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from contracts.keys import files_prefix, fine_tuning_jobs_prefix, user_prefix
from tests.conftest import ROOT, TEST_BUCKET, Api, free_port, keys_under, stop, token_for, wait_http
from tests.pipeline import Pipeline, chat_document, start_pipeline

MARV = "Marv is a factual chatbot that is also sarcastic."
# OpenAI's fine-tuning guide: chat examples with a system message ...
SYSTEM_EXAMPLES = [
    ("What's the capital of France?", "Paris, as if everyone doesn't know that already."),
    ("Who wrote 'Romeo and Juliet'?", "Oh, just some guy named William Shakespeare. Ever heard of him?"),
    ("How far is the Moon from Earth?", "Around 384,400 kilometers. Give or take a few, like that really matters."),
]
# ... and multi-turn examples whose first assistant answer is shown but not trained on (weight 0).
MULTI_TURN_EXAMPLES = [
    ("What's the capital of France?", "Paris", "Paris, as if everyone doesn't know that already."),
    ("Who wrote 'Romeo and Juliet'?", "William Shakespeare", "Oh, just some guy named William Shakespeare."),
    ("How far is the Moon from Earth?", "384,400 kilometers", "Around 384,400 kilometers. Like that really matters."),
]


def system_file() -> bytes:
    lines = [
        {
            "messages": [
                {"role": "system", "content": MARV},
                {"role": "user", "content": q},
                {"role": "assistant", "content": a},
            ]
        }
        for q, a in SYSTEM_EXAMPLES
    ]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def multi_turn_file() -> bytes:
    lines = [
        {
            "messages": [
                {"role": "system", "content": MARV},
                {"role": "user", "content": q},
                {"role": "assistant", "content": plain, "weight": 0},
                {"role": "user", "content": "Can you be more sarcastic?"},
                {"role": "assistant", "content": sarcastic, "weight": 1},
            ]
        }
        for q, plain, sarcastic in MULTI_TURN_EXAMPLES
    ]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def sdk(url: str, user_id: str, **kwargs) -> openai.OpenAI:
    """The official client pointed at avatune: the avatune token is the API key."""
    kwargs.setdefault("max_retries", 0)
    return openai.OpenAI(base_url=f"{url}/openai/v1", api_key=token_for(user_id), **kwargs)


def new_user() -> str:
    return "u-" + uuid.uuid4().hex[:12]


@pytest.fixture
def user(api_url: str) -> tuple[str, openai.OpenAI]:
    user_id = new_user()
    return user_id, sdk(api_url, user_id)


def upload(client: openai.OpenAI, data: bytes, name: str = "train.jsonl"):
    return client.files.create(file=(name, data), purpose="fine-tune")


# -- files -----------------------------------------------------------------------------------


def test_files_upload_list_retrieve_content_delete(user, s3) -> None:
    user_id, client = user
    first = upload(client, system_file(), "marv.jsonl")
    assert first.id.startswith("file-") and first.object == "file" and first.purpose == "fine-tune"
    assert first.filename == "marv.jsonl" and first.bytes == len(system_file()) and first.status == "processed"
    assert abs(first.created_at - time.time()) < 120
    second = upload(client, multi_turn_file(), "marv multi-turn ü.jsonl")
    assert client.files.retrieve(second.id).filename == "marv multi-turn ü.jsonl"
    assert client.files.content(first.id).read() == system_file()
    assert keys_under(s3, files_prefix(user_id)) == sorted(
        f"{files_prefix(user_id)}{f.id}.jsonl" for f in (first, second)
    )

    # Newest first by default; pages of one follow `after` until has_more is false.
    page = client.files.list(limit=1)
    assert [f.id for f in page.data] == [second.id] and page.has_more
    assert [f.id for f in client.files.list(limit=1)] == [second.id, first.id]  # auto-paging
    assert [f.id for f in client.files.list(order="asc", after=first.id).data] == [second.id]
    assert client.files.list(purpose="batch").data == []

    deleted = client.files.delete(first.id)
    assert deleted.id == first.id and deleted.deleted
    for call in (client.files.retrieve, client.files.delete, client.files.content):
        with pytest.raises(openai.NotFoundError) as caught:
            call(first.id)
        assert caught.value.body["message"] == f"No such File object: {first.id}"
    assert [f.id for f in client.files.list()] == [second.id]


@pytest.mark.parametrize(
    ("data", "name", "purpose", "param", "says"),
    [
        (b'{"messages": [{"role": "user", "content": "hi"}]}\n', "a.jsonl", "fine-tune", "file", "line 1"),
        (system_file() + b"{not json\n", "a.jsonl", "fine-tune", "file", "line 4: malformed JSON"),
        (
            b'{"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}\n',
            "a.jsonl",
            "fine-tune",
            "file",
            "line 1",
        ),
        (b"", "a.jsonl", "fine-tune", "file", "empty"),
        (system_file(), "a.csv", "fine-tune", "file", "not a .jsonl file"),
        (system_file(), "a.jsonl", "assistants", "purpose", "fine-tune"),
    ],
)
def test_invalid_files_are_bad_requests_and_store_nothing(user, s3, data, name, purpose, param, says) -> None:
    user_id, client = user
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=(name, data), purpose=purpose)
    error = caught.value
    assert error.status_code == 400 and error.param == param and says in error.message, error.body
    assert error.type == "invalid_request_error"
    assert keys_under(s3, user_prefix(user_id)) == []


def test_a_file_over_max_upload_bytes_is_413(user, s3) -> None:
    user_id, client = user
    big = chat_document(3000)  # > the session server's MAX_UPLOAD_BYTES (256 KiB)
    with pytest.raises(openai.APIStatusError) as caught:
        upload(client, big)
    assert caught.value.status_code == 413 and "MAX_UPLOAD_BYTES" in caught.value.message
    assert keys_under(s3, user_prefix(user_id)) == []


def test_another_users_file_is_not_found(api_url: str, user) -> None:
    owner_id, owner = user
    theirs = upload(owner, system_file())
    stranger = sdk(api_url, new_user())
    for call in (stranger.files.retrieve, stranger.files.content, stranger.files.delete):
        with pytest.raises(openai.NotFoundError):
            call(theirs.id)
    with pytest.raises(openai.NotFoundError) as caught:
        stranger.fine_tuning.jobs.create(model="gpt-4o-mini-2024-07-18", training_file=theirs.id)
    assert caught.value.param == "training_file"
    for odd in ("file-x.jsonl/../y", ".hidden", "a" * 300, "file-\x00"):
        with pytest.raises(openai.NotFoundError):
            owner.files.retrieve(odd)
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {token_for(owner_id)}"}) as http:
        for raw in ("..%2F..%2Fx", "%2E%2E", f"..%2F{theirs.id}", f"{theirs.id}%2F..%2F..%2Fother"):
            assert http.get(f"/openai/v1/files/{raw}").status_code == 404
            assert http.get(f"/openai/v1/files/{raw}/content").status_code == 404
    assert owner.files.retrieve(theirs.id).id == theirs.id  # the owner's file is intact


# -- the key, the organization, the error body -----------------------------------------------


def test_authentication_and_permission_errors(api_url: str, user) -> None:
    user_id, client = user
    mine = upload(client, system_file())
    with pytest.raises(openai.AuthenticationError) as caught:
        openai.OpenAI(base_url=f"{api_url}/openai/v1", api_key="not-a-token", max_retries=0).files.list()
    assert caught.value.body == {
        "message": "invalid token",
        "type": "authentication_error",
        "param": None,
        "code": "invalid_api_key",
    }
    # A user's key acts for its own user only: naming another organization is refused.
    with pytest.raises(openai.PermissionDeniedError):
        sdk(api_url, user_id, organization="someone-else").files.list()
    assert [f.id for f in sdk(api_url, user_id, organization=user_id).files.list()] == [mine.id]
    # A service token acts for the user it names as its organization, and must name one.
    service = token_for("billing-service", role="service")
    as_user = openai.OpenAI(base_url=f"{api_url}/openai/v1", api_key=service, organization=user_id, max_retries=0)
    assert [f.id for f in as_user.files.list()] == [mine.id]
    with pytest.raises(openai.PermissionDeniedError):
        openai.OpenAI(base_url=f"{api_url}/openai/v1", api_key=service, max_retries=0).files.list()


def test_openai_error_body_on_openai_routes_only(api_url: str) -> None:
    with httpx.Client(base_url=api_url) as http:
        r = http.get("/openai/v1/files")
        assert r.status_code == 401 and r.headers["content-type"] == "application/json"
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = http.get("/openai/v1/no-such-thing", headers={"Authorization": f"Bearer {token_for('x')}"})
        assert r.status_code == 404 and r.json()["error"]["message"] == "Invalid URL (GET /openai/v1/no-such-thing)"
        r = http.get("/v1/users/x/avatars/a/training-data")
        assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json"


def test_an_application_of_its_own_built_on_first_use(api_url: str) -> None:
    with httpx.Client(base_url=api_url) as http:
        ours = http.get("/openai/v1/openapi.json").json()
        main = http.get("/openapi.json").json()
    assert {"/files", "/files/{file_id}/content", "/fine_tuning/jobs/{fine_tuning_job_id}/events"} <= set(ours["paths"])
    assert ours["paths"]["/files"]["post"]["responses"]["400"]["content"]["application/json"]["schema"]
    assert not any("openai" in path or "fine_tuning" in path for path in main["paths"])
    # The Lambda's cold start imports none of it (nor the openai package).
    code = (
        "import sys, handlers.lambda_handler; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'openai' or 'openai' in m.split('.')[-1]))"
    )
    env = dict(os.environ, AUTH_JWT_SECRET="x" * 32)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


# -- fine-tuning jobs without a trainer ------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "param", "says"),
    [
        ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1}}}}, "method.type", "supervised"),
        ({"method": {"type": "reinforcement"}}, "method.type", "supervised"),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs", "'auto' or greater than or equal to 1"),
        ({"hyperparameters": {"batch_size": "big"}}, "hyperparameters.batch_size", "'auto' or a valid integer"),
        (
            {"hyperparameters": {"learning_rate_multiplier": -1}},
            "hyperparameters.learning_rate_multiplier",
            "'auto' or greater than 0",
        ),
        (
            {
                "hyperparameters": {"n_epochs": 2},
                "method": {"type": "supervised", "supervised": {"hyperparameters": {}}},
            },
            "hyperparameters",
            "not both",
        ),
        ({"suffix": "bad/suffix"}, "suffix", "avatar"),
        ({"metadata": {"avatar_id": "..x"}}, "metadata.avatar_id", "avatar"),
        ({"integrations": [{"type": "slack", "wandb": {"project": "p"}}]}, "integrations.0.type", "slack"),
        ({"model": "ft:gpt-4o-mini:u:a:1"}, "model", "fine-tuned model"),
        ({"metadata": {"webhook_url": "ftp://hooks.example.com/x"}}, "metadata.webhook_url", "http"),
        ({"metadata": {"webhook_url": "http://10.0.0.1/x"}}, "metadata.webhook_url", "non-public"),
        (
            {"metadata": {"webhook_url": "https://h.example.com", "webhook_signing_secret_ref": "$X"}},
            "metadata.webhook_signing_secret_ref",
            "environment variable",
        ),
        ({"model": f"s3://{TEST_BUCKET}/users/someone-else/base/"}, "model", "prefix"),
        ({"extra_body": {"learning_rate": 1}}, "learning_rate", "Extra inputs"),
    ],
)
def test_impossible_jobs_are_bad_requests(user, s3, kwargs, param, says) -> None:
    user_id, client = user
    training = upload(client, system_file())
    before = keys_under(s3, user_prefix(user_id))
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(**{"model": "gpt-4o-mini-2024-07-18", "training_file": training.id, **kwargs})
    assert caught.value.param == param and says in caught.value.message, caught.value.body
    assert keys_under(s3, user_prefix(user_id)) == before


def test_missing_training_file_is_not_found(user) -> None:
    _, client = user
    with pytest.raises(openai.NotFoundError) as caught:
        client.fine_tuning.jobs.create(model="gpt-4o-mini-2024-07-18", training_file="file-missing")
    assert caught.value.param == "training_file"
    training = upload(client, system_file())
    with pytest.raises(openai.NotFoundError) as caught:
        client.fine_tuning.jobs.create(model="m", training_file=training.id, validation_file="file-nope")
    assert caught.value.param == "validation_file"
    for call in (client.fine_tuning.jobs.retrieve, client.fine_tuning.jobs.cancel, client.fine_tuning.jobs.list_events):
        with pytest.raises(openai.NotFoundError):
            call("job-missing")
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.checkpoints.list("job-missing")


def test_queued_jobs_are_avatune_jobs_paged_capped_and_cancelled(api_url: str, user) -> None:
    user_id, client = user
    training, validation = upload(client, system_file()), upload(client, multi_turn_file())
    # One avatar (named by the suffix), one active job: a conflict the SDK does not retry.
    created = [
        client.fine_tuning.jobs.create(
            model="gpt-4o-mini-2024-07-18",
            training_file=training.id,
            suffix="persona-0",
            hyperparameters={"n_epochs": 3, "batch_size": "auto", "learning_rate_multiplier": 0.5},
            integrations=[{"type": "wandb", "wandb": {"project": "personas"}}],
        )
    ]
    with pytest.raises(openai.ConflictError) as conflict:
        sdk(api_url, user_id, max_retries=2).fine_tuning.jobs.create(
            model="m", training_file=training.id, suffix="persona-0"
        )
    assert conflict.value.response.headers["x-should-retry"] == "false" and created[0].id in conflict.value.message
    for i in range(1, 4):
        created.append(
            client.fine_tuning.jobs.create(
                model="gpt-4o-mini-2024-07-18",
                training_file=training.id,
                validation_file=validation.id,
                suffix=f"persona-{i}",
                seed=7,
                metadata={"team": "a"} if i % 2 else {"team": "b", "webhook_url": "https://hooks.example.com/avatune"},
                method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}},
            )
        )
    job = created[0]
    assert job.object == "fine_tuning.job" and job.status == "queued" and job.organization_id == user_id
    assert job.model == "gpt-4o-mini-2024-07-18" and job.training_file == training.id and job.fine_tuned_model is None
    assert job.hyperparameters.n_epochs == 3 and job.hyperparameters.batch_size == "auto"
    assert job.hyperparameters.learning_rate_multiplier == 0.5 and job.user_provided_suffix == "persona-0"
    assert job.method.type == "supervised" and job.integrations[0].wandb.project == "personas"
    assert created[1].validation_file == validation.id and created[1].seed == 7 and created[1].metadata == {"team": "a"}

    # An ordinary avatune job of the avatar its suffix names, training on the file alone.
    with Api(api_url, user_id, "persona-0") as avatune:
        view = avatune.get(f"{avatune.base}/training-jobs/{job.id}").json()
        listed = avatune.get(f"/v1/users/{user_id}/training-jobs").json()["items"]
    assert view["type"] == "train" and view["status"] == "queued" and view["avatar_id"] == "persona-0"
    files = f"s3://{TEST_BUCKET}/{files_prefix(user_id)}"
    assert view["spec"]["datasets"] == [{"uri": f"{files}{training.id}.jsonl"}]
    assert view["spec"]["use_flagged_documents"] is False and view["spec"]["integrations"] == {"report_to": ["wandb"]}
    assert view["config"] == {"num_epochs": 3.0, "learning_rate": 0.0001}
    assert sorted(j["id"] for j in listed) == sorted(j.id for j in created)
    with Api(api_url, user_id, "persona-1") as avatune:
        spec = avatune.get(f"{avatune.base}/training-jobs/{created[1].id}").json()["spec"]
    assert spec["datasets"][1] == {"uri": f"{files}{validation.id}.jsonl", "split": "eval"}
    with Api(api_url, user_id, "persona-2") as avatune:
        spec = avatune.get(f"{avatune.base}/training-jobs/{created[2].id}").json()["spec"]
    assert spec["callbacks"] == {"webhook_url": "https://hooks.example.com/avatune"}  # its webhook

    # The user's cap (MAX_ACTIVE_JOBS_PER_USER=4) is OpenAI's rate limit.
    with pytest.raises(openai.RateLimitError) as caught:
        sdk(api_url, user_id, max_retries=2).fine_tuning.jobs.create(
            model="m", training_file=training.id, suffix="persona-9"
        )
    assert caught.value.response.headers["retry-after"] == "60"
    assert caught.value.response.headers["x-should-retry"] == "false" and caught.value.type == "rate_limit_error"

    # Newest first, paged with `after`; metadata filters.
    newest_first = [j.id for j in reversed(created)]
    page = client.fine_tuning.jobs.list(limit=3)
    assert [j.id for j in page.data] == newest_first[:3] and page.has_more
    rest = client.fine_tuning.jobs.list(limit=3, after=page.data[-1].id)
    assert [j.id for j in rest.data] == newest_first[3:] and not rest.has_more
    assert [j.id for j in client.fine_tuning.jobs.list(limit=1)] == newest_first  # auto-paging
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "a"})] == [created[3].id, created[1].id]

    # Cancelling a queued job frees its slot at once; a cancelled job cannot be cancelled again.
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    events = client.fine_tuning.jobs.list_events(job.id)
    assert [e.message for e in events.data][0] == "The job was cancelled" and not events.has_more
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data == [] and cancelled.result_files == []
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f"file-results-{job.id}")
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.cancel(job.id)
    again = client.fine_tuning.jobs.create(model="m", training_file=training.id, suffix="persona-9")
    assert again.status == "queued"
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.pause(again.id)
    assert "not available" in caught.value.message


def test_idempotency_key_answers_the_same_job(user) -> None:
    _, client = user
    training = upload(client, system_file())
    headers = {"Idempotency-Key": uuid.uuid4().hex}
    first = client.fine_tuning.jobs.create(model="m", training_file=training.id, extra_headers=headers)
    again = client.fine_tuning.jobs.create(model="m", training_file=training.id, extra_headers=headers)
    assert again.id == first.id and again.created_at == first.created_at
    assert [j.id for j in client.fine_tuning.jobs.list()] == [first.id]


@pytest.fixture(scope="module")
def no_queue_url(stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An API whose train queue does not exist: queueing fails after the stores were written."""
    port = free_port()
    log = tmp_path_factory.mktemp("no-queue") / "api.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "handlers.app:app", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=dict(os.environ, TRAIN_QUEUE_NAME=f"missing-{uuid.uuid4().hex[:8]}.fifo"),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def test_a_job_that_cannot_be_queued_leaves_nothing(no_queue_url: str, s3) -> None:
    user_id = new_user()
    client = sdk(no_queue_url, user_id)
    training = upload(client, system_file())
    before = keys_under(s3, user_prefix(user_id))
    with pytest.raises(openai.InternalServerError) as caught:
        client.fine_tuning.jobs.create(model="m", training_file=training.id, suffix="persona")
    assert caught.value.status_code == 503 and caught.value.type == "server_error"
    assert keys_under(s3, user_prefix(user_id)) == before
    assert keys_under(s3, fine_tuning_jobs_prefix(user_id)) == []


# -- end to end: a real trainer --------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(stack, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """A pipeline (API server, queues, one trainer worker) whose API aliases `tiny-base`."""
    aliases = json.dumps({"tiny-base": str(tiny_model_dir)})
    pipeline = start_pipeline(tmp_path_factory.mktemp("openai"), tiny_model_dir, {"OPENAI_MODEL_ALIASES": aliases})
    worker = pipeline.start_worker()
    try:
        yield pipeline
        assert worker.poll() is None, "the worker died:\n" + pipeline.worker_log()
    finally:
        pipeline.stop_workers()


def wait_until_done(client: openai.OpenAI, job_id: str, pipeline: Pipeline, timeout: float = 240):
    """Poll `retrieve` as OpenAI's docs do, until the job has ended; the statuses seen."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if not seen or seen[-1] != job.status:
            seen.append(job.status)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job, seen
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} is {seen}\n{pipeline.worker_log()}")


@pytest.mark.slow
def test_openai_guide_files_fine_tune_end_to_end(trained: Pipeline, tiny_model_dir: Path, tmp_path: Path) -> None:
    user_id = new_user()
    client = sdk(trained.api_url, user_id, max_retries=2)
    # The avatar also has a flagged document of its own: an OpenAI job trains on its file alone.
    with Api(trained.api_url, user_id, "marv") as avatune:
        assert avatune.put_doc("other.jsonl", chat_document(5)).status_code == 201

    training = client.files.create(file=("marv.jsonl", system_file()), purpose="fine-tune")
    validation = client.files.create(file=("marv-multi-turn.jsonl", multi_turn_file()), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="gpt-4o-mini-2024-07-18",
        training_file=training.id,
        validation_file=validation.id,
        suffix="marv",
        seed=7,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 50}},
        },
    )
    done, seen = wait_until_done(client, job.id, trained)
    assert done.status == "succeeded", (done.error, trained.worker_log())
    assert set(seen) <= {"queued", "running", "succeeded"}
    assert done.fine_tuned_model == f"ft:gpt-4o-mini-2024-07-18:{user_id}:marv:1"
    assert done.trained_tokens and done.trained_tokens > 0 and done.finished_at and done.error is None
    assert done.hyperparameters.n_epochs == 2 and done.hyperparameters.batch_size == 2
    assert done.hyperparameters.learning_rate_multiplier == 50 and done.seed == 7
    assert done.estimated_finish is None and done.method.supervised.hyperparameters.n_epochs == 2

    # Events, newest first, paged by `after`: the step metrics the trainer reported.
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=2))
    assert events[0].message == "The job has successfully completed"
    assert events[1].message == f"New fine-tuned model created: {done.fine_tuned_model}"
    assert events[-1].message.startswith(f"Created fine-tuning job {job.id}")
    assert len({e.id for e in events}) == len(events) and [e.created_at for e in events] == sorted(
        (e.created_at for e in events), reverse=True
    )
    metrics = [e for e in events if e.type == "metrics"]
    assert any("train_loss" in e.data for e in metrics) and any("valid_loss" in e.data for e in metrics)
    assert all(e.data["total_steps"] >= e.data["step"] for e in metrics)

    # The results file: the step metrics as CSV, served by the Files API, going with the job.
    assert done.result_files == [f"file-results-{job.id}"]
    results = client.files.retrieve(done.result_files[0])
    assert results.purpose == "fine-tune-results" and results.filename == "step_metrics.csv"
    rows = list(csv.DictReader(io.StringIO(client.files.content(results.id).text)))
    assert results.bytes == len(client.files.content(results.id).content)
    assert [int(r["step"]) for r in rows] == sorted(e.data["step"] for e in metrics)
    assert any(r["valid_loss"] for r in rows) and any(r["train_loss"] for r in rows)
    with pytest.raises(openai.BadRequestError):
        client.files.delete(results.id)
    with pytest.raises(openai.NotFoundError):
        sdk(trained.api_url, new_user()).files.content(results.id)

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert len(checkpoints) == 1 and checkpoints[0].fine_tuned_model_checkpoint == done.fine_tuned_model
    assert checkpoints[0].fine_tuning_job_id == job.id and checkpoints[0].metrics.valid_loss is not None

    with Api(trained.api_url, user_id, "marv") as avatune:
        record = avatune.get(f"{avatune.base}/training-jobs/{job.id}").json()
        # Trained on the two files (the validation file as the held-out set), never the flagged document.
        assert [d["name"] for d in record["data"]] == [
            f"s3://{TEST_BUCKET}/{files_prefix(user_id)}{training.id}.jsonl",
            f"s3://{TEST_BUCKET}/{files_prefix(user_id)}{validation.id}.jsonl",
        ]
        assert record["metrics"]["eval_examples"] == len(MULTI_TURN_EXAMPLES)
        assert record["metrics"]["train_examples"] == len(SYSTEM_EXAMPLES)
        assert checkpoints[0].step_number == record["metrics"]["steps"] > 0
        # The trained adapter, downloaded through the avatune routes.
        adapter = avatune.get(f"{avatune.base}/adapter").json()
        assert adapter["current_version"] == 1
        for f in adapter["files"]:
            (tmp_path / f["name"]).write_bytes(httpx.get(f["url"]).raise_for_status().content)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (tmp_path / "adapter_model.safetensors").stat().st_size > 0
    assert trained.wait_events(job.id, "job.succeeded") == ["job.started", "job.succeeded"]

    # The guide's multi-turn file trains on its own too: only the weight-1 answers count.
    multi = client.fine_tuning.jobs.create(
        model="tiny-base", training_file=validation.id, suffix="marv-multi", hyperparameters={"n_epochs": 1}
    )
    done, _ = wait_until_done(client, multi.id, trained)
    assert done.status == "succeeded", (done.error, trained.worker_log())
    assert done.fine_tuned_model == f"ft:tiny-base:{user_id}:marv-multi:1"
    with Api(trained.api_url, user_id, "marv-multi") as avatune:
        record = avatune.get(f"{avatune.base}/training-jobs/{multi.id}").json()
    assert record["spec"]["base_model"]["name"] == record["metrics"]["base_model"] == str(tiny_model_dir)
    assert record["metrics"]["trainable_tokens"] == trainable_tokens(tiny_model_dir, multi_turn_file())
    unweighted = multi_turn_file().replace(b', "weight": 0', b"").replace(b', "weight": 1', b"")
    assert 0 < record["metrics"]["trainable_tokens"] < trainable_tokens(tiny_model_dir, unweighted)


def trainable_tokens(model_dir: Path, data: bytes) -> int:
    """What the trainer's own tokenization trains on in a JSONL file (weight 0 turns left out)."""
    from transformers import AutoTokenizer

    from contracts.documents import parse_document
    from trainer.dataset import build_examples

    _, stats = build_examples(AutoTokenizer.from_pretrained(model_dir), parse_document("f.jsonl", data), 1024)
    return stats.trainable_tokens
