"""Benchmark 2: cold start of the API handler.

A fresh interpreter imports the Lambda handler and serves its first request through Mangum
(an API Gateway HTTP API v2 event, `GET /healthz`), against a bare FastAPI + Mangum app with
one route, alternating, several times each; the time is the wall time from spawning the
interpreter to the handler's answer (what a Lambda init + first invoke pays, minus the
runtime's own start). Also: the first *authenticated, S3-backed* request (`GET
.../training-data` against moto), `python -X importtime` of the handler by package, and the
installed size of the `api` extra's dependency closure.
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


def _lazy_copy(dest: Path) -> Path | None:
    """A copy of `handlers/` and `contracts/` with the two imports that dominate the gap made
    lazy (aiobotocore in handlers/aws.py, jwt in handlers/auth.py): the change proposed in
    docs/pending/issue5.md, measured rather than guessed. None when the sources no longer
    have the expected shape (the row is then left out)."""
    import shutil

    for package in ("handlers", "contracts"):
        shutil.copytree(ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    aws, auth = dest / "handlers" / "aws.py", dest / "handlers" / "auth.py"
    a, b = aws.read_text(), auth.read_text()
    imports = ("from aiobotocore.config import AioConfig\n", "from aiobotocore.session import get_session\n")
    if not all(i in a for i in imports) or "\nimport jwt\n" not in b:
        return None
    for i in imports:
        a = a.replace(i, "")
    a = a.replace("-> AioConfig:", "-> Any:")
    a = _import_in_functions(a, "AioConfig(", "from aiobotocore.config import AioConfig")
    a = _import_in_functions(a, "get_session(", "from aiobotocore.session import get_session")
    b = _import_in_functions(b.replace("\nimport jwt\n", "\n", 1), "jwt.", "import jwt")
    aws.write_text(a)
    auth.write_text(b)
    return dest


def _import_in_functions(source: str, use: str, statement: str) -> str:
    """Add `statement` as the first line of every top-level function whose body contains `use`."""
    lines = source.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if re.match(r"(async )?def \w+", line):
            j = i
            while not lines[j].rstrip().endswith(":"):
                j += 1
            k = j + 1
            while k < len(lines) and (not lines[k] or lines[k].startswith((" ", "\t"))):
                k += 1
            out += lines[i : j + 1]
            if use in "\n".join(lines[j + 1 : k]):
                out.append("    " + statement)
            out += lines[j + 1 : k]
            i = k
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


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
    import tempfile

    lazy_root = Path(tempfile.mkdtemp(prefix="avatune-bench-lazy-"))
    lazy_dir = _lazy_copy(lazy_root)
    if lazy_dir is not None:
        try:
            _spawn(ours_script, env, lazy_dir)
        except RuntimeError:
            lazy_dir = None
    ours, bare, lazy = [], [], []
    log("  cold start: /healthz")
    for _ in range(repeats):
        ours.append(_spawn(ours_script, env))
        bare.append(_spawn(BARE, env))
        if lazy_dir is not None:
            lazy.append(_spawn(ours_script, env, lazy_dir))
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
    import shutil

    shutil.rmtree(lazy_root, ignore_errors=True)
    log("  cold start: importtime, sizes")
    imports, cumulative = _importtime(env)
    sizes = api_extra_size()
    return {
        "ours": ours,
        "bare": bare,
        "lazy": lazy,
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
    cum = result.get("cumulative", {})
    heavy = [
        (label, cum[m])
        for label, m in (
            ("`handlers.aws` → aiobotocore, aiohttp, botocore (imported when the module loads)", "handlers.aws"),
            ("`handlers.auth` → `jwt` (and `cryptography`, which pyjwt loads when installed)", "jwt"),
            ("`handlers.settings` → `pydantic_settings`", "pydantic_settings"),
            ("`pydantic.v1` (pulled in while the routes are defined)", "pydantic.v1"),
        )
        if m in cum
    ]
    lazy_rows = []
    if result.get("lazy"):
        lazy = statistics.median(result["lazy"])
        lazy_rows = [
            [
                "the same with aiobotocore and jwt imported on first use (the change proposed for "
                "`handlers/aws.py` and `handlers/auth.py`, measured on a patched copy)",
                secs(lazy),
                secs(bare),
                f"{lazy / bare:.2f}×",
            ]
        ]
    out = [
        "## 2. Cold start of the API handler",
        "",
        f"Wall time from spawning a fresh interpreter to the handler's answer, median of {len(result['ours'])} "
        "alternating runs (byte-code caches warm, as in a deployed package).",
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
                *lazy_rows,
                [
                    "first authenticated S3-backed request (`GET …/training-data`, moto), for reference",
                    secs(first),
                    "—",
                    f"{first / bare:.2f}× bare",
                ],
            ],
        ),
        "",
        f"- Target within 1.5× of the bare app: **{'met' if r <= 1.5 else 'not met'}** ({r:.2f}×)."
        + (
            ""
            if r <= 1.5
            else " The gap is imports the bare app does not do, in modules outside this change: "
            + "; ".join(f"{label} {secs(v)}" for label, v in heavy)
            + " (cumulative, one `-X importtime` run)."
            + (
                " Importing aiobotocore and jwt on first use instead brings it to "
                f"{statistics.median(result['lazy']) / bare:.2f}×"
                " (row above); the first S3-backed request then pays the aiobotocore import, as it pays the client"
                " creation today."
                if result.get("lazy")
                else ""
            )
        ),
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
