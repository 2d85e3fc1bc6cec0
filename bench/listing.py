"""Benchmark 1: listing documents by flag at 100, 1,000 and 10,000 documents.

Stack: moto in server mode (`bench.moto_server`) <- the latency proxy (`bench.proxy`, a fixed
delay per request) <- the API under uvicorn (`bench.listing_app`) <- this process (httpx).
One call is `GET .../training-data?use_for_training=X&limit=1000` (the API's largest page);
the proxy counts the S3 requests each call makes. Documents are loaded straight into moto
(`populate`), i.e. behind the API's back, as a bulk import or presigned uploads would.
"""

from __future__ import annotations

import os
import statistics
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.common import (
    PY,
    ROOT,
    command,
    free_port,
    machine,
    ratio,
    ready_process,
    secs,
    stop,
    table,
    today,
    wait_http,
)

BUCKET = "avatune-bench"
USER = "bench-user"
AVATAR = "bench-avatar"
SECRET = "bench-secret-" + uuid.uuid4().hex
PREFIX = f"users/{USER}/avatars/{AVATAR}/adapters/training_data/"
PATH = f"/v1/users/{USER}/avatars/{AVATAR}/training-data"


@dataclass
class Call:
    seconds: float
    requests: int
    by_operation: dict[str, int]
    items: list[tuple[str, bool]]
    next_cursor: str | None


@dataclass
class Row:
    size: int
    flag: str
    calls: dict[str, Call] = field(default_factory=dict)
    floor: float = 0.0


class Harness:
    def __init__(self, api: str, proxy: str, token: str) -> None:
        self.client = httpx.Client(base_url=api, headers={"Authorization": f"Bearer {token}"}, timeout=900)
        self.proxy = httpx.Client(base_url=proxy, timeout=30)

    def call(self, flag: str, variant: str, fresh: bool = False) -> Call:
        self.proxy.get("/__proxy__/reset")
        headers = {"x-bench-store": variant, **({"x-bench-fresh-process": "1"} if fresh else {})}
        t0 = time.perf_counter()
        r = self.client.get(PATH, params={"use_for_training": flag, "limit": 1000}, headers=headers)
        seconds = time.perf_counter() - t0
        r.raise_for_status()
        stats = self.proxy.get("/__proxy__/stats").json()
        body = r.json()
        return Call(
            seconds,
            stats["total"],
            stats["by_operation"],
            [(d["name"], d["use_for_training"]) for d in body["items"]],
            body["next_cursor"],
        )

    def best_of(self, n: int, flag: str, variant: str, fresh: bool = False) -> Call:
        calls = [self.call(flag, variant, fresh) for _ in range(n)]
        median = statistics.median(c.seconds for c in calls)
        return min(calls, key=lambda c: abs(c.seconds - median))


def _list_floor(proxy_url: str) -> float:
    """Time to page through every key with ListObjectsV2 alone (sequential), through the proxy."""
    import boto3
    from botocore.config import Config

    s3 = boto3.client(
        "s3",
        endpoint_url=proxy_url,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        config=Config(signature_version="s3v4"),
    )
    t0 = time.perf_counter()
    for _ in s3.get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=PREFIX, PaginationConfig={"PageSize": 1000}
    ):
        pass
    return time.perf_counter() - t0


def run(sizes: tuple[int, ...] = (100, 1000, 10000), delay_ms: float = 10.0, log=print) -> dict[str, Any]:
    env = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    rows: list[Row] = []
    with ready_process([PY, "-m", "bench.moto_server"], env=env, stdin=True) as (moto, moto_port):
        moto_url = f"http://127.0.0.1:{moto_port}"
        import boto3

        boto3.client(
            "s3",
            endpoint_url=moto_url,
            region_name="us-east-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
        ).create_bucket(Bucket=BUCKET)
        with ready_process(
            [PY, "-m", "bench.proxy", "--target", f"127.0.0.1:{moto_port}", "--delay-ms", str(delay_ms)], env=env
        ) as (_, proxy_port):
            proxy_url = f"http://127.0.0.1:{proxy_port}"
            api_port = free_port()
            api_env = dict(
                env, AWS_ENDPOINT_URL=proxy_url, S3_BUCKET=BUCKET, AUTH_JWT_SECRET=SECRET, S3_MAX_CONCURRENCY="64"
            )
            import subprocess

            api = subprocess.Popen(
                [
                    PY,
                    "-m",
                    "uvicorn",
                    "bench.listing_app:app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(api_port),
                    "--log-level",
                    "warning",
                ],
                cwd=ROOT,
                env=api_env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                wait_http(f"http://127.0.0.1:{api_port}/healthz", api)
                from handlers.auth import issue_token

                h = Harness(f"http://127.0.0.1:{api_port}", proxy_url, issue_token(SECRET, USER))
                h.call("true", "indexed")  # warm the API process (imports, clients): not measured
                have = 0
                for size in sizes:
                    command(moto, {"op": "populate", "bucket": BUCKET, "prefix": PREFIX, "start": have, "stop": size})
                    have = size
                    # Entries count once their tag was read >= 2 s after LastModified (one-second
                    # resolution); a bulk import that is seconds old is the realistic state.
                    time.sleep(2.2)
                    log(f"  listing: {size} documents")
                    row_false, row_true = Row(size, "false"), Row(size, "true")
                    # The first filtered call after the import reads the new objects' tags and
                    # writes the index: the cold cost (= what the code before the index paid).
                    row_false.calls["cold"] = h.call("false", "indexed", fresh=True)
                    row_false.floor = _list_floor(proxy_url)
                    for row in (row_false, row_true):
                        row.calls["ours"] = h.best_of(3, row.flag, "indexed")
                        row.calls["ours_fresh_process"] = h.best_of(
                            1 if size >= 1000 else 3, row.flag, "indexed", fresh=True
                        )
                        if size < 10000 and row.flag == "false":  # at 10,000 the cold call is this cost
                            row.calls["concurrent"] = h.call(row.flag, "concurrent")
                        log(f"    {size} {row.flag}: baseline...")
                        row.calls["baseline"] = h.call(row.flag, "baseline")
                        for name, call in row.calls.items():
                            if (
                                call.items != row.calls["baseline"].items
                                or call.next_cursor != row.calls["baseline"].next_cursor
                            ):
                                raise AssertionError(
                                    f"{name} listed other documents than the baseline at {size}/{row.flag}"
                                )
                        rows.append(row)
            finally:
                stop(api)
    return {"rows": rows, "delay_ms": delay_ms, "machine": machine(), "date": today()}


def markdown(result: dict[str, Any], command_line: str) -> str:
    rows: list[Row] = result["rows"]
    out = [
        "## 1. Listing documents by flag",
        "",
        f"One call = `GET …/training-data?use_for_training=<flag>&limit=1000` (the API's largest page) through "
        f"the API under uvicorn, against moto in server mode behind `bench/proxy.py` adding "
        f"**{result['delay_ms']:g} ms per S3 request**. Documents were loaded straight into moto (behind the "
        "API's back); "
        "10% are flagged false and 3% carry no tag (count as true), names spread over the key space. "
        "S3 requests per call are counted by the proxy. Every variant returned exactly the baseline's items "
        "and cursor.",
        "",
        "- **ours**: the shipped store with its flag index warm in the API process (median of 3).",
        "- **baseline**: the straightforward code in the same run: `list_objects_v2` pages, then "
        "`get_object_tagging` per key, one after another.",
        "- *fresh process*: index read from S3, nothing in process memory (a new Lambda container; median "
        "of 3 at 100 documents, one call above).",
        "- *cold*: the first call after the import (`false`, which scans every key): reads the new objects' "
        "tags 64 at a time and writes the index.",
        "- *no index*: the code before this change (tag reads 64 at a time, no index); at 10,000 the *cold* "
        "call pays the same.",
        "- *listing floor*: ListObjectsV2 pages alone over every key, sequential, through the same proxy.",
        "",
    ]
    headers = [
        "documents",
        "flag",
        "items",
        "ours",
        "S3 req",
        "baseline",
        "S3 req",
        "ratio",
        "fresh process",
        "cold",
        "no index",
        "listing floor",
    ]
    body = []
    for row in rows:
        c = row.calls
        ours, base = c["ours"], c["baseline"]
        body.append(
            [
                f"{row.size:,}",
                row.flag,
                len(ours.items),
                f"**{secs(ours.seconds)}**",
                ours.requests,
                secs(base.seconds),
                base.requests,
                f"**{ratio(base.seconds, ours.seconds)}**",
                f"{secs(c['ours_fresh_process'].seconds)} ({c['ours_fresh_process'].requests} req)",
                f"{secs(c['cold'].seconds)} ({c['cold'].requests} req)" if "cold" in c else "—",
                f"{secs(c['concurrent'].seconds)} ({c['concurrent'].requests} req)" if "concurrent" in c else "—",
                secs(row.floor) if row.floor else "—",
            ]
        )
    out.append(table(headers, body))
    out.append("")
    for row in rows:
        if row.size == max(r.size for r in rows):
            floor = next((r.floor for r in rows if r.size == row.size and r.floor), 0.0)
            ours, base = row.calls["ours"], row.calls["baseline"]
            ok_ratio = base.seconds / ours.seconds >= 20
            ok_abs = ours.seconds < 2
            why = ""
            if not ok_abs:
                why = (
                    f" This call must list all {row.size:,} keys (only {len(ours.items)} match, spread over the key "
                    f"space), and listing them alone takes {secs(floor)} page after page "
                    f"({floor / row.size * 1000:.2f} ms per key): moto serializes ListObjectsV2 with a generic XML "
                    "serializer that re-parses every key's timestamp (most of that time in a profile), so the mock "
                    "store, not the S3 requests or our code, sets the floor; ours lists the index's ranges "
                    + (
                        "concurrently and gets under that floor, but not under 2 s on this machine. "
                        if ours.seconds < floor
                        else f"concurrently and stays within {ours.seconds / floor:.2f}× of that floor. "
                    )
                    + f"Tag reads, the cost the issue targets, are gone "
                    f"({ours.by_operation.get('GetObjectTagging', 0)} of them)."
                )
            out.append(
                f"- Target at {row.size:,} documents, `{row.flag}`: ≥ 20× the baseline — "
                f"{'**met**' if ok_ratio else '**not met**'} ({ratio(base.seconds, ours.seconds)}); "
                f"under 2 s — {'**met**' if ok_abs else '**not met**'} ({secs(ours.seconds)}).{why}"
            )
    ops = {}
    for row in rows:
        if row.size == max(r.size for r in rows):
            ops[row.flag] = row.calls["ours"].by_operation
    out.append(
        "- S3 requests of one warm call at the largest size, by operation: "
        + "; ".join(f"`{f}`: {', '.join(f'{k} {v}' for k, v in sorted(o.items()))}" for f, o in ops.items())
        + "."
    )
    for row in rows:
        if row.size == max(r.size for r in rows) and "cold" in row.calls:
            cold = row.calls["cold"].by_operation
            out.append(
                f"- The cold call at {row.size:,}: " + ", ".join(f"{k} {v}" for k, v in sorted(cold.items())) + "."
            )
    out += ["", f"Machine: {result['machine']}. Date: {result['date']}. Reproduce: `{command_line}`.", ""]
    return "\n".join(out)
