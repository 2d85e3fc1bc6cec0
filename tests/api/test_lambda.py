"""The Mangum handler with real API Gateway HTTP API (v2) events, and the import-weight rule."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid

from tests.conftest import ROOT, chat_line, token_for


def apigw_v2_event(
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    query: str = "",
    claims: dict | None = None,
) -> dict:
    context = {
        "accountId": "123456789012",
        "apiId": "api",
        "domainName": "x.execute-api.us-east-1.amazonaws.com",
        "domainPrefix": "x",
        "requestId": uuid.uuid4().hex,
        "routeKey": "$default",
        "stage": "$default",
        "time": "25/Nov/2026:12:00:00 +0000",
        "timeEpoch": 1795000000000,
        "http": {"method": method, "path": path, "protocol": "HTTP/1.1", "sourceIp": "203.0.113.1", "userAgent": "t"},
    }
    if claims is not None:
        context["authorizer"] = {"jwt": {"claims": claims, "scopes": None}}
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": query,
        "headers": {"host": "x.execute-api.us-east-1.amazonaws.com", **(headers or {})},
        "requestContext": context,
        "body": base64.b64encode(body).decode() if body else None,
        "isBase64Encoded": bool(body),
    }


def test_mangum_handler_serves_api_gateway_v2_events(moto_endpoint: str, stack) -> None:
    from handlers.lambda_handler import handler

    user = "lambda-" + uuid.uuid4().hex[:8]
    auth = {"authorization": f"Bearer {token_for(user)}"}
    health = handler(apigw_v2_event("GET", "/healthz"), None)
    assert health["statusCode"] == 200 and json.loads(health["body"]) == {"status": "ok"}

    path = f"/v1/users/{user}/avatars/a/training-data"
    put = handler(
        apigw_v2_event(
            "PUT",
            path + "/c.jsonl",
            headers={**auth, "content-type": "application/jsonl"},
            body=chat_line("hi", "yo"),
            query="use_for_training=false",
        ),
        None,
    )
    assert put["statusCode"] == 201, put
    # A second invocation reuses the process's clients (no lifespan under Mangum).
    listed = handler(apigw_v2_event("GET", path, headers=auth, query="use_for_training=false"), None)
    assert [d["name"] for d in json.loads(listed["body"])["items"]] == ["c.jsonl"]
    denied = handler(apigw_v2_event("GET", path), None)
    assert denied["statusCode"] == 401 and denied["headers"]["content-type"] == "application/problem+json"


APIGW_SCRIPT = """
import json, sys
from tests.api.test_lambda import apigw_v2_event
from handlers.lambda_handler import handler
path = "/v1/users/carol/avatars/a/training-data"
ok = handler(apigw_v2_event("GET", path, claims={"sub": "carol"}), None)
other = handler(apigw_v2_event("GET", path, claims={"sub": "mallory"}), None)
# A bearer token is not enough in this mode: only the authorizer's verified claims count.
none = handler(apigw_v2_event("GET", path, headers={"authorization": "Bearer " + sys.argv[1]}), None)
print(json.dumps([ok["statusCode"], other["statusCode"], none["statusCode"]]))
"""


def test_apigateway_auth_mode_uses_authorizer_claims(moto_endpoint: str, stack) -> None:
    env = {k: v for k, v in os.environ.items() if k != "AUTH_JWT_SECRET"}
    env["AUTH_MODE"] = "apigateway"
    proc = subprocess.run(
        [sys.executable, "-c", APIGW_SCRIPT, token_for("carol")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [200, 403, 401]


def test_importing_the_api_does_not_import_torch() -> None:
    script = (
        "import sys, handlers.lambda_handler, handlers.app, contracts.messages, contracts.documents\n"
        "heavy = {'torch', 'transformers', 'peft', 'bitsandbytes', 'datasets', 'trl', 'accelerate'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    env = dict(os.environ, DEV_MODE="true")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
