"""Authentication and the tenant-isolation matrix."""

from __future__ import annotations

import time
import uuid

import httpx
import jwt
import pytest

from contracts.keys import user_prefix
from handlers.auth import issue_token
from tests.conftest import TEST_SECRET, Api, chat_line, keys_under, token_for

# Every route of another user's avatar, with a body where it needs one.
ROUTES = [
    ("GET", "/training-data", {}),
    ("POST", "/training-data", {"files": {"file": ("a.txt", b"x")}}),
    ("PUT", "/training-data/a.txt", {"content": b"x"}),
    ("GET", "/training-data/a.txt", {}),
    ("PATCH", "/training-data/a.txt", {"json": {"use_for_training": False}}),
    ("DELETE", "/training-data/a.txt", {}),
    ("DELETE", "/training-data?use_for_training=false", {}),
    ("GET", "/training-data/archive", {}),
    ("POST", "/training-data/uploads", {"json": {"name": "a.txt", "size": 1}}),
    ("GET", "/merged-models", {}),
    ("GET", "/merged-models/1", {}),
    ("GET", "/full-models", {}),
    ("GET", "/full-models/1", {}),
]


@pytest.fixture
def victim(api_url: str, s3):
    with Api(api_url, "victim-" + uuid.uuid4().hex[:8], "av") as v:
        assert v.put_doc("a.txt", b"secret", flag=False).status_code == 201
        yield v


@pytest.mark.parametrize(("method", "path", "kwargs"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_other_users_token_is_forbidden(api: Api, victim: Api, s3, method, path, kwargs) -> None:
    before = keys_under(s3, user_prefix(victim.user_id))
    r = api.request(method, victim.base + path, **kwargs)
    assert r.status_code == 403, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert "secret" not in r.text
    assert keys_under(s3, user_prefix(victim.user_id)) == before
    assert victim.get(victim.docs + "/a.txt").content == b"secret"


@pytest.mark.parametrize(("method", "path", "kwargs"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_no_token_is_unauthorized(api_url: str, victim: Api, method, path, kwargs) -> None:
    r = httpx.request(method, api_url + victim.base + path, **kwargs)
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["www-authenticate"].startswith("Bearer")


def test_bad_tokens(api_url: str, victim: Api) -> None:
    now = int(time.time())
    bad = {
        "wrong secret": jwt.encode(
            {"sub": victim.user_id, "exp": now + 60}, "another-secret-of-32-bytes-or-more", algorithm="HS256"
        ),
        "no exp": jwt.encode({"sub": victim.user_id}, TEST_SECRET, algorithm="HS256"),
        "expired": jwt.encode({"sub": victim.user_id, "exp": now - 10}, TEST_SECRET, algorithm="HS256"),
        "no sub": jwt.encode({"role": "service"}, TEST_SECRET, algorithm="HS256"),
        "alg none": jwt.encode({"sub": victim.user_id}, None, algorithm="none"),
        "garbage": "not.a.jwt",
    }
    for why, token in bad.items():
        r = httpx.get(api_url + victim.docs, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401, why
        assert token not in r.text and TEST_SECRET not in r.text
    r = httpx.get(api_url + victim.docs, headers={"Authorization": f"Basic {token_for(victim.user_id)}"})
    assert r.status_code == 401


def test_service_token_may_act_for_any_user(api_url: str, victim: Api) -> None:
    headers = {"Authorization": f"Bearer {token_for('billing-service', role='service')}"}
    r = httpx.get(api_url + victim.docs, headers=headers)
    assert r.status_code == 200 and [d["name"] for d in r.json()["items"]] == ["a.txt"]
    r = httpx.put(api_url + victim.docs + "/svc.jsonl", content=chat_line("a", "b"), headers=headers)
    assert r.status_code == 201


def test_api_refuses_to_start_without_secret(moto_endpoint: str) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("AUTH_JWT_SECRET", "DEV_MODE")}
    proc = subprocess.run([sys.executable, "-c", "import handlers.app"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "AUTH_JWT_SECRET is not set" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-c", "import handlers.app"], env=dict(env, DEV_MODE="true"), capture_output=True
    )
    assert proc.returncode == 0


def test_audience_and_issuer_are_checked_when_configured(moto_endpoint: str, stack) -> None:
    """AUTH_JWT_AUDIENCE / AUTH_JWT_ISSUER: a token must carry both, with these values."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT, free_port, stop, wait_http

    port = free_port()
    env = dict(os.environ, AUTH_JWT_AUDIENCE="avatune-api", AUTH_JWT_ISSUER="https://id.example.com")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "handlers.app:app", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz", proc)
        docs = "/v1/users/alice/avatars/a/training-data"
        ok = issue_token(TEST_SECRET, "alice", audience="avatune-api", issuer="https://id.example.com")
        assert httpx.get(url + docs, headers={"Authorization": f"Bearer {ok}"}).status_code == 200
        for token in (
            issue_token(TEST_SECRET, "alice"),
            issue_token(TEST_SECRET, "alice", audience="other-api", issuer="https://id.example.com"),
            issue_token(TEST_SECRET, "alice", audience="avatune-api", issuer="https://evil.example.com"),
        ):
            r = httpx.get(url + docs, headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json", r.text
    finally:
        stop(proc)


def test_a_short_secret_is_refused_outside_dev_mode(moto_endpoint: str) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "DEV_MODE"}
    env["AUTH_JWT_SECRET"] = "too-short-secret"
    proc = subprocess.run([sys.executable, "-c", "import handlers.app"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "shorter than 32 bytes" in proc.stderr
    assert "too-short-secret" not in proc.stderr
