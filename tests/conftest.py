"""Shared fixtures: one moto server (S3 + SQS over HTTP) and one real API server per test run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest

from infra.processes import api_server, free_port, stop, wait_http  # noqa: F401 (re-exported)

ROOT = Path(__file__).resolve().parent.parent
TEST_SECRET = "test-secret-" + uuid.uuid4().hex
TEST_BUCKET = "avatune-test"


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto in server mode; the process environment points every AWS client at it."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/moto-api/", proc)
        os.environ.update(
            AWS_ENDPOINT_URL=url,
            AWS_ACCESS_KEY_ID="test",
            AWS_SECRET_ACCESS_KEY="test",
            AWS_DEFAULT_REGION="us-east-1",
            S3_BUCKET=TEST_BUCKET,
            AUTH_JWT_SECRET=TEST_SECRET,
            TRAIN_QUEUE_NAME="avatune-test-train.fifo",
            EVENTS_QUEUE_NAME="avatune-test-events",
        )
        os.environ.pop("DEV_MODE", None)
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def stack(moto_endpoint: str) -> dict[str, str]:
    from infra.bootstrap import bootstrap

    return bootstrap()


@pytest.fixture(scope="session")
def api_url(stack: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real uvicorn serving the API against moto."""
    env = dict(os.environ, MAX_UPLOAD_BYTES=str(256 * 1024))
    with api_server(env, tmp_path_factory.mktemp("api") / "api.log") as url:
        yield url


@pytest.fixture(scope="session")
def s3(stack: dict[str, str]):
    return boto3.client("s3")


@pytest.fixture(scope="session")
def sqs(stack: dict[str, str]):
    return boto3.client("sqs")


def token_for(user_id: str, role: str | None = None) -> str:
    from handlers.auth import issue_token

    return issue_token(TEST_SECRET, user_id, role=role)


class Api(httpx.Client):
    """An HTTP client for one user, with helpers for that user's avatar."""

    def __init__(self, base_url: str, user_id: str, avatar_id: str) -> None:
        super().__init__(base_url=base_url, headers={"Authorization": f"Bearer {token_for(user_id)}"}, timeout=60)
        self.user_id = user_id
        self.avatar_id = avatar_id

    @property
    def base(self) -> str:
        return f"/v1/users/{self.user_id}/avatars/{self.avatar_id}"

    @property
    def docs(self) -> str:
        return f"{self.base}/training-data"

    def put_doc(self, name: str, data: bytes, flag: bool | None = None) -> httpx.Response:
        params = {} if flag is None else {"use_for_training": str(flag).lower()}
        return self.put(f"{self.docs}/{name}", content=data, params=params)


@pytest.fixture
def api(api_url: str) -> Iterator[Api]:
    """A fresh user and avatar, so tests never see each other's data."""
    with Api(api_url, "u-" + uuid.uuid4().hex[:12], "avatar-1") as client:
        yield client


def adapter_dir(tmp_path: Path, n: int) -> Path:
    """A stand-in adapter folder (the two files a version holds), distinct per `n`."""
    d = tmp_path / f"adapter-{n}"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": n}))
    (d / "adapter_model.safetensors").write_bytes(bytes([n]) * 64)
    return d


def keys_under(s3, prefix: str) -> list[str]:
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=TEST_BUCKET, Prefix=prefix):
        keys.extend(o["Key"] for o in page.get("Contents", []))
    return keys


def chat_line(user: str, assistant: str) -> bytes:
    import json

    return (
        json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]})
        + "\n"
    ).encode()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama-architecture base model, written locally (no hub)."""
    from trainer.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def pipeline(stack, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """An API server and queues of this test module's own; tests start trainer workers on it."""
    from tests.pipeline import start_pipeline

    p = start_pipeline(tmp_path_factory.mktemp("pipeline"), tiny_model_dir)
    try:
        yield p
    finally:
        p.stop_workers()
