"""Benchmark 2: cold start of the API handler.

A fresh interpreter imports the Lambda handler and serves its first request through Mangum
(an API Gateway HTTP API v2 event, `GET /healthz`), against a bare FastAPI + Mangum app with
one route, alternating, several times each; the time is the wall time from spawning the
interpreter to the handler's answer (what a Lambda init + first invoke pays, minus the
runtime's own start). The handler imports the application on the first request that needs it
(`handlers.lambda_handler`), so two more rows say what that costs: the whole application
(`handlers.app`) behind Mangum serving the same `GET /healthz`, and the first *authenticated,
S3-backed* request (`GET .../training-data` against moto). Also `python -X importtime` of the
handler by package and the installed size of the `api` extra's dependency closure.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import time
import uuid
from collections import defaultdict
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.common import PY, ROOT, machine, ready_process, secs, table, today

SECRET = "bench-secret-" + uuid.uuid4().hex

EVENT = r"""
import base64, json, time, uuid
def event(path, headers=None):
    return {"version": "2.0", "routeKey": "$default", "rawPath": path, "rawQueryString": "",
            "headers": {"host": "x.execute-api.us-east-1.amazonaws.com", **(headers or {})},
            "requestContext": {"accountId": "1", "apiId": "api", "domainName": "x", "domainPrefix": "x",
                "requestId": uuid.uuid4().hex, "routeKey": "$default", "stage": "$default", "time": "",
                "timeEpoch": 0, "http": {"method": "GET", "path": path, "protocol": "HTTP/1.1",
                "sourceIp": "203.0.113.1", "userAgent": "bench"}},
            "body": None, "isBase64Encoded": False}
"""

OURS = (
    EVENT
    + r"""
from handlers.lambda_handler import handler
resp = handler(event(PATH, HEADERS), None)
assert resp["statusCode"] == 200, resp
print("served", flush=True)
"""
)

# The whole application behind Mangum, as the handler was before its health front.
WHOLE_APP = (
    EVENT
    + r"""
from mangum import Mangum
from handlers.app import app
handler = Mangum(app, lifespan="off")
resp = handler(event("/healthz"), None)
assert resp["statusCode"] == 200, resp
print("served", flush=True)
"""
)

BARE = (
    EVENT
    + r"""
from fastapi import FastAPI
from mangum import Mangum
app = FastAPI()
@app.get("/healthz")
def healthz():
    return {"status": "ok"}
handler = Mangum(app, lifespan="off")
resp = handler(event("/healthz"), None)
assert resp["statusCode"] == 200, resp
print("served", flush=True)
"""
)


def _spawn(script: str, env: dict[str, str], cwd: Path = ROOT) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([PY, "-c", script], cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0 or "served" not in proc.stdout:
        raise RuntimeError(f"cold start script failed: {proc.stderr[-2000:]}")
    return elapsed


def _importtime(env: dict[str, str]) -> tuple[list[tuple[str, float]], dict[str, float]]:
    """Self import time per top-level package while importing the handler (largest first), and
    each module's cumulative time."""
    proc = subprocess.run(
        [PY, "-X", "importtime", "-c", "import handlers.lambda_handler"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    per_package: dict[str, float] = defaultdict(float)
    cumulative: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|\s+(.*)$", line)
        if not m:
            continue
        name = m.group(3).strip()
        per_package[name.split(".")[0]] += int(m.group(1)) / 1e6
        cumulative[name] = int(m.group(2)) / 1e6
    return sorted(per_package.items(), key=lambda kv: -kv[1]), cumulative


def _requirement_names(dist: metadata.Distribution, extras: set[str]) -> list[tuple[str, set[str]]]:
    from packaging.requirements import Requirement

    out = []
    for raw in dist.requires or []:
        req = Requirement(raw)
        if req.marker is not None:
            if not any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
                continue
        out.append((req.name, set(req.extras)))
    return out


def api_extra_size() -> dict[str, Any]:
    """Installed bytes of every distribution in the `api` extra's closure (files in RECORD)."""
    from packaging.utils import canonicalize_name

    seen: dict[str, int] = {}
    todo: list[tuple[str, set[str]]] = [
        (n, x) for n, x in _requirement_names(metadata.distribution("avatune"), {"api"}) if True
    ]
    extras_of: dict[str, set[str]] = defaultdict(set)
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        new_extras = extras - extras_of[key]
        if key in seen and not new_extras:
            continue
        extras_of[key] |= extras
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if key not in seen:
            size = 0
            for f in dist.files or []:
                try:
                    size += (f.locate()).stat().st_size
                except OSError:
                    pass
            seen[key] = size
        todo += _requirement_names(dist, extras_of[key])
    return dict(sorted(seen.items(), key=lambda kv: -kv[1]))


def run(repeats: int = 5, log=print) -> dict[str, Any]:
    env = dict(
        os.environ,
        AUTH_JWT_SECRET=SECRET,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        PYTHONDONTWRITEBYTECODE="1",
    )
    env.pop("DEV_MODE", None)
    ours_script = OURS.replace("PATH", '"/healthz"').replace("HEADERS", "None")
    # Byte-compile caches exist already (a deployed Lambda ships them too); one untimed run each.
    _spawn(ours_script, env)
    _spawn(BARE, env)
    _spawn(WHOLE_APP, env)
    ours, bare, whole = [], [], []
    log("  cold start: /healthz")
    for _ in range(repeats):
        ours.append(_spawn(ours_script, env))
        bare.append(_spawn(BARE, env))
        whole.append(_spawn(WHOLE_APP, env))
    first_s3 = []
    log("  cold start: first S3-backed request")
    with ready_process([PY, "-m", "bench.moto_server"], env=env, stdin=True) as (_, port):
        import boto3

        boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{port}",
            region_name="us-east-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
        ).create_bucket(Bucket="avatune-bench-cold")
        from handlers.auth import issue_token

        s3_env = dict(env, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", S3_BUCKET="avatune-bench-cold")
        headers = {"authorization": f"Bearer {issue_token(SECRET, 'cold')}"}
        script = OURS.replace("PATH", '"/v1/users/cold/avatars/a/training-data"').replace("HEADERS", repr(headers))
        _spawn(script, s3_env)
        for _ in range(repeats):
            first_s3.append(_spawn(script, s3_env))
    log("  cold start: importtime, sizes")
    imports, cumulative = _importtime(env)
    sizes = api_extra_size()
    return {
        "ours": ours,
        "bare": bare,
        "whole_app": whole,
        "first_s3": first_s3,
        "imports": imports,
        "cumulative": cumulative,
        "sizes": sizes,
        "machine": machine(),
        "date": today(),
    }


def markdown(result: dict[str, Any], command_line: str) -> str:
    ours = statistics.median(result["ours"])
    bare = statistics.median(result["bare"])
    first = statistics.median(result["first_s3"])
    r = ours / bare
    total_import = sum(v for _, v in result["imports"])
    top = result["imports"][:12]
    sizes: dict[str, int] = result["sizes"]
    total = sum(sizes.values())
    server_only = {
        "uvicorn",
        "uvloop",
        "httptools",
        "watchfiles",
        "websockets",
        "python-dotenv",
        "pyyaml",
        "click",
        "h11",
    }
    lambda_total = sum(v for k, v in sizes.items() if k not in server_only)
    runtime_has = {"boto3", "botocore", "s3transfer", "jmespath", "python-dateutil", "six", "urllib3"}
    zip_total = sum(v for k, v in sizes.items() if k not in server_only | runtime_has)
    whole = statistics.median(result["whole_app"]) if result.get("whole_app") else None
    whole_rows = (
        [
            [
                "the whole application (`handlers.app`) behind Mangum serving the same `GET /healthz`: what the "
                "first request other than a health check pays once",
                secs(whole),
                secs(bare),
                f"{whole / bare:.2f}×",
            ]
        ]
        if whole
        else []
    )
    out = [
        "## 2. Cold start of the API handler",
        "",
        f"Wall time from spawning a fresh interpreter to the handler's answer, median of {len(result['ours'])} "
        "alternating runs (byte-code caches warm, as in a deployed package). The handler answers `GET /healthz` "
        "itself and imports the application on the first request that needs it (`handlers/lambda_handler.py`).",
        "",
        table(
            ["what", "ours", "baseline", "ratio"],
            [
                [
                    "`handlers.lambda_handler.handler` serving `GET /healthz` vs a bare FastAPI + Mangum "
                    "app with one route",
                    f"**{secs(ours)}**",
                    secs(bare),
                    f"**{r:.2f}×**",
                ],
                *whole_rows,
                [
                    "first authenticated S3-backed request (`GET …/training-data`, moto): the application, "
                    "aiobotocore, the token check and one S3 listing",
                    secs(first),
                    "—",
                    f"{first / bare:.2f}× bare",
                ],
            ],
        ),
        "",
        f"- Target within 1.3× of the bare app for the start-up path (a fresh process answering `GET /healthz`): "
        f"**{'met' if r <= 1.3 else 'not met'}** ({r:.2f}×), because that path imports only the health check's "
        "answer."
        + (
            f" The application itself still costs {whole / bare:.2f}× the bare app's start (row 2): the first request "
            "that needs it pays that once per execution environment."
            if whole
            else ""
        )
        + " SnapStart is not used: AWS offers it for Python 3.12 and later, the template runs 3.11 "
        "(docs/architecture.md).",
        "",
        f"Import time of `handlers.lambda_handler` by top-level package (`python -X importtime`, self time summed; "
        f"{secs(total_import)} in all, one run):",
        "",
        table(["package", "import time"], [[f"`{k}`", secs(v)] for k, v in top]),
        "",
        f"Installed size of the `api` extra (its whole dependency closure, files in each RECORD): "
        f"**{total / 2**20:.1f} MiB** in {len(sizes)} distributions; without the local server "
        f"(`uvicorn[standard]` and its extras, not needed on Lambda) {lambda_total / 2**20:.1f} MiB; without those "
        f"and the boto3/botocore the Lambda Python runtime already ships, {zip_total / 2**20:.1f} MiB. Largest:",
        "",
        table(["distribution", "size"], [[k, f"{v / 2**20:.1f} MiB"] for k, v in list(sizes.items())[:10]]),
        "",
        f"Machine: {result['machine']}. Date: {result['date']}. Reproduce: `{command_line}`.",
        "",
    ]
    return "\n".join(out)
